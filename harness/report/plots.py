"""The plots of a sweep's report: mean curves per method with a band, the grid of maps over their
images, cost against insertion AUC; `save_figure` writes each one atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from harness.report.rows import metric_names, value_fields  # noqa: E402
from harness.report.tables import label, one  # noqa: E402
from harness.results import atomic_write, read_maps  # noqa: E402

GRID_IMAGES = 8  # rows of the grid: a figure to look at, not every image of a large sweep


def save_figure(fig: Any, path: Path, dpi: int = 100) -> None:
    """Write a figure as PNG, atomically, and free it."""
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    plt.close(fig)


def plot_curves(rows: pd.DataFrame, curves: list[str], path: Path) -> None:
    """Mean curve over images per job, with a 95% band (normal approximation over images), one panel
    per curve of `curves.csv` (`deletion`, `road_morf`, ...), jobs ordered best first by the curve's
    `<curve>_auc`.
    """
    fields = value_fields(rows)
    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 5), squeeze=False)
    colours = [plt.get_cmap("tab20")(i) for i in range(20)]
    labels = label(rows)
    curves_of = {i: pd.read_csv(Path(d) / "curves.csv") for i, d in rows["job_dir"].items()}
    for ax, m in zip(axes[0], curves, strict=True):
        metric = next(n for n in metric_names(rows) if m == n or m.startswith(f"{n}_"))
        # Probabilities live in [0, 1]; logits do not.
        probability = f"{metric}.score" not in rows or bool(
            rows[f"{metric}.score"].isin(["softmax", "accuracy"]).all()
        )
        order = rows[f"{m}_auc"].sort_values(ascending=fields[f"{m}_auc"] == "lower").index
        for rank, i in enumerate(order):
            job, table = rows.loc[i], curves_of[i]
            sub = table[table["metric"] == m]
            c = sub.pivot(index="image_id", columns="point", values="score")
            x = sub.groupby("point")["fraction"].first()
            mean, sem = c.mean(), c.std(ddof=1).fillna(0) / math.sqrt(len(c))
            colour = colours[rank % len(colours)]
            ax.plot(x, mean, color=colour, label=f"{labels[i]} ({job[f'{m}_auc']:.3f})")
            low, high = mean - 1.96 * sem, mean + 1.96 * sem
            if probability:
                low, high = low.clip(lower=0), high.clip(upper=1)
            ax.fill_between(x, low, high, color=colour, alpha=0.06)
        ax.set(
            title=f"{m}: mean over images, 95% band (AUC, {fields[f'{m}_auc']} is better)",
            xlabel="fraction of pixels changed",
            ylabel=str(one(rows[f"{metric}.score"])) if f"{metric}.score" in rows else "score",
            xlim=(0, 1),
        )
        if probability:
            ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def display_scale(a: torch.Tensor) -> tuple[torch.Tensor, str, float]:
    """Map scaled for display: non-negative maps from their minimum to their 99th percentile,
    signed maps by the 99th percentile of their magnitude (a few extreme pixels set no scale).
    """
    if a.min() >= 0:
        lo, hi = a.min(), torch.quantile(a.flatten(), 0.99)
        return ((a - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1), "inferno", 0.0
    scale = torch.quantile(a.abs().flatten(), 0.99).clamp_min(1e-12)
    return (a / scale).clamp(-1, 1), "bwr", -1.0


def plot_grid(rows: pd.DataFrame, path: Path) -> None:
    """Images (rows, the first `GRID_IMAGES`) by methods (columns), each map over its image (signed
    maps: red +, blue -), the object's mask outlined in green where the data knows it.
    """
    jobs = [read_maps(Path(d)) for d in rows["job_dir"]]
    n = min(len(jobs[0]["ids"]), GRID_IMAGES)
    fig, axes = plt.subplots(n, len(jobs) + 1, figsize=(1.6 * (len(jobs) + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        image = jobs[0]["images"][i].transpose(1, 2, 0)
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(f"{jobs[0]['ids'][i]}\n{jobs[0]['target_names'][i]}", fontsize=6)
        grey = image.mean(axis=2)
        for j, (job, method) in enumerate(zip(jobs, rows["method"], strict=True), start=1):
            a, cmap, vmin = display_scale(torch.from_numpy(job["maps"][i]).float().sum(dim=0))
            axes[i, j].imshow(grey, cmap="gray")
            axes[i, j].imshow(a.numpy(), cmap=cmap, vmin=vmin, vmax=1, alpha=0.6)
            if "truth_mask" in job:  # the known evidence, outlined
                axes[i, j].contour(job["truth_mask"][i], levels=[0.5], colors="lime", linewidths=0.6)
            if i == 0:
                axes[i, j].set_title(method, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=72)  # a dozen methods by eight images: keep the file small


def plot_time_vs_insertion(rows: pd.DataFrame, path: Path) -> None:
    """Cost per image against insertion AUC, with the 95% interval."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (_, r), name in zip(rows.iterrows(), label(rows), strict=True):
        y, lo, hi = r["insertion_auc"], r["insertion_auc_low"], r["insertion_auc_high"]
        ax.errorbar(r["method_ms_per_image"], y, yerr=[[y - lo], [hi - y]], fmt="o", capsize=3)
        ax.annotate(
            name, (r["method_ms_per_image"], y), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.set(xscale="log", xlabel="method time per image (ms, log)", ylabel="insertion AUC (higher is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
