"""The sanity checks' figures, as the paper draws them (Adebayo et al. 2018, figures 2 and 4).

- `sanity_curves_<model>_<data>.png`: per similarity (Spearman of |map|, Spearman, SSIM), the mean
  over images per method against the blocks re-initialised, with a 95% band;
- `sanity_maps_<model>_<data>_<image>.png`: for one image, methods (rows) by the trained model and
  each step of the randomisation (columns), each map over the image.

Drawn from each job's `curves.csv` and `attributions.npz` (`model_randomisation_maps`).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch

from harness.report.plots import save_figure
from harness.results import read_maps

METRIC = "model_randomisation"
KEYS = {
    "spearman_abs": "Spearman of |map|",
    "spearman": "Spearman of the map",
    "ssim": "SSIM of |map|, min-max",
}
MAX_IMAGES = 4


def _steps(row: pd.Series) -> list[str]:
    """Column labels: the trained model, then each block in the order it was re-initialised."""
    blocks = row[f"{METRIC}.blocks"]
    return ["trained", *(block_label(b) for b in reversed(list(blocks)))]


def block_label(block: str | list[str]) -> str:
    """A block's name; a group's as `blocks.3-7` where its names are consecutive numbered children of
    one parent, else its names joined by `+`.
    """
    if isinstance(block, str):
        return block
    parents = {n.rpartition(".")[0] for n in block}
    tails = [n.rpartition(".")[2] for n in block]
    if len(parents) == 1 and all(t.isdigit() for t in tails) and len(block) > 1:
        return f"{parents.pop()}.{tails[0]}-{tails[-1]}"
    return "+".join(block)


def plot_sanity_curves(rows: pd.DataFrame, path: Path) -> None:
    """Mean similarity to the trained model's map per method, over the blocks re-initialised."""
    fig, axes = plt.subplots(1, len(KEYS), figsize=(6.2 * len(KEYS), 4.8), squeeze=False)
    colours = [plt.get_cmap("tab20")(i) for i in range(20)]
    order = rows[f"{METRIC}_spearman_abs"].sort_values().index  # most model-dependent first
    steps = _steps(rows.iloc[0])
    for ax, (key, title) in zip(axes[0], KEYS.items(), strict=True):
        for rank, i in enumerate(order):
            row, table = rows.loc[i], pd.read_csv(Path(rows.loc[i, "job_dir"]) / "curves.csv")
            sub = table[table["metric"] == f"{METRIC}_{key}"]
            c = sub.pivot(index="image_id", columns="point", values="score")
            mean, sem = c.mean(), c.std(ddof=1).fillna(0) / math.sqrt(len(c))
            colour = colours[rank % len(colours)]
            ax.plot(
                mean.index,
                mean,
                marker="o",
                ms=3,
                color=colour,
                label=f"{row['method']} ({mean.iloc[-1]:.2f})",
            )
            ax.fill_between(mean.index, mean - 1.96 * sem, mean + 1.96 * sem, color=colour, alpha=0.08)
        ax.set_xticks(range(len(steps)), steps, rotation=60, ha="right", fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
        order_name = rows[f"{METRIC}.order"].iloc[0]
        ax.set(
            title=f"{title} ({order_name}; lower: the map depends on the model)",
            ylabel=key,
            ylim=(-0.3, 1.05),
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _over(ax: plt.Axes, grey: torch.Tensor, plane: torch.Tensor) -> None:
    """|map| over the image, from its minimum to its 99th percentile (an offset sets no colour)."""
    m = plane.float().abs()
    lo, hi = m.min(), torch.quantile(m.flatten(), 0.99)
    ax.imshow(grey, cmap="gray")
    ax.imshow(
        ((m - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1).numpy(),
        cmap="inferno",
        vmin=0,
        vmax=1,
        alpha=0.65,
    )


def plot_sanity_maps(rows: pd.DataFrame, out: Path, stem: str) -> list[Path]:
    """One figure per image (at most `MAX_IMAGES`): methods by randomisation steps, |map| over the image."""
    jobs = [read_maps(Path(d)) for d in rows["job_dir"]]
    steps, paths = _steps(rows.iloc[0]), []
    for n, image_id in enumerate(jobs[0]["ids"][:MAX_IMAGES]):
        fig, axes = plt.subplots(
            len(jobs), len(steps), figsize=(1.3 * len(steps), 1.3 * len(jobs)), squeeze=False
        )
        grey = torch.from_numpy(jobs[0]["images"][n]).float().mean(dim=0)
        for r, (job, method) in enumerate(zip(jobs, rows["method"], strict=True)):
            planes = [torch.from_numpy(job["maps"][n]).float().sum(dim=0)]
            planes += list(torch.from_numpy(job[f"{METRIC}_maps"][n]).unbind(0))
            for c, plane in enumerate(planes):
                _over(axes[r, c], grey, plane)
                if r == 0:
                    axes[r, c].set_title(steps[c], fontsize=6, rotation=30)
            axes[r, 0].set_ylabel(method, fontsize=7)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{image_id}: cascading randomisation from the logits down", fontsize=8)
        fig.tight_layout()
        paths.append(out / f"{stem}_{str(image_id).replace('/', '_')}.png")
        save_figure(fig, paths[-1], dpi=72)
    return paths


def write_sanity(rows: pd.DataFrame, out: Path) -> list[Path]:
    """The sanity figures of every (model, data) whose jobs ran `model_randomisation`; their paths."""
    paths: list[Path] = []
    if f"{METRIC}_spearman_abs" not in rows.columns:
        return paths
    done = rows[rows[f"{METRIC}_spearman_abs"].notna()]
    for (model, data), group in done.groupby(["model", "data"]):
        group = group.drop_duplicates("method")
        paths.append(out / f"sanity_curves_{model}_{data}.png")
        plot_sanity_curves(group, paths[-1])
        paths += plot_sanity_maps(group, out, f"sanity_maps_{model}_{data}")
    return paths
