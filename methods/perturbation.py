"""Perturbation methods: occlusion (through Captum) and RISE (Captum has none)."""

from __future__ import annotations

import torch
from captum.attr import Occlusion
from torch import nn
from torch.nn import functional as F

SCORES = ("softmax", "logit")


def _scorer(model: nn.Module, score: str) -> nn.Module:
    if score == "logit":
        return model
    if score == "softmax":
        return nn.Sequential(model, nn.Softmax(dim=1))
    raise ValueError(f"score={score!r}; expected one of {SCORES}")


def occlusion(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    window: int = 32,
    stride: int = 16,
    baseline: float = 0.0,
    score: str = "softmax",
    chunk_size: int = 16,
) -> torch.Tensor:
    """Occlusion (Zeiler and Fergus 2014, arXiv:1311.2901): the drop in the target's score when a
    `window` x `window` square (all channels) is set to `baseline`, averaged over the windows that
    cover each pixel. `[B, C, H, W]` -> `[B, 1, H, W]`.

    Windows must tile the image exactly, so that no strip at the right or bottom is left out:
    `(side - window)` must be a multiple of `stride`. With W windows each image costs W+1 forwards;
    `chunk_size` of them go through the model at once.
    """
    _, c, h, w = inputs.shape
    for side in (h, w):
        if window > side or (side - window) % stride:
            raise ValueError(
                f"occlusion window={window}, stride={stride} do not tile a side of {side} pixels: "
                f"need window <= {side} and ({side} - window) divisible by stride"
            )
    explainer = Occlusion(_scorer(model, score))
    images = min(inputs.shape[0], chunk_size)
    per_eval = max(1, chunk_size // images)
    maps = []
    for lo in range(0, inputs.shape[0], images):
        x, t = inputs[lo : lo + images], target[lo : lo + images]
        a = explainer.attribute(
            x,
            sliding_window_shapes=(c, window, window),
            strides=(c, stride, stride),
            baselines=baseline,
            target=t,
            perturbations_per_eval=per_eval,
        )
        maps.append(a[:, :1])
    return torch.cat(maps)


def rise_masks(grids: torch.Tensor, shifts: torch.Tensor, size: tuple[int, int], cells: int) -> torch.Tensor:
    """RISE masks `[N, 1, H, W]` from binary grids `[N, s, s]` and shifts `[N, 2]`.

    Each grid is upsampled bilinearly to (s+1) cells of ceil(H/s) pixels and cropped at its shift
    (Petsiuk et al. 2018, section 3.2), which gives smooth masks at every offset.
    """
    h, w = size
    ch, cw = -(-h // cells), -(-w // cells)
    up = F.interpolate(
        grids[:, None],
        size=((cells + 1) * ch, (cells + 1) * cw),
        mode="bilinear",
        align_corners=False,
    )[:, 0]
    rows = shifts[:, :1] + torch.arange(h, device=grids.device)
    cols = shifts[:, 1:] + torch.arange(w, device=grids.device)
    n = torch.arange(len(grids), device=grids.device)[:, None, None]
    return up[n, rows[:, :, None], cols[:, None, :]][:, None]


@torch.no_grad()
def rise(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    n_masks: int = 2000,
    cells: int = 7,
    p_keep: float = 0.5,
    chunk_size: int = 16,
) -> torch.Tensor:
    """RISE (Petsiuk, Das, Saenko 2018, arXiv:1806.07421, eq. 6): the mean of random masks weighted
    by the target's softmax probability on the masked image, divided by `p_keep`.

    All images share the same masks, drawn from torch's global generator (seeded by the job).
    Costs `n_masks` forwards per image, `chunk_size` at a time. `[B, C, H, W]` -> `[B, 1, H, W]`.
    """
    b, _, h, w = inputs.shape
    device = inputs.device
    grids = (torch.rand(n_masks, cells, cells) < p_keep).float().to(device)
    shifts = torch.stack(
        [
            torch.randint(0, -(-h // cells), (n_masks,)),
            torch.randint(0, -(-w // cells), (n_masks,)),
        ],
        dim=1,
    ).to(device)
    images = min(b, chunk_size)
    per_forward = max(1, chunk_size // images)
    saliency = torch.zeros(b, h, w, device=device)
    for lo in range(0, n_masks, per_forward):
        masks = rise_masks(grids[lo : lo + per_forward], shifts[lo : lo + per_forward], (h, w), cells)
        for i in range(0, b, images):
            x, t = inputs[i : i + images], target[i : i + images]
            masked = (masks[:, None] * x[None]).flatten(0, 1)  # [m * g, C, H, W], mask-major
            p = model(masked).float().softmax(dim=1).view(len(masks), len(x), -1)
            p_target = p.gather(2, t.view(1, -1, 1).expand(len(masks), -1, 1))[..., 0]  # [m, g]
            saliency[i : i + images] += torch.einsum("mg,mhw->ghw", p_target, masks[:, 0])
    return (saliency / (n_masks * p_keep))[:, None]
