"""Perturbation methods on a transformer's patch grid: what a vision transformer sees is its patches'
tokens, so these perturb whole patches, never part of one.

- `patch_occlusion`: each patch in turn set to `baseline`, the drop in the target's score painted on
  it (Zeiler and Fergus 2014 with the window and stride a patch: Captum's `Occlusion` so set);
- `patch_rise`: RISE (Petsiuk et al. 2018) with masks that keep or drop whole patches, each with
  probability `p_keep`, on the token grid (no upsampling between patches, no shift);
- `patch_lime`: LIME (Ribeiro et al. 2016) whose regions are the patches (`methods.lime` with
  `segments=grid` on the same grid).

The grid is the model's (`grid`, bound by the job from the model's token layout); on a model without
one, give it. Each image's side must split into whole patches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt, Interval
from torch import nn

from methods.attn_lrp import check_transformer
from methods.common import Count, method
from methods.perturbation import Score, _scorer, masks_weighted_by_softmax
from methods.surrogate import lime_kernel, lime_samples, surrogate


def patch_index(inputs: torch.Tensor, grid: tuple[int, int] | None, name: str) -> torch.Tensor:
    """Each pixel's patch, `[H, W]` (row-major over the grid), for images `[B, C, H, W]`."""
    if grid is None:
        raise ValueError(
            f"{name}: the model declares no patch grid (transformers do); give grid=[rows, columns]"
        )
    (rows, cols), (h, w) = grid, inputs.shape[2:]
    if rows < 1 or cols < 1 or h % rows or w % cols:
        raise ValueError(f"{name}: grid={list(grid)} does not split {h}x{w} images into whole patches")
    r = torch.arange(h, device=inputs.device) // (h // rows)
    c = torch.arange(w, device=inputs.device) // (w // cols)
    return r[:, None] * cols + c[None, :]


def _grid_fits(name: str) -> Callable[[dict[str, Any], torch.Tensor], None]:
    """The settings check of method `name`: its `grid` splits the images into whole patches."""

    def check(settings: dict[str, Any], probe: torch.Tensor) -> None:
        patch_index(probe, settings.get("grid"), name)

    return check


@method(
    forward_only=True,
    attention=True,
    check_model=check_transformer,
    check_settings=_grid_fits("patch_occlusion"),
)
@torch.no_grad()
def patch_occlusion(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, grid: tuple[int, int] | None = None,
    baseline: float = 0.0, score: Score = "softmax", chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """Occlusion of whole patches: the drop in the target's score (`softmax` or `logit`) when a patch
    is set to `baseline`, on each of its pixels. One forward per patch and one of the image;
    `chunk_size` images at a time. `[B, 1, H, W]`.

    Args:
        model: the classifier.
        inputs: `[B, C, H, W]` images.
        target: `[B]` classes.
        grid: the patch grid `(rows, columns)`; None: the model's (bound by the job).
        baseline: the value an occluded patch takes (0: the data's mean colour).
        score: what drops: the target's `softmax` probability or its `logit`.
        chunk_size: images per forward.
    """
    index = patch_index(inputs, grid, "patch_occlusion")
    patches, b = int(index.max()) + 1, inputs.shape[0]
    scorer = _scorer(model, score)
    images = min(b, chunk_size)
    per_forward = max(1, chunk_size // images)
    drops = torch.empty(b, patches, device=inputs.device)
    for i in range(0, b, images):
        x, t = inputs[i : i + images], target[i : i + images]
        whole = scorer(x).float().gather(1, t[:, None])[:, 0]
        for lo in range(0, patches, per_forward):
            hit = (
                index[None]
                == torch.arange(lo, min(lo + per_forward, patches), device=x.device)[:, None, None]
            )
            masked = torch.where(hit[:, None, None], baseline, x[None]).flatten(0, 1)  # patch-major
            s = scorer(masked).float().view(len(hit), len(x), -1)
            s = s.gather(2, t.view(1, -1, 1).expand(len(hit), -1, 1))[..., 0]  # [m, g]
            drops[i : i + images, lo : lo + len(hit)] = (whole[None] - s).T
    return drops[:, index][:, None]


@method(
    forward_only=True,
    stochastic=True,
    softmax=True,
    attention=True,
    check_model=check_transformer,
    check_settings=_grid_fits("patch_rise"),
)
@torch.no_grad()
def patch_rise(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, grid: tuple[int, int] | None = None,
    n_masks: Count = 1000, p_keep: Annotated[float, Interval(gt=0, lt=1)] = 0.5, chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """RISE on the patch grid: the mean of `n_masks` masks, each keeping every patch with probability
    `p_keep` (whole patches, on the grid), weighted by the target's softmax probability on the masked
    image, divided by `p_keep`. All images share the masks, drawn from torch's global generator
    (seeded by the job). `[B, 1, H, W]`.

    Args:
        model: the classifier.
        inputs: `[B, C, H, W]` images.
        target: `[B]` classes.
        grid: the patch grid `(rows, columns)`; None: the model's (bound by the job).
        n_masks: masks, each one forward per image.
        p_keep: each patch's probability of being kept.
        chunk_size: images per forward.
    """
    index = patch_index(inputs, grid, "patch_rise")
    patches = int(index.max()) + 1
    kept = (torch.rand(n_masks, patches) < p_keep).float().to(inputs.device)

    def masks(lo: int, hi: int) -> torch.Tensor:
        return kept[lo:hi][:, index][:, None]

    return masks_weighted_by_softmax(model, inputs, target, masks, n_masks, chunk_size) / p_keep


@method(
    forward_only=True,
    stochastic=True,
    attention=True,
    check_model=check_transformer,
    check_settings=_grid_fits("patch_lime"),
)
def patch_lime(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, grid: tuple[int, int] | None = None,
    n_samples: Count = 1000, kernel_width: Annotated[float, Gt(0)] = 1.0,
    ridge: Annotated[float, Ge(0)] = 1.0, score: Score = "logit", chunk_size: Count = 64,
) -> torch.Tensor:  # fmt: skip
    """LIME over the patches: `methods.lime`'s ridge regression of the target's score on which patches
    a sample keeps (each with probability 1/2, the rest 0), samples weighted by the exponential kernel
    of their cosine distance to the image. `[B, 1, H, W]`, with the fits' R^2 as an extra.

    Args:
        model: the classifier.
        inputs: `[B, C, H, W]` images.
        target: `[B]` classes.
        grid: the patch grid `(rows, columns)`; None: the model's (bound by the job).
        n_samples: samples per image, each one forward.
        kernel_width: the kernel's width.
        ridge: the ridge regression's alpha (the lime library's 1).
        score: the target's `logit` or `softmax` probability.
        chunk_size: images per forward.
    """
    index = patch_index(inputs, grid, "patch_lime")
    features = index.expand(inputs.shape[0], *index.shape).clone()
    scorer, weigh = _scorer(model, score), lime_kernel(kernel_width)
    return surrogate(scorer, inputs, target, features, lime_samples, weigh, n_samples, ridge, chunk_size)
