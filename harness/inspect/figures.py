"""The model pictures drawn from their arrays (`harness.inspect.pictures`), one matplotlib figure each."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _standardised(a: np.ndarray) -> np.ndarray:
    """A gradient shown as FlashTorch does: mean 0.5, standard deviation 0.1, clipped to [0, 1]."""
    return np.clip((a - a.mean()) / max(float(a.std()), 1e-12) * 0.1 + 0.5, 0, 1)


def _unit(a: np.ndarray) -> np.ndarray:
    """From the minimum to the 99th percentile, clipped: a few extreme pixels set no scale."""
    lo, hi = float(a.min()), float(np.quantile(a, 0.99))
    return np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)


def saliency_figure(image: np.ndarray, panels: dict[str, np.ndarray], title: str) -> Figure:
    """Rows plain and guided; columns the image, the gradients across RGB channels, their maximum
    magnitude over the channels, and that maximum over the image. `image` `[H, W, 3]` in [0, 1];
    `panels`: `plain`, `guided` `[3, H, W]` and `plain_max`, `guided_max` `[H, W]`.
    """
    fig, axes = plt.subplots(2, 4, figsize=(10, 5.6))
    for row, kind in enumerate(("plain", "guided")):
        grads, peak = panels[kind], panels[f"{kind}_max"]
        axes[row, 0].imshow(image)
        axes[row, 1].imshow(_standardised(grads.transpose(1, 2, 0)))
        axes[row, 2].imshow(_unit(peak), cmap="viridis")
        axes[row, 3].imshow(image)
        axes[row, 3].imshow(_unit(peak), cmap="viridis", alpha=0.6)
        names = ["input", f"{kind} gradients (RGB)", f"{kind}: max over channels", "overlay"]
        for ax, name in zip(axes[row], names, strict=True):
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def tile_grid(tiles: np.ndarray, title: str, rgb: bool) -> Figure:
    """Filter tiles: RGB `[F, kh, kw, 3]` on a square grid, or grey `[F, C, kh, kw]` filters by channels."""
    if rgb:
        n = len(tiles)
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + 0.4), squeeze=False)
        for i, ax in enumerate(axes.flat):
            if i < n:
                ax.imshow(tiles[i], interpolation="nearest")
            ax.axis("off")
    else:
        f, c = tiles.shape[:2]
        fig, axes = plt.subplots(f, c, figsize=(c * 0.6 + 0.4, f * 0.6 + 0.4), squeeze=False)
        for i in range(f):
            for j in range(c):
                axes[i, j].imshow(tiles[i, j], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                axes[i, j].axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def map_grid(maps: np.ndarray, labels: Sequence[str], title: str, cmap: str = "viridis") -> Figure:
    """Single-channel maps `[N, h, w]` on a square grid, each scaled to its own range."""
    n = len(maps)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.5 + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            ax.imshow(maps[i], cmap=cmap)
            ax.set_title(labels[i], fontsize=6)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def image_grid(images: np.ndarray, labels: Sequence[str], title: str) -> Figure:
    """RGB images `[N, H, W, 3]` in [0, 1] on a square grid."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.8, rows * 1.9 + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            ax.imshow(images[i])
            ax.set_title(labels[i], fontsize=6)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def occlusion_figure(images: np.ndarray, heat: np.ndarray, labels: Sequence[str], title: str) -> Figure:
    """Per image (rows) the image and the occlusion heatmap over it, rows of pixels from the top."""
    n = len(images)
    fig, axes = plt.subplots(n, 2, figsize=(4.4, 2.2 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_title(labels[i], fontsize=7)
        axes[i, 1].imshow(images[i].mean(axis=2), cmap="gray")
        shown = axes[i, 1].imshow(heat[i], cmap="jet", alpha=0.55, origin="upper")
        fig.colorbar(shown, ax=axes[i, 1], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        axes[i, 1].set_title("drop of the probability", fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def histogram_grid(histograms: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    """One small histogram per layer of weights."""
    names = list(histograms)
    cols = min(8, max(1, len(names)))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.7, rows * 1.3 + 0.3), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        counts, edges = histograms[name]
        ax.stairs(counts, edges, fill=True)
        ax.set_title(name, fontsize=5)
        ax.tick_params(labelsize=4)
        ax.set_yticks([])
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def top_k_figure(
    images: np.ndarray, names: Sequence[Sequence[str]], probs: np.ndarray, labels: Sequence[str]
) -> Figure:
    """Per image (rows) the image and its top-k probabilities as bars."""
    n = len(images)
    fig, axes = plt.subplots(
        n, 2, figsize=(6, 1.6 * n), squeeze=False, gridspec_kw={"width_ratios": [1, 2.2]}
    )
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_title(labels[i], fontsize=7)
        axes[i, 0].axis("off")
        k = len(probs[i])
        axes[i, 1].barh(range(k), probs[i][::-1], color="tab:blue")
        axes[i, 1].set_yticks(range(k), list(names[i])[::-1], fontsize=7)
        axes[i, 1].set_xlim(0, 1)
        axes[i, 1].tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str, dpi: int = 100) -> None:
    """Write and free a figure (the caller writes into a fresh folder, moved into place at the end)."""
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
