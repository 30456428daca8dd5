"""The row schema of a job, in one place: what `run.json` (and so `summary.csv`) holds, and the job's
tables (`curves.csv`, `scores.csv`) and arrays (`attributions.npz`).

A row has the job's description (`job_fields`), the method's call (`method_*`, `harness.measured`),
for each metric value `<field>` (`metrics.field_name`: `deletion_auc`, `road_morf_auc`, `sparseness`)
its mean over images with `<field>_low` and `<field>_high` (95% bootstrap interval) and `<field>_better`
(`higher` or `lower`, as the metric declares), each metric's call (`<metric>_ms_per_image`, ...) and
settings (`<metric>.<param>`), the environment and where the job's time went (`breakdown`).
"""

from __future__ import annotations

import json
import platform
import subprocess
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import captum
import numpy as np
import pandas as pd
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf

from harness.measured import Measured
from harness.results import bootstrap_ci
from harness.timing import Stopwatch, machine_id, peak_memory_mb
from metrics import Result, field_name

if TYPE_CHECKING:
    from harness.run import Job

REPO = Path(__file__).resolve().parents[1]
# Where a job's time goes besides its calls, in the order of the row's overhead_* fields.
TOP_K = 5  # predictions per image in scores.csv, for the report's example browser
OVERHEAD = ("build", "calibration", "warmup", "bound_loops", "profile", "write")


def params(prefix: str, node: DictConfig) -> dict[str, Any]:
    """A config node's settings as row fields `<prefix>.<key>` (Hydra's `_target_` and such left out)."""
    plain = OmegaConf.to_container(node, resolve=True)
    assert isinstance(plain, dict)
    return {f"{prefix}.{k!s}": v for k, v in plain.items() if not str(k).startswith("_")}


def job_fields(
    job: Job,
    config: str,
    key: str,
    maps_from: Path | None,
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
        **{f"model_{k}": v for k, v in job.classifier.facts.items()},
        "data": job.data.name,
        "ground_truth": job.data.ground_truth is not None,
        "method": job.method_name,
        "device": job.device.type,
        "device_config": cfg.device.name,
        **job.options.row(),
        "batchnorms_folded": job.batchnorms_folded,
        "n_images": len(job.data.ids),
        "seed": int(cfg.seed),
        "phase": cfg.phase,
        "maps_from": None if maps_from is None else str(maps_from),
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
        **(params("timing", cfg.timing) if "timing" in cfg else {}),
    }


def metric_fields(
    name: str, result: Result, better: Mapping[str, str], measured: Measured, node: DictConfig, seed: int
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
    return row | measured.fields(name) | params(name, node)


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


def tables(
    job: Job, results: dict[str, Result], target: torch.Tensor, probs: torch.Tensor
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`curves.csv` (long: metric curve, image, point, fraction, score) and `scores.csv` (per image:
    label and its name (empty where the image has none), target, its probability, the top-5 classes
    `top<k>`, `top<k>_name`, `top<k>_prob` (fewer for a model of fewer classes), every metric value).
    """
    ids = job.data.ids
    long = []
    for name, result in results.items():
        for key, c in result.curves.items():
            curve, scores, fractions = field_name(name, key), c.scores.cpu(), c.fractions.cpu()
            for i, image in enumerate(ids):
                for p in range(len(fractions)):
                    long.append((curve, image, p, float(fractions[p]), float(scores[i, p])))
    curves_df = pd.DataFrame(long, columns=["metric", "image_id", "point", "fraction", "score"])
    t, names = target.cpu(), job.classifier.class_names
    top = probs.float().cpu().topk(min(TOP_K, probs.shape[1]), dim=1)
    ranked: dict[str, list] = {}
    for k in range(top.indices.shape[1]):
        classes = top.indices[:, k].tolist()
        ranked |= {
            f"top{k + 1}": classes,
            f"top{k + 1}_name": [names[c] for c in classes],
            f"top{k + 1}_prob": top.values[:, k].tolist(),
        }
    labels = job.data.labels.tolist()
    values = {
        field_name(name, key): v.float().cpu().tolist()
        for name, r in results.items()
        for key, v in r.values.items()
    }
    scores_df = pd.DataFrame(
        {
            "image_id": ids,
            "label": labels,
            "label_name": [names[c] if 0 <= c < len(names) else "" if c < 0 else str(c) for c in labels],
            "target": t.tolist(),
            "target_name": [names[i] for i in t.tolist()],
            "target_prob": probs.cpu().gather(1, t[:, None])[:, 0].tolist(),
            **ranked,
            **values,
        }
    )
    return curves_df, scores_df


def maps_arrays(
    job: Job, maps: torch.Tensor, target: torch.Tensor, key: str, full: bool
) -> dict[str, np.ndarray]:
    """What `attributions.npz` holds: the maps as the method returned them (`[B, 1 or C, H, W]`,
    float32) when `full`, else summed over channels in float16 for display only; the image ids,
    labels, targets and their names; the images as displayed (uint8); the method and its settings;
    the ground truth's masks and boxes (`truth_mask`, `truth_box`, `[N, H, W]` bool) where the data has it.
    """
    mean = torch.tensor(job.classifier.mean)[:, None, None]
    std = torch.tensor(job.classifier.std)[:, None, None]
    pixels = (job.data.images * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    kept = maps.float() if full else maps.sum(dim=1, keepdim=True).half()
    truth = job.data.ground_truth
    known = (
        {}
        if truth is None
        else {"truth_mask": truth.mask.cpu().numpy(), "truth_box": truth.box.cpu().numpy()}
    )
    return known | {
        "maps": kept.cpu().numpy(),
        "full": np.array(full),
        "ids": np.array(job.data.ids, dtype=str),
        "label": job.data.labels.cpu().numpy(),
        "target": target.cpu().numpy(),
        "target_names": np.array([job.classifier.class_names[i] for i in target.tolist()], dtype=str),
        "images": pixels.numpy(),
        "method": np.array(job.method_name),
        "method_params": np.array(json.dumps(params("method", job.cfg.method))),
        "explain_key": np.array(key),
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
