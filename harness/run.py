"""One job: one (model, data, method, device, seed) cell of a sweep (`harness.app` is the Hydra app).

`build(cfg)` does all instantiation; `run_job` attributes (or, with `phase=evaluate`, loads saved
maps), scores, times and writes the job's results.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from harness.calibration import Calibration, calibrate, settings
from harness.data import Images, load_data
from harness.device import SpeedOptions, available_memory, job_device, resolve_device
from harness.errors import HarnessError
from harness.measured import Measured, TimingSettings, kernels_table, measure_call
from harness.model_speed import ModelSpeed
from harness.models import Classifier
from harness.progress import Progress
from harness.results import read_maps, write_files, write_row
from harness.resume import complete_jobs, config_hash, digest, weights_sha256
from harness.rows import (
    breakdown,
    environment,
    headline,
    job_fields,
    maps_arrays,
    metric_fields,
    params,
    tables,
)
from harness.timing import Stopwatch
from methods import MethodTraits
from methods import traits_of as method_traits
from methods.common import seed_all
from metrics import MetricTraits, Result, field_name
from metrics import traits_of as metric_traits

log = logging.getLogger("harness")
PHASES = ("all", "evaluate")

__all__ = ["HarnessError", "Job", "build", "run_job"]


@dataclass
class Job:
    """Everything a job needs, built from its config.

    `model` is what methods and metrics call: the classifier's module, compiled when the device
    config asks for it (`classifier.module` stays eager); `trained` is a copy of the module as loaded
    (before speed options), kept only for metrics that declare they need it. `clock` started with the
    job and collects where its time goes besides the calls (build, calibration, warm-ups, bound
    loops, profiles).
    """

    cfg: DictConfig
    device: torch.device
    options: SpeedOptions
    classifier: Classifier
    model: torch.nn.Module
    data: Images
    method_name: str
    method: Any
    method_traits: MethodTraits
    metrics: dict[str, Any]
    metric_traits: dict[str, MetricTraits]
    speed: ModelSpeed
    calibration: Calibration
    batchnorms_folded: int
    timing: TimingSettings
    clock: Stopwatch
    progress: Progress
    trained: torch.nn.Module | None = None


def _function_name(node: DictConfig) -> str:
    return str(node._target_).rsplit(".", 1)[-1]


def _check_device_config(node: DictConfig) -> None:
    budget = node.get("memory_budget")
    if not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise HarnessError(f"device.memory_budget={budget!r}; expected a fraction of free memory in (0, 1]")
    for key in ("batch_size", "grad_batch_size"):
        value = node.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise HarnessError(
                f"device.{key}={value!r}; expected null (chosen) or a positive number of images"
            )
    sizes = node.get("batch_sizes")
    if sizes is not None and (not sizes or any(not isinstance(b, int) or b < 1 for b in sizes)):
        raise HarnessError(f"device.batch_sizes={sizes!r}; expected null or a list of positive image counts")


def build(
    cfg: DictConfig,
    device: torch.device | None = None,
    calibration_dir: Path | None = None,
    clock: Stopwatch | None = None,
) -> Job:
    """Instantiate the job's model, data, method and metrics on its device, with its speed options.

    Every setting that can be checked without the model is checked first (device, timing, each
    metric's parameters), so that a bad value fails before any model work. When `device.batch_size`
    (plain forwards) or `device.grad_batch_size` (forward+backward) is null, the candidate
    `device.batch_sizes` that fit the memory budget are timed and the chunk size is chosen, once per
    sweep: the first job measures and writes the figures to `calibration_dir` (the sweep's folder),
    the others read them (see `harness.calibration`). The method and metric configs take their chunk
    sizes from these two through `${device.batch_size}` and `${device.grad_batch_size}`.
    """
    clock = clock or Stopwatch()
    options = SpeedOptions.from_config(cfg.device)
    _check_device_config(cfg.device)
    timing = _timing_settings(cfg)
    metric_fns = _metric_functions(cfg)
    name = _function_name(cfg.method)
    traits = _method_traits(get_method(str(cfg.method._target_)), name)
    device = device or resolve_device(cfg.device.name)
    options.apply_backend_flags()
    with clock("build"):
        clf: Classifier = instantiate(cfg.model)
        if _fill_model_defaults(cfg, clf):
            metric_fns = _metric_functions(cfg)  # their blocks were `auto`
        data = load_data(cfg.data, clf.input_size, clf.mean, clf.std, clf.class_names)
        _check_model_and_data(cfg, metric_fns, traits, name, clf, data)
        needs = {n for f in metric_fns.values() for n in metric_traits(f).needs}
        trained = copy.deepcopy(clf.module).to(device) if "trained" in needs else None
        folded = options.prepare(clf.module.to(device), data.images[:2].to(device), keep={clf.cam_layer})
        model = options.compiled(clf.module)
    # Only jobs whose method backpropagates (or whose metrics re-run it) time forward+backward passes.
    backprop = not _forward_only(cfg, traits) or (
        not traits.forward_only
        and any({"explain", "explain_with"} & metric_traits(f).needs for f in metric_fns.values())
    )
    kinds = ["forward"] + (["forward_backward"] if backprop else [])
    speed = ModelSpeed(model, data.images, device, options.memory_format)
    with clock("calibration"), options.autocast(device):
        facts = settings(cfg, device, options)
        calibration = calibrate(speed, clf.module, facts, kinds, available_memory(device), calibration_dir)
    cfg.device.batch_size = speed.batch_size
    cfg.device.grad_batch_size = speed.grad_batch_size
    metrics = {metric: instantiate(node) for metric, node in cfg.metric.items()}
    method = instantiate(cfg.method)
    progress = Progress(f"{name} on {clf.name}/{data.name}", cfg.get("progress"))
    declared = {m: metric_traits(f) for m, f in metrics.items()}
    return Job(
        cfg, device, options, clf, model, data, name, method, traits, metrics, declared, speed, calibration,
        folded, timing, clock, progress, trained,
    )  # fmt: skip


def _fill_model_defaults(cfg: DictConfig, clf: Classifier) -> bool:
    """Put what the builder chose for the model's `auto` settings (Grad-CAM's layer and layout, the
    sanity checks' blocks) into the config, where the method and metric configs read them
    (`${model.cam_layer}`, ...) and the row records them. Whether any was `auto`.
    """
    chosen = {"cam_layer": clf.cam_layer, "cam_layout": clf.cam_layout, "blocks": clf.blocks}
    filled = False
    for key, value in chosen.items():
        if key in cfg.model and cfg.model[key] in ("auto", None):
            cfg.model[key] = value
            filled = True
    return filled


def _check_model_and_data(
    cfg: DictConfig,
    metric_fns: dict[str, Any],
    traits: MethodTraits,
    method: str,
    clf: Classifier,
    data: Images,
) -> None:
    """What needs the model and the data but no model pass: ground truth where a metric or the
    method needs it, and the blocks a sanity check re-initialises.
    """
    from metrics.sanity import blocks_modules

    for name, fn in metric_fns.items():
        needs = metric_traits(fn).needs
        if "ground_truth" in needs and data.ground_truth is None:
            raise HarnessError(
                f"metric {name} needs ground truth (object masks or boxes), which data {data.name} does "
                "not have; use data=shapes, or image_folder with data.boxes=<VOC folder or CSV file>"
            )
        if "trained" in needs and "blocks" in fn.keywords:
            try:
                blocks_modules(clf.module, fn.keywords["blocks"])
            except ValueError as e:
                raise HarnessError(f"metric.{name}: {e} (model {clf.name})") from None
    if traits.ground_truth:
        if data.ground_truth is None:
            raise HarnessError(f"method {method} needs ground truth, which data {data.name} does not have")
        rerun = [n for n, f in metric_fns.items() if {"explain", "explain_with"} & metric_traits(f).needs]
        if rerun:
            raise HarnessError(
                f"method {method} draws its maps from the ground truth of the job's images, so metric "
                f"{rerun[0]} cannot re-run it on other inputs or models; leave {rerun[0]} out"
            )


def _method_traits(method: Any, name: str) -> MethodTraits:
    try:
        return method_traits(method)
    except TypeError as e:
        raise HarnessError(f"method {name}: {e}") from None


def _metric_functions(cfg: DictConfig) -> dict[str, Any]:
    """The selected metrics, built with their settings as given (chunk sizes may not be chosen yet),
    each checked by the metric's own `check`: a bad value fails here, before any model work.
    """
    if not cfg.metric:
        raise HarnessError("no metric selected; use e.g. metric=[deletion,insertion]")
    built = {}
    for name, node in cfg.metric.items():
        fn = instantiate(node)
        try:
            traits = metric_traits(fn)
        except TypeError as e:
            raise HarnessError(f"metric {name}: {e}") from None
        if {"explain", "explain_with"} & traits.needs and cfg.get("phase") == "evaluate":
            raise HarnessError(
                f"metric {name} re-runs the method, which phase=evaluate does not run; use phase=all"
            )
        if traits.check is not None:
            given = {k: v for k, v in fn.keywords.items() if not (k == "chunk_size" and v is None)}
            try:
                traits.check(**given)
            except ValueError as e:
                raise HarnessError(f"metric.{name}: {e}") from None
        built[str(name)] = fn
    return built


def _timing_settings(cfg: DictConfig) -> TimingSettings:
    node = cfg.get("timing") or {}
    known = sorted(TimingSettings.__dataclass_fields__)
    unknown = sorted(str(k) for k in node if k not in known)
    if unknown:
        raise HarnessError(f"timing.{unknown[0]} is not a timing setting; expected one of {', '.join(known)}")
    return TimingSettings.from_config(node)


def _forward_only(cfg: DictConfig, traits: MethodTraits) -> bool:
    """Whether the job's method runs plain forwards only: a forward-only method, or saved maps."""
    return traits.forward_only or cfg.get("phase") == "evaluate"


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


def explain_key(cfg: DictConfig, device: torch.device, weights: bool = True) -> str:
    """Hash of what determines a job's maps: the model, data and method settings (less the chunk
    size and the model's `blocks`, which change no map), the content of the model's weights file
    (unless `weights` is false), the seed, the device type and the precision. `phase=evaluate` finds
    the maps saved by an earlier sweep through it.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    method = {k: v for k, v in plain["method"].items() if k != "chunk_size"}
    model = {k: v for k, v in plain["model"].items() if k != "blocks"}  # the sanity checks' stages
    what = {"model": model, "data": plain["data"], "method": method, "seed": plain["seed"]}
    sha = weights_sha256(plain["model"]) if weights else None
    what |= {} if sha is None else {"weights_sha256": sha}
    return digest(what | {"device": device.type, "precision": plain["device"]["precision"]})


@cache
def _complete_jobs(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The finished sweep's complete jobs, read once per process: the jobs of an evaluate sweep that
    share a process (basic and joblib launchers) would otherwise each read every `run.json`.
    """
    return complete_jobs(root)


def saved_maps(
    cfg: DictConfig, key: str, device: torch.device
) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """The folder, row and arrays of the job in `cfg.maps_from` whose maps this job scores."""
    if not cfg.get("maps_from"):
        raise HarnessError("phase=evaluate needs maps_from=<folder of a sweep run with save_maps=true>")
    root = Path(cfg.maps_from)
    if not root.is_dir():
        raise HarnessError(f"maps_from={root}: no such folder; expected the folder of an earlier sweep")
    jobs = _complete_jobs(root)
    found = [(folder, row) for folder, row in jobs if row.get("explain_key") == key]
    other = [
        r for _, r in jobs if r.get("explain_key_any_weights") == explain_key(cfg, device, weights=False)
    ]
    if not found and other:
        ours = weights_sha256(OmegaConf.to_container(cfg.model, resolve=True))
        raise HarnessError(
            f"maps_from={root} holds maps of {other[0]['model']} with weights sha256 "
            f"{other[0].get('weights_sha256')}; this job's weights ({cfg.model.get('weights')}) have sha256 "
            f"{ours}: the checkpoint changed since those maps were made; run phase=all"
        )
    if not found:
        model = cfg.model.get("arch") or _function_name(cfg.model)
        this = f"{model}/{_function_name(cfg.data)}/{_function_name(cfg.method)} seed {cfg.seed}"
        there = sorted({f"{r['model']}/{r['data']}/{r['method']} seed {r['seed']}" for _, r in jobs})
        raise HarnessError(
            f"maps_from={root} holds no maps of {this} with these method, data, device and precision "
            f"settings; it holds: {', '.join(there) or 'no complete job'}"
        )
    folder, row = found[0]
    arrays = read_maps(folder)
    if not bool(arrays["full"]):
        raise HarnessError(f"{folder} kept display maps only (save_maps=false); run it with save_maps=true")
    return folder, row, arrays


def run_job(
    cfg: DictConfig, out: Path, calibration_dir: Path | None = None, started: float | None = None
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
    """
    clock = Stopwatch(started)
    if cfg.phase not in PHASES:
        raise HarnessError(f"phase={cfg.phase!r}; expected one of {', '.join(PHASES)}")
    config = config_hash(cfg)  # before build() fills in the chosen chunk sizes
    with job_device(resolve_device(cfg.device.name)) as device:
        key = explain_key(cfg, device)
        source = saved_maps(cfg, key, device) if cfg.phase == "evaluate" else None
        weights = {  # what identifies the weights, before build() fills in the model's `auto` settings
            "weights_sha256": weights_sha256(OmegaConf.to_container(cfg.model, resolve=True)),
            "explain_key_any_weights": explain_key(cfg, device, weights=False),
        }
        job = build(cfg, device, calibration_dir, clock)
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
    job: Job,
    out: Path,
    config: str,
    key: str,
    source: tuple[Path, dict[str, Any], dict[str, np.ndarray]] | None,
    weights: dict[str, Any],
) -> dict[str, Any]:
    cfg, dev, seed, opts = job.cfg, job.device, int(job.cfg.seed), job.options
    eager = job.classifier.module
    x = job.data.images.to(dev).contiguous(memory_format=opts.memory_format)
    with torch.no_grad():  # the class to explain: the eager model's fp32 top-1, whatever the options
        probs = eager(x).float().softmax(dim=1)
    target = probs.argmax(dim=1)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    measured: dict[str, Measured] = {}
    if source is None:
        maps, method_fields = _attribute(job, x, target, measured)
    else:
        maps, target, method_fields = _reuse(job, source)
    results = {name: _score(job, name, x, maps, target, measured) for name in job.metrics}
    row = (
        job_fields(job, config, key, None if source is None else source[0], target, measured)
        | weights
        | method_fields
    )
    for name, result in results.items():
        better = job.metric_traits[name].better
        row |= metric_fields(name, result, better, measured[name], cfg.metric[name], seed)
    row["metrics_s"] = sum(measured[name].timing.total_ms for name in results) / 1e3
    row |= environment(dev)
    with job.clock("write"):
        curves_df, scores_df = tables(job, results, target, probs)
        files_ = {"curves.csv": curves_df, "scores.csv": scores_df, "kernels.csv": kernels_table(measured)}
        arrays = source[2] if source is not None else maps_arrays(job, maps, target, key, bool(cfg.save_maps))
        arrays = arrays | {
            field_name(name, k): v.cpu().numpy() for name, r in results.items() for k, v in r.arrays.items()
        }
        files = write_files(out, files_, arrays)
    row |= breakdown(job.clock, row)
    write_row(out, row, files)
    return row


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
    metric, needs, seed = job.metrics[name], job.metric_traits[name].needs, int(job.cfg.seed)
    extra: dict[str, Any] = {}
    model = job.model
    if "normalization" in needs:
        extra |= {"mean": tuple(job.classifier.mean), "std": tuple(job.classifier.std)}
    if "explain" in needs:
        extra["explain"], model = _explainer(job)
    if "explain_with" in needs:
        extra["explain_with"] = _explainer_with(job)
    if "trained" in needs:
        extra["trained"] = job.trained
    truth = _ground_truth(job) if "ground_truth" in needs else None

    def score(rows: slice, chunk: int | None) -> Result:
        seed_all(seed)  # random draws (substrates, perturbations, imputation noise) the same on every call
        more = {} if truth is None else {"ground_truth": truth[rows]}
        return metric(model, x[rows], maps[rows], target[rows], chunk_size=chunk, **extra, **more)

    with job.options.autocast(job.device):
        measured[name] = _measure(job, model, score, metric.keywords["chunk_size"], f"metric {name}")
    result = measured[name].out
    if not isinstance(result, Result):
        raise HarnessError(f"metric {name} returned {type(result).__name__}; expected metrics.Result")
    return result


def _explain(job: Job, model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One re-run of the job's method on `model`, seeded as every call (a stochastic method draws the
    same numbers for a perturbed input, or a randomised model, as for the original).
    """
    seed_all(int(job.cfg.seed))
    return job.method(model, inputs, target).detach()


def _explainer(job: Job) -> tuple[Any, torch.nn.Module]:
    """The job's method as `explain(inputs, target) -> maps`, for metrics that re-run it, and the model
    it runs (whose passes the metric's timing counts).
    """
    model = job.classifier.module if job.method_traits.eager_only else job.model
    return (lambda inputs, target: _explain(job, model, inputs, target)), model


def _explainer_with(job: Job) -> Any:
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
            return _explain(job, prepared, inputs, target)
        finally:
            for h in handles:
                h.remove()

    return explain_with


def _ground_truth(job: Job) -> Any:
    truth = job.data.ground_truth
    if truth is None:  # checked in build(); kept for callers that build a Job by hand
        raise HarnessError(f"data {job.data.name} has no ground truth")
    return truth.to(job.device)


def _measure(job: Job, model: torch.nn.Module, call: Any, chunk: int | None, what: str) -> Measured:
    return measure_call(
        call,
        model=model,
        device=job.device,
        speed=job.speed,
        chunk=chunk,
        n=len(job.data.ids),
        what=what,
        settings=job.timing,
        clock=job.clock,
        progress=job.progress,
    )


def _attribute(
    job: Job, x: torch.Tensor, target: torch.Tensor, measured: dict[str, Measured]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the job's method, timed and profiled (into `measured`); the maps and the row's method fields."""
    dev, opts = job.device, job.options
    method_model = job.classifier.module if job.method_traits.eager_only else job.model
    seed = int(job.cfg.seed)

    truth = _ground_truth(job) if job.method_traits.ground_truth else None

    def attribute(rows: slice, chunk: int | None) -> torch.Tensor:
        seed_all(seed)  # stochastic methods: the same draws on every call
        sizes = {} if chunk is None else {"chunk_size": chunk}
        if truth is not None:
            sizes["ground_truth"] = truth[rows]
        return job.method(method_model, x[rows], target[rows], **sizes)

    chunk = job.method.keywords.get("chunk_size")
    with opts.autocast(dev):
        measured["method"] = _measure(job, method_model, attribute, chunk, f"method {job.method_name}")
    maps = check_attributions(measured["method"].out, x, job.method_name).detach().float()
    fields = {
        "method_compiled": opts.compile is not None and method_model is not job.classifier.module,
        **measured["method"].fields("method"),
        **params("method", job.cfg.method),
    }
    return maps, fields


def _reuse(
    job: Job, source: tuple[Path, dict[str, Any], dict[str, np.ndarray]]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Saved maps and their targets on the job's device, and the source row's method fields."""
    folder, row, arrays = source
    ids = [str(i) for i in arrays["ids"]]
    if ids != list(job.data.ids):
        raise HarnessError(f"{folder} saved maps of images {ids}; this job's data has {list(job.data.ids)}")
    maps = torch.from_numpy(arrays["maps"]).to(job.device)
    target = torch.from_numpy(arrays["target"]).to(job.device)
    fields = {k: v for k, v in row.items() if k.startswith("method") and k != "method"}
    return maps, target, fields
