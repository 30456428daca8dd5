"""The row schema of a job, in one place: what `run.json` (and so `summary.csv`) holds, and the job's
tables (`curves.csv`, `scores.csv`) and arrays (`attributions.npz`).

A row has the job's description (`job_fields`), the method's call (`method_*`, `harness.job.measured`)
and the mean of each per-image value the method found besides its maps (`method_fit_r2` of LIME and
KernelSHAP: `methods.common.with_extras`; the values themselves, and the region maps, are
`method_<name>` in `attributions.npz`),
for each metric value `<field>` (`metrics.field_name`: `deletion_auc`, `road_morf_auc`, `sparseness`)
its mean over images with `<field>_low` and `<field>_high` (95% bootstrap interval) and `<field>_better`
(`higher` or `lower`, as the metric declares), each metric's call (`<metric>_ms_per_image`, ...) and
settings (`<metric>.<param>`), the environment and where the job's time went (`breakdown`).
"""

from __future__ import annotations

import dataclasses
import platform
import subprocess
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import captum
import torch
import torchvision
from omegaconf import DictConfig, ListConfig, OmegaConf

from harness.job.builder import Job, settings_of
from harness.job.measured import Measured
from harness.runtime import Stopwatch, machine_id, peak_memory_mb
from metrics import Result, field_name

REPO = Path(__file__).resolve().parents[2]
# Where a job's time goes besides its calls, in the order of the row's overhead_* fields.
OVERHEAD = ("build", "calibration", "warmup", "bound_loops", "profile", "write")


def _plain(value: Any) -> Any:
    return (
        OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    )


def params(prefix: str, fn: Any) -> dict[str, Any]:
    """The settings a method or metric runs with (the keywords of its partial: the config's, with
    what the job chose for it) as row fields `<prefix>.<key>`; tensors the job bound (a method's
    reference images) are recorded by the job under their ids instead.
    """
    return {f"{prefix}.{k}": _plain(v) for k, v in settings_of(fn).items() if not isinstance(v, torch.Tensor)}


def bootstrap_ci(
    values: torch.Tensor, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over images.

    Example:
        >>> lo, hi = bootstrap_ci(torch.tensor([0.2, 0.4, 0.6, 0.8]))
        >>> 0.2 <= lo < 0.5 < hi <= 0.8
        True
    """
    v = values.detach().double().cpu()
    if len(v) < 2:
        return float(v.mean()), float(v.mean())
    g = torch.Generator().manual_seed(seed)
    means = v[torch.randint(len(v), (resamples, len(v)), generator=g)].mean(dim=1)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(lo), float(hi)


def job_fields(
    job: Job,
    config: str,
    key: str,
    maps_from: Path | None,
    target: torch.Tensor,
    measured: dict[str, Measured],
) -> dict[str, Any]:
    """The row's fields that describe the job: what ran, where, with which settings and speeds."""
    settings, speed, calib = job.settings, job.speed, job.calibration
    backward = calib.memory.get("forward_backward") if job.speed.grad_batch_size else None
    profiles = [m.profile for m in measured.values() if m.profile is not None]
    return {
        "model": job.classifier.name,
        "pretrained": job.classifier.pretrained,
        "model_seed": job.classifier.seed,
        **{f"model_{k}": v for k, v in job.classifier.facts.items()},
        "data": job.data.name,
        "ground_truth": job.data.ground_truth is not None,
        "method": job.method_name,
        "device": job.device.type,
        "device_config": settings.device.name,
        **job.options.row(),
        "batchnorms_folded": job.batchnorms_folded,
        "n_images": len(job.data.ids),
        "seed": settings.job.seed,
        "phase": settings.job.phase,
        "maps_from": None if maps_from is None else str(maps_from),
        "config_hash": config,
        "explain_key": key,
        "input_size": job.classifier.input_size,
        "batch_size": speed.batch_size,
        "grad_batch_size": speed.grad_batch_size,
        "calibration": calib.source,
        "calibration_key": calib.key,
        "memory_budget": float(settings.device.memory_budget),
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
        **{f"timing.{k}": v for k, v in dataclasses.asdict(settings.timing).items()},
    }


def metric_fields(
    name: str, result: Result, better: Mapping[str, str], measured: Measured, fn: Any, seed: int
) -> dict[str, Any]:
    """A metric's fields: each value's mean, 95% bootstrap interval and direction (`better`, as the
    metric declares it), its call and its settings.
    """
    row: dict[str, Any] = {}
    for key, values in result.values.items():
        f = field_name(name, key)
        low, high = bootstrap_ci(values, seed=seed)
        row |= {
            f: float(values.float().mean()),
            f"{f}_low": low,
            f"{f}_high": high,
            f"{f}_better": better[key],
        }
    return row | measured.fields(name) | params(name, fn)


def breakdown(clock: Stopwatch, row: dict[str, Any]) -> dict[str, Any]:
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


def _agreement(target: torch.Tensor, labels: torch.Tensor) -> float | None:
    known = labels >= 0
    if not known.any():
        return None
    return float((target.cpu()[known] == labels[known]).float().mean())


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


def environment(dev: torch.device) -> dict[str, Any]:
    """Where the job ran: peak memory, GPU, machine, threads, versions, commit."""
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


def headline(row: dict[str, Any], fields: list[str]) -> str:
    """The job's one line in the log: each value with its interval, the method's cost, the overhead."""
    scores = ", ".join(f"{f} {row[f]:.3g} [{row[f'{f}_low']:.3g}, {row[f'{f}_high']:.3g}]" for f in fields)
    ratio = row["method_bound_ratio"]
    cost = "no model passes" if ratio is None else f"{ratio:.2f}x its forward bound"
    return (
        f"{row['method']} on {row['model']}/{row['data']} ({row['device']}, {row['n_images']} images): "
        f"{scores}; {row['method_ms_per_image']:.1f} ms/image, {cost}; job {row['job_s']:.1f} s, "
        f"{row['overhead_share']:.0%} of it overhead"
    )
