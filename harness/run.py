"""Entry point: `python -m harness` runs jobs, one (model, data, method, device, seed) cell each.

`build(cfg)` does all instantiation; `run_job` attributes, scores, times and writes the job's results.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import sys
import warnings
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import captum
import hydra
import pandas as pd
import torch
import torchvision
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from harness.data import Images
from harness.models import Classifier
from harness.results import bootstrap_ci, write_job
from harness.timing import ModelSpeed, Timing, machine_id, measure, peak_memory_mb
from methods.common import seed_all
from metrics import Curve

log = logging.getLogger("harness")
REPO = Path(__file__).resolve().parents[1]
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32",)
# Cheap calls repeat while 2 s last, up to 5 times; a call over 2 s is timed once. Each timed call
# carries its own bound, measured beside it, so a slow minute on the machine slows both alike.
REPEATS: dict[str, Any] = {"min_repeats": 1, "max_repeats": 5, "budget_s": 2.0}


class HarnessError(Exception):
    """Bad input: the message names the bad value and what would be right."""


@dataclass
class Job:
    """Everything a job needs, built from its config."""

    cfg: DictConfig
    device: torch.device
    classifier: Classifier
    data: Images
    method_name: str
    method: Any
    metrics: dict[str, Any]
    speed: ModelSpeed


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when torch sees a GPU, else cpu; `cuda` without one is an error."""
    if name not in DEVICES:
        raise HarnessError(f"device.name={name!r}; expected one of {DEVICES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HarnessError(
            f"device=cuda but torch {torch.__version__} sees no CUDA GPU "
            f"(built for CUDA {torch.version.cuda}); use device=cpu or device=auto"
        )
    return torch.device(name)


def _function_name(node: DictConfig) -> str:
    return str(node._target_).rsplit(".", 1)[-1]


def build(cfg: DictConfig) -> Job:
    """Instantiate the job's model, data, method and metrics on its device.

    When `device.batch_size` is null, the model's forward is timed at each of `device.batch_sizes`
    and the fastest becomes the batch size of every method and metric (through the configs'
    `${device.batch_size}`), so that they run at the model's best speed.
    """
    if cfg.device.precision not in PRECISIONS:
        raise HarnessError(f"device.precision={cfg.device.precision!r}; expected one of {PRECISIONS}")
    device = resolve_device(cfg.device.name)
    clf: Classifier = instantiate(cfg.model)
    data: Images = instantiate(cfg.data, size=clf.input_size, mean=clf.mean, std=clf.std)
    memory_format = torch.channels_last if cfg.device.channels_last else torch.contiguous_format
    clf.module.to(device).to(memory_format=memory_format)
    speed = ModelSpeed(clf.module, data.images, device, memory_format)
    cfg.device.batch_size = speed.choose_batch_size(cfg.device.batch_sizes, cfg.device.batch_size)
    metrics = {name: instantiate(node) for name, node in cfg.metric.items()}
    if not metrics:
        raise HarnessError("no metric selected; use e.g. metric=[deletion,insertion]")
    return Job(cfg, device, clf, data, _function_name(cfg.method), instantiate(cfg.method), metrics, speed)


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


def _timing_fields(prefix: str, t: Timing, n: int) -> dict[str, Any]:
    bound = t.bound_ms
    return {
        f"{prefix}_ms_per_image": t.median_ms / n,
        f"{prefix}_ms_iqr": t.iqr_ms / n,
        f"{prefix}_ms_best": t.best_ms / n,
        f"{prefix}_repeats": len(t.times_ms),
        f"{prefix}_forwards_per_image": t.forwards / n,
        f"{prefix}_backwards_per_image": t.backwards / n,
        f"{prefix}_bound_ms_per_image": None if bound is None else bound / n,
        f"{prefix}_bound_ratio": t.bound_ratio,
    }


def run_job(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Run one job and write its results into `out`; returns the results row."""
    job = build(cfg)
    model, dev, seed = job.classifier.module, job.device, int(cfg.seed)
    fmt = torch.channels_last if cfg.device.channels_last else torch.contiguous_format
    x = job.data.images.to(dev).contiguous(memory_format=fmt)
    n = len(x)
    with torch.no_grad():
        probs = model(x).float().softmax(dim=1)
    target = probs.argmax(dim=1)

    def attribute(xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        seed_all(seed)  # stochastic methods: the same draws on every call
        return job.method(model, xs, ts)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    maps, t_method = measure(
        lambda: attribute(x, target),
        dev,
        model=model,
        speed=job.speed,
        warmup=lambda: attribute(x[:1], target[:1]),
        **REPEATS,
    )
    maps = check_attributions(maps, x, job.method_name).detach()
    curves: dict[str, Curve] = {}
    timings = {"method": t_method}
    for name, metric in job.metrics.items():
        curves[name], timings[name] = measure(
            partial(metric, model, x, maps, target),
            dev,
            model=model,
            speed=job.speed,
            warmup=partial(metric, model, x[:1], maps[:1], target[:1]),
            **REPEATS,
        )
    speed = job.speed  # best loop times seen, the bound's measurements included
    row: dict[str, Any] = {
        "model": job.classifier.name,
        "pretrained": job.classifier.pretrained,
        "data": job.data.name,
        "method": job.method_name,
        "device": dev.type,
        "device_config": cfg.device.name,
        "precision": cfg.device.precision,
        "channels_last": bool(cfg.device.channels_last),
        "n_images": n,
        "seed": seed,
        "input_size": job.classifier.input_size,
        "batch_size": speed.batch_size,
        "top1_equals_label": _agreement(target, job.data.labels),
        "forward_ms_per_image": speed.forward_ms,
        "forward_backward_ms_per_image": speed.forward_backward_ms,
        "forward_ms_by_batch": {str(k): v for k, v in speed.per_batch_ms.items()},
        **_timing_fields("method", t_method, n),
        **_params("method", cfg.method),
    }
    for name, curve in curves.items():
        low, high = bootstrap_ci(curve.auc, seed=seed)
        row |= {f"{name}_auc": float(curve.auc.mean()), f"{name}_auc_low": low, f"{name}_auc_high": high}
        row |= _timing_fields(name, timings[name], n) | _params(name, cfg.metric[name])
    row |= _environment(dev)
    write_job(out, row, *_tables(job, curves, target, probs), _maps(job, maps, target))
    log.info(_headline(row, list(curves)))
    return row


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


def _maps(job: Job, maps: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    mean = torch.tensor(job.classifier.mean)[:, None, None]
    std = torch.tensor(job.classifier.std)[:, None, None]
    pixels = (job.data.images * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return {
        "ids": job.data.ids,
        "maps": maps.sum(dim=1).float().cpu().half(),
        "images": pixels,
        "target_names": [job.classifier.class_names[i] for i in target.tolist()],
    }


def _headline(row: dict[str, Any], metrics: list[str]) -> str:
    scores = ", ".join(
        f"{m} {row[f'{m}_auc']:.3f} [{row[f'{m}_auc_low']:.3f}, {row[f'{m}_auc_high']:.3f}]" for m in metrics
    )
    ratio = row["method_bound_ratio"]
    cost = "no model passes" if ratio is None else f"{ratio:.2f}x its forward bound"
    return (
        f"{row['method']} on {row['model']}/{row['data']} ({row['device']}, {row['n_images']} images): "
        f"{scores}; {row['method_ms_per_image']:.1f} ms/image, {cost}"
    )


GROUPS = ("model", "data", "method", "metric", "device", "experiment")


def check_choices(overrides: list[str], conf: Path = REPO / "conf") -> None:
    """Refuse unknown config names in `group=a`, `group=a,b` and `group=[a,b]` overrides, listing
    the names that exist (Hydra lists them for some forms only). Sweep functions pass unchecked.
    """
    for arg in overrides:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or key not in GROUPS or "(" in value or value in ("null", ""):
            continue
        known = sorted(p.stem for p in (conf / key).glob("*.yaml"))
        for name in value.strip("[]").split(","):
            if name.strip() and name.strip() not in known:
                raise HarnessError(f"unknown {key} {name.strip()!r}; available: {', '.join(known)}")


def cli() -> None:
    """`python -m harness`: check the config names, then hand over to Hydra."""
    try:
        check_choices(sys.argv[1:])
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    main()


@hydra.main(config_path=str(REPO / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run the job that Hydra composed; bad input exits non-zero with one clear message."""
    out = Path(HydraConfig.get().runtime.output_dir)
    # Captum warns on every call that inputs do not require grad and that it hooks activations.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")
    try:
        run_job(cfg, out)
    except (HarnessError, InstantiationException, ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        raise SystemExit(1) from None
