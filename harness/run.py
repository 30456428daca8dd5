"""One job: one (model, data, method, device, seed) cell of a sweep (`harness.app` is the Hydra app).

`build(cfg)` does all instantiation; `run_job` attributes (or, with `phase=evaluate`, loads saved
maps), scores, times and writes the job's results.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import captum
import numpy as np
import pandas as pd
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from harness.calibration import Calibration, calibrate, settings
from harness.data import Images
from harness.device import SpeedOptions, available_memory, fold_batchnorm, job_device, resolve_device
from harness.errors import HarnessError
from harness.measured import Measured, TimingSettings, kernels_table, measure_call
from harness.model_speed import ModelSpeed
from harness.models import Classifier
from harness.progress import Progress
from harness.results import bootstrap_ci, read_maps, write_files, write_row
from harness.resume import complete_jobs, config_hash, digest
from harness.timing import Stopwatch, machine_id, peak_memory_mb
from methods import EAGER_ONLY, FORWARD_ONLY
from methods.common import seed_all
from metrics import Curve

log = logging.getLogger("harness")
REPO = Path(__file__).resolve().parents[1]
PHASES = ("all", "evaluate")

__all__ = ["HarnessError", "Job", "build", "run_job"]


@dataclass
class Job:
    """Everything a job needs, built from its config.

    `model` is what methods and metrics call: the classifier's module, compiled when the device
    config asks for it (`classifier.module` stays eager). `clock` started with the job and collects
    where its time goes besides the calls (build, calibration, warm-ups, bound loops, profiles).
    """

    cfg: DictConfig
    device: torch.device
    options: SpeedOptions
    classifier: Classifier
    model: torch.nn.Module
    data: Images
    method_name: str
    method: Any
    metrics: dict[str, Any]
    speed: ModelSpeed
    calibration: Calibration
    batchnorms_folded: int
    timing: TimingSettings
    clock: Stopwatch
    progress: Progress


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

    When `device.batch_size` (plain forwards) or `device.grad_batch_size` (forward+backward) is
    null, the candidate `device.batch_sizes` that fit the memory budget are timed and the largest at
    the model's best speed is kept, once per sweep: the first job measures and writes the figures to
    `calibration_dir` (the sweep's folder), the others read them (see `harness.calibration`). The
    method and metric configs take their chunk sizes from these two through `${device.batch_size}`
    and `${device.grad_batch_size}`.
    """
    clock = clock or Stopwatch()
    options = SpeedOptions.from_config(cfg.device)
    _check_device_config(cfg.device)
    timing = _timing_settings(cfg)
    device = device or resolve_device(cfg.device.name)
    options.apply_backend_flags()
    with clock("build"):
        clf: Classifier = instantiate(cfg.model)
        data: Images = instantiate(cfg.data, size=clf.input_size, mean=clf.mean, std=clf.std)
        clf.module.to(device).to(memory_format=options.memory_format)
        folded = 0
        if options.fold_batchnorm:
            sample = data.images[:2].to(device).contiguous(memory_format=options.memory_format)
            folded = fold_batchnorm(clf.module, sample)
        model = options.compiled(clf.module)
    name = _function_name(cfg.method)
    # Only jobs whose method backpropagates time and size forward+backward passes.
    kinds = ["forward"] + ([] if _forward_only(cfg, name) else ["forward_backward"])
    speed = ModelSpeed(model, data.images, device, options.memory_format)
    with clock("calibration"), options.autocast(device):
        facts = settings(cfg, device, options)
        calibration = calibrate(speed, clf.module, facts, kinds, available_memory(device), calibration_dir)
    cfg.device.batch_size = speed.batch_size
    cfg.device.grad_batch_size = speed.grad_batch_size
    metrics = {metric: instantiate(node) for metric, node in cfg.metric.items()}
    if not metrics:
        raise HarnessError("no metric selected; use e.g. metric=[deletion,insertion]")
    method = instantiate(cfg.method)
    progress = Progress(f"{name} on {clf.name}/{data.name}", cfg.get("progress"))
    return Job(
        cfg, device, options, clf, model, data, name, method, metrics, speed, calibration, folded, timing,
        clock, progress,
    )  # fmt: skip


def _timing_settings(cfg: DictConfig) -> TimingSettings:
    node = cfg.get("timing") or {}
    known = sorted(TimingSettings.__dataclass_fields__)
    unknown = sorted(str(k) for k in node if k not in known)
    if unknown:
        raise HarnessError(f"timing.{unknown[0]} is not a timing setting; expected one of {', '.join(known)}")
    return TimingSettings.from_config(node)


def _forward_only(cfg: DictConfig, method: str) -> bool:
    """Whether the job runs plain forwards only: a forward-only method, or scoring saved maps."""
    return method in FORWARD_ONLY or cfg.get("phase") == "evaluate"


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


def _params(prefix: str, node: DictConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(node, resolve=True)
    assert isinstance(plain, dict)
    return {f"{prefix}.{k!s}": v for k, v in plain.items() if not str(k).startswith("_")}


@cache
def git_commit() -> str | None:
    """The repository's commit, with `+dirty` when tracked files have changed."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+dirty" if dirty else "")


def explain_key(cfg: DictConfig, device: torch.device) -> str:
    """Hash of what determines a job's maps: the model, data and method settings (less the chunk
    size, which changes no answer), the seed, the device type and the precision. `phase=evaluate`
    finds the maps saved by an earlier sweep through it.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    method = {k: v for k, v in plain["method"].items() if k != "chunk_size"}
    what = {"model": plain["model"], "data": plain["data"], "method": method, "seed": plain["seed"]}
    return digest(what | {"device": device.type, "precision": plain["device"]["precision"]})


@cache
def _complete_jobs(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The finished sweep's complete jobs, read once per process: the jobs of an evaluate sweep that
    share a process (basic and joblib launchers) would otherwise each read every `run.json`.
    """
    return complete_jobs(root)


def saved_maps(cfg: DictConfig, key: str) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """The folder, row and arrays of the job in `cfg.maps_from` whose maps this job scores."""
    if not cfg.get("maps_from"):
        raise HarnessError("phase=evaluate needs maps_from=<folder of a sweep run with save_maps=true>")
    root = Path(cfg.maps_from)
    if not root.is_dir():
        raise HarnessError(f"maps_from={root}: no such folder; expected the folder of an earlier sweep")
    jobs = _complete_jobs(root)
    found = [(folder, row) for folder, row in jobs if row.get("explain_key") == key]
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
        source = saved_maps(cfg, key) if cfg.phase == "evaluate" else None
        job = build(cfg, device, calibration_dir, clock)
        log.info("%s: started", _label(job))
        with job.progress:
            row = _run(job, out, config, key, source)
        log.info(_headline(row, list(job.metrics)))
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
    curves: dict[str, Curve] = {}
    for name, metric in job.metrics.items():

        def score(rows: slice, chunk: int | None, metric: Any = metric) -> Curve:
            seed_all(seed)  # a random substrate draws the same noise on every call
            return metric(job.model, x[rows], maps[rows], target[rows], chunk_size=chunk)

        with opts.autocast(dev):
            measured[name] = _measure(job, job.model, score, metric.keywords["chunk_size"], f"metric {name}")
        curves[name] = measured[name].out
    row = _row(job, config, key, source, target, measured) | method_fields
    for name, curve in curves.items():
        low, high = bootstrap_ci(curve.auc, seed=seed)
        row |= {f"{name}_auc": float(curve.auc.mean()), f"{name}_auc_low": low, f"{name}_auc_high": high}
        row |= measured[name].fields(name) | _params(name, cfg.metric[name])
    row["metrics_s"] = sum(measured[name].timing.total_ms for name in curves) / 1e3
    row |= _environment(dev)
    with job.clock("write"):
        curves_df, scores_df = _tables(job, curves, target, probs)
        tables = {"curves.csv": curves_df, "scores.csv": scores_df, "kernels.csv": kernels_table(measured)}
        arrays = source[2] if source is not None else _maps(job, maps, target, key, bool(cfg.save_maps))
        files = write_files(out, tables, arrays)
    row |= _breakdown(job.clock, row)
    write_row(out, row, files)
    return row


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


# Where a job's time goes besides its calls, in the order of the row's overhead_* fields.
OVERHEAD = ("build", "calibration", "warmup", "bound_loops", "profile", "write")


def _breakdown(clock: Stopwatch, row: dict[str, Any]) -> dict[str, Any]:
    """`job_s` (the job's wall time so far: all but writing `run.json`), the time in the calls
    (`method_s`, `metrics_s`) and the rest (`overhead_s`), split into `overhead_<part>_s` and
    `overhead_other_s` (imports, the top-1 forward, tables, the resume check).
    """
    job_s = clock.elapsed()
    calls = (row.get("method_s") or 0.0) if row["phase"] == "all" else 0.0
    overhead = job_s - calls - row["metrics_s"]
    parts = {f"overhead_{k}_s": clock.spent.get(k, 0.0) for k in OVERHEAD}
    return {
        "job_s": job_s,
        "overhead_s": overhead,
        "overhead_share": overhead / job_s if job_s > 0 else None,
        **parts,
        "overhead_other_s": overhead - sum(parts.values()),
    }


def _row(
    job: Job,
    config: str,
    key: str,
    source: tuple[Path, dict[str, Any], dict[str, np.ndarray]] | None,
    target: torch.Tensor,
    measured: dict[str, Measured],
) -> dict[str, Any]:
    """The row's fields that describe the job: what ran, where, with which settings and speeds."""
    cfg, speed, calib = job.cfg, job.speed, job.calibration
    backward = calib.memory.get("forward_backward") if job.speed.grad_batch_size else None
    profiles = [m.profile for m in measured.values() if m.profile is not None]
    return {
        "model": job.classifier.name,
        "pretrained": job.classifier.pretrained,
        "model_seed": job.classifier.seed,
        "data": job.data.name,
        "method": job.method_name,
        "device": job.device.type,
        "device_config": cfg.device.name,
        **job.options.row(),
        "batchnorms_folded": job.batchnorms_folded,
        "n_images": len(job.data.ids),
        "seed": int(cfg.seed),
        "phase": cfg.phase,
        "maps_from": None if source is None else str(source[0]),
        "config_hash": config,
        "explain_key": key,
        "input_size": job.classifier.input_size,
        "batch_size": speed.batch_size,
        "grad_batch_size": speed.grad_batch_size,
        "calibration": calib.source,
        "calibration_key": calib.key,
        "memory_budget": float(cfg.device.memory_budget),
        "memory_budget_mb": calib.budget / 2**20,
        "forward_mb_per_image": calib.memory["forward"].per_image / 2**20,
        "forward_backward_mb_per_image": None if backward is None else backward.per_image / 2**20,
        "memory_estimate": calib.memory["forward"].how,
        "top1_equals_label": _agreement(target, job.data.labels),
        "forward_ms_per_image": speed.forward_ms,
        "forward_backward_ms_per_image": speed.forward_backward_ms,
        "forward_ms_by_batch": {str(k): v for k, v in speed.per_batch_ms["forward"].items()},
        "forward_backward_ms_by_batch": {str(k): v for k, v in speed.per_batch_backward_ms.items()},
        "kernel_kind": profiles[0].kind if profiles else None,
        **(_params("timing", cfg.timing) if "timing" in cfg else {}),
    }


def _attribute(
    job: Job, x: torch.Tensor, target: torch.Tensor, measured: dict[str, Measured]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the job's method, timed and profiled (into `measured`); the maps and the row's method fields."""
    dev, opts = job.device, job.options
    method_model = job.classifier.module if job.method_name in EAGER_ONLY else job.model
    seed = int(job.cfg.seed)

    def attribute(rows: slice, chunk: int | None) -> torch.Tensor:
        seed_all(seed)  # stochastic methods: the same draws on every call
        sizes = {} if chunk is None else {"chunk_size": chunk}
        return job.method(method_model, x[rows], target[rows], **sizes)

    chunk = job.method.keywords.get("chunk_size")
    with opts.autocast(dev):
        measured["method"] = _measure(job, method_model, attribute, chunk, f"method {job.method_name}")
    maps = check_attributions(measured["method"].out, x, job.method_name).detach().float()
    fields = {
        "method_compiled": opts.compile is not None and method_model is not job.classifier.module,
        **measured["method"].fields("method"),
        **_params("method", job.cfg.method),
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


def _agreement(target: torch.Tensor, labels: torch.Tensor) -> float | None:
    known = labels >= 0
    if not known.any():
        return None
    return float((target.cpu()[known] == labels[known]).float().mean())


def _environment(dev: torch.device) -> dict[str, Any]:
    return {
        "peak_mem_mb": peak_memory_mb(dev),
        "peak_mem_kind": "cuda_allocated" if dev.type == "cuda" else "process_rss",
        "gpu_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "machine": machine_id(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "captum_version": captum.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
    }


def _tables(
    job: Job, curves: dict[str, Curve], target: torch.Tensor, probs: torch.Tensor
) -> tuple[pd.DataFrame, pd.DataFrame]:
    ids = job.data.ids
    long = []
    for name, c in curves.items():
        scores, fractions = c.scores.cpu(), c.fractions.cpu()
        for i, image in enumerate(ids):
            for p in range(len(fractions)):
                long.append((name, image, p, float(fractions[p]), float(scores[i, p])))
    curves_df = pd.DataFrame(long, columns=["metric", "image_id", "point", "fraction", "score"])
    t = target.cpu()
    scores_df = pd.DataFrame(
        {
            "image_id": ids,
            "label": job.data.labels.tolist(),
            "target": t.tolist(),
            "target_name": [job.classifier.class_names[i] for i in t.tolist()],
            "target_prob": probs.cpu().gather(1, t[:, None])[:, 0].tolist(),
            **{f"{name}_auc": c.auc.cpu().tolist() for name, c in curves.items()},
        }
    )
    return curves_df, scores_df


def _maps(job: Job, maps: torch.Tensor, target: torch.Tensor, key: str, full: bool) -> dict[str, np.ndarray]:
    """What `attributions.npz` holds: the maps as the method returned them (`[B, 1 or C, H, W]`,
    float32) when `full`, else summed over channels in float16 for display only; the image ids,
    labels, targets and their names; the images as displayed (uint8); the method and its settings.
    """
    mean = torch.tensor(job.classifier.mean)[:, None, None]
    std = torch.tensor(job.classifier.std)[:, None, None]
    pixels = (job.data.images * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    kept = maps.float() if full else maps.sum(dim=1, keepdim=True).half()
    return {
        "maps": kept.cpu().numpy(),
        "full": np.array(full),
        "ids": np.array(job.data.ids, dtype=str),
        "label": job.data.labels.cpu().numpy(),
        "target": target.cpu().numpy(),
        "target_names": np.array([job.classifier.class_names[i] for i in target.tolist()], dtype=str),
        "images": pixels.numpy(),
        "method": np.array(job.method_name),
        "method_params": np.array(json.dumps(_params("method", job.cfg.method))),
        "explain_key": np.array(key),
    }


def _headline(row: dict[str, Any], metrics: list[str]) -> str:
    scores = ", ".join(
        f"{m} {row[f'{m}_auc']:.3f} [{row[f'{m}_auc_low']:.3f}, {row[f'{m}_auc_high']:.3f}]" for m in metrics
    )
    ratio = row["method_bound_ratio"]
    cost = "no model passes" if ratio is None else f"{ratio:.2f}x its forward bound"
    return (
        f"{row['method']} on {row['model']}/{row['data']} ({row['device']}, {row['n_images']} images): "
        f"{scores}; {row['method_ms_per_image']:.1f} ms/image, {cost}; job {row['job_s']:.1f} s, "
        f"{row['overhead_share']:.0%} of it overhead"
    )
