"""One job: one (model, data, method, device, seed) cell of a sweep (`harness.sweep` is the Hydra app).

`run_job` builds the job (`harness.job.builder`), attributes (or, with `phase=evaluate`, loads saved
maps), scores, times and writes the job's results.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from harness.config import HarnessError, Settings, check_config, config_hash, explain_key, weights_sha256
from harness.job.builder import Job, build, settings_of
from harness.job.files import maps_arrays, tables
from harness.job.measured import Measured, kernels_table, measure_call
from harness.job.row import breakdown, environment, headline, job_fields, metric_fields, params
from harness.job.saved import SavedMaps, saved_maps
from harness.results import write_files, write_row
from harness.runtime import Stopwatch, job_device, resolve_device
from methods.common import extras_of, seed_all
from metrics import Result, field_name

log = logging.getLogger("harness")


def run_job(
    cfg: DictConfig,
    out: Path,
    calibration_dir: Path | None = None,
    started: float | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Run one job and write its results into `out`; returns the results row.

    With `phase=all` the method attributes and every metric scores its maps; with
    `phase=evaluate` the maps come from the matching job of the sweep in `maps_from`, whose method
    fields (settings, timings) the row carries, and only the metrics run.

    Args:
        cfg: the job's config.
        out: the job's folder.
        calibration_dir: the sweep's folder, where its jobs share one calibration (None: measure).
        started: `time.perf_counter()` when the job began (default: now), for `job_s`.
        settings: the config's typed settings, checked (default: `check_config(cfg)` here).
    """
    clock = Stopwatch(started)
    settings = settings or check_config(cfg)
    config = config_hash(cfg)
    with job_device(resolve_device(settings.device.name)) as device:
        key = explain_key(cfg, device.type)
        source = saved_maps(cfg, settings.job, key, device) if settings.job.phase == "evaluate" else None
        weights = {  # what identifies the weights, whatever the model's `auto` settings become
            "weights_sha256": weights_sha256(OmegaConf.to_container(cfg.model, resolve=True)),
            "explain_key_any_weights": explain_key(cfg, device.type, weights=False),
        }
        job = build(cfg, device, calibration_dir, clock, settings)
        log.info("%s: started", _label(job))
        with job.progress:
            row = _run(job, out, config, key, source, weights)
        fields = [
            field_name(m, k)
            for m, r in job.metric_traits.items()
            for k in r.better
            if field_name(m, k) in row
        ]
        log.info(headline(row, fields))
        return row


def _label(job: Job) -> str:
    return (
        f"{job.method_name} on {job.classifier.name}/{job.data.name} ({job.device.type}, "
        f"{len(job.data.ids)} images)"
    )


def _run(
    job: Job, out: Path, config: str, key: str, source: SavedMaps | None, weights: dict[str, Any]
) -> dict[str, Any]:
    """Attribute (or take the saved maps), score with every metric, and write the job's files."""
    x = job.data.images.to(job.device).contiguous(memory_format=job.options.memory_format)
    with torch.no_grad():  # the class to explain: the eager model's fp32 top-1, whatever the options
        probs = job.classifier.module(x).float().softmax(dim=1)
    target = probs.argmax(dim=1)
    if job.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.device)
    measured: dict[str, Measured] = {}
    extras: dict[str, torch.Tensor] = {}
    if source is None:
        maps, method_fields, extras = _attribute(job, x, target, measured)
    else:
        maps, target, method_fields = source.on(job.data, job.device)
    results = {name: _score(job, name, x, maps, target, measured) for name in job.metrics}
    maps_from = None if source is None else source.folder
    row = job_fields(job, config, key, maps_from, target, measured) | weights | method_fields
    for name, result in results.items():
        row |= metric_fields(
            name, result, job.metric_traits[name].better, measured[name], job.metrics[name], job.seed
        )
    row["metrics_s"] = sum(measured[name].timing.total_ms for name in results) / 1e3
    row |= environment(job.device)
    with job.clock("write"):
        curves_df, scores_df = tables(job, results, target, probs)
        files_ = {"curves.csv": curves_df, "scores.csv": scores_df, "kernels.csv": kernels_table(measured)}
        arrays = source.arrays if source is not None else maps_arrays(job, maps, target, key)
        arrays = arrays | {
            field_name(name, k): v.cpu().numpy() for name, r in results.items() for k, v in r.arrays.items()
        }
        arrays |= {f"method_{k}": v.cpu().numpy() for k, v in extras.items()}
        files = write_files(out, files_, arrays)
    row |= breakdown(job.clock, row)
    write_row(out, row, files)
    return row


def check_attributions(maps: Any, inputs: torch.Tensor, method: str) -> torch.Tensor:
    """A method's output must be a finite `[B, 1 or C, H, W]` tensor on the inputs' device."""
    b, c, h, w = inputs.shape
    if not isinstance(maps, torch.Tensor):
        raise HarnessError(f"method {method} returned {type(maps).__name__}; expected a tensor")
    if maps.dim() != 4 or maps.shape[0] != b or maps.shape[1] not in (1, c) or maps.shape[2:] != (h, w):
        raise HarnessError(
            f"method {method} returned shape {tuple(maps.shape)}; expected [{b}, 1 or {c}, {h}, {w}]"
        )
    if maps.device != inputs.device:
        raise HarnessError(f"method {method} returned maps on {maps.device}; expected {inputs.device}")
    if not torch.isfinite(maps).all():
        raise HarnessError(
            f"method {method} returned NaN or inf in {int((~torch.isfinite(maps)).sum())} values"
        )
    return maps


def _measure(job: Job, model: torch.nn.Module, call: Any, chunk: int | None, what: str) -> Measured:
    return measure_call(
        call,
        model=model,
        device=job.device,
        speed=job.speed,
        chunk=chunk,
        n=len(job.data.ids),
        what=what,
        settings=job.settings.timing,
        clock=job.clock,
        progress=job.progress,
    )


def _method_model(job: Job) -> torch.nn.Module:
    """The model the method runs: the eager one for methods that hook modules, else the job's."""
    return job.classifier.module if job.method_traits.eager_only else job.model


def _ground_truth(job: Job) -> Any:
    truth = job.data.ground_truth
    if truth is None:  # checked in build(); kept for callers that build a Job by hand
        raise HarnessError(f"data {job.data.name} has no ground truth")
    return truth.to(job.device)


def _attribute(
    job: Job, x: torch.Tensor, target: torch.Tensor, measured: dict[str, Measured]
) -> tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]:
    """Run the job's method, timed and profiled (into `measured`); the maps, the row's method fields
    and what else the method found per image (`methods.common.with_extras`).
    """
    model = _method_model(job)
    truth = _ground_truth(job) if job.method_traits.ground_truth else None

    def attribute(rows: slice, chunk: int | None) -> torch.Tensor:
        seed_all(job.seed)  # stochastic methods: the same draws on every call
        sizes = {} if chunk is None else {"chunk_size": chunk}
        if truth is not None:
            sizes["ground_truth"] = truth[rows]
        return job.method(model, x[rows], target[rows], **sizes)

    chunk = settings_of(job.method).get("chunk_size")
    with job.options.autocast(job.device):
        measured["method"] = _measure(job, model, attribute, chunk, f"method {job.method_name}")
    extras = extras_of(measured["method"].out)
    maps = check_attributions(measured["method"].out, x, job.method_name).detach().float()
    fields = {
        "method_compiled": job.options.compile is not None and model is not job.classifier.module,
        **measured["method"].fields("method"),
        **params("method", job.method),
        **({} if job.references is None else {"method.references": ",".join(job.references)}),
        **{f"method_{k}": float(v.float().mean()) for k, v in extras.items() if v.dim() == 1},
    }
    return maps, fields, extras


def _score(
    job: Job,
    name: str,
    x: torch.Tensor,
    maps: torch.Tensor,
    target: torch.Tensor,
    measured: dict[str, Measured],
) -> Result:
    """Score the maps with one metric, timed like the method (into `measured[name]`), passing it what
    it declares it needs besides (model, inputs, maps, target).
    """
    metric, needs = job.metrics[name], job.metric_traits[name].needs
    model, extra = _needed(job, needs)
    truth = _ground_truth(job) if "ground_truth" in needs else None

    def score(rows: slice, chunk: int | None) -> Result:
        seed_all(
            job.seed
        )  # random draws (substrates, perturbations, imputation noise) the same on every call
        more = {} if truth is None else {"ground_truth": truth[rows]}
        return metric(model, x[rows], maps[rows], target[rows], chunk_size=chunk, **extra, **more)

    with job.options.autocast(job.device):
        measured[name] = _measure(job, model, score, settings_of(metric).get("chunk_size"), f"metric {name}")
    result = measured[name].out
    if not isinstance(result, Result):
        raise HarnessError(f"metric {name} returned {type(result).__name__}; expected metrics.Result")
    for key, values in result.values.items():
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise HarnessError(
                f"metric {name} returned NaN or inf as {field_name(name, key)} for {bad} of "
                f"{values.numel()} images; a score that is not a number cannot be compared"
            )
    return result


def _needed(job: Job, needs: frozenset[str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model a metric runs (the method's, when it re-runs the method), and what else it needs."""
    extra: dict[str, Any] = {}
    model = job.model
    if "normalization" in needs:
        extra |= {"mean": tuple(job.classifier.mean), "std": tuple(job.classifier.std)}
    if "explain" in needs:
        model = _method_model(job)
        extra["explain"] = lambda inputs, target: explain(job, model, inputs, target)
    if "explain_with" in needs:
        extra["explain_with"] = explainer_with(job)
    if "trained" in needs:
        extra["trained"] = job.trained
    return model, extra


def explain(job: Any, model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One re-run of the job's method on `model`, seeded as every call (a stochastic method draws the
    same numbers for a perturbed input, or a randomised model, as for the original).
    """
    seed_all(int(job.seed))
    return job.method(model, inputs, target).detach()


def explainer_with(job: Any) -> Any:
    """The job's method as `explain_with(model, inputs, target) -> maps` on a model of the metric's
    (a randomised copy). It runs on a copy of that model prepared with the job's speed options
    (memory format, BatchNorm folding: the same function), eager, so that the metric's own model is
    never changed: a cascading randomisation re-initialises the next block of the model as it was,
    not of one whose BatchNorms were folded into its convolutions. While the method runs, the copy
    carries the forward pre-hooks that the timing put on the job's model, so that its passes are
    counted (the row's forwards and bound) and a warm-up or profile stops after the first ones.
    """

    def explain_with(model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prepared = copy.deepcopy(model)
        job.options.prepare(prepared, inputs[:2], keep={job.classifier.cam_layer})
        hooks = list(job.model._forward_pre_hooks.values())
        handles = [prepared.register_forward_pre_hook(h) for h in hooks]
        try:
            return explain(job, prepared, inputs, target)
        finally:
            for h in handles:
                h.remove()

    return explain_with
