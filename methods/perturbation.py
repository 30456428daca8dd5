"""Perturbation methods: occlusion (through Captum) and RISE (Captum has none)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import torch
from annotated_types import Interval
from captum.attr import Occlusion
from torch import nn

from methods.common import Count, method

SCORES = ("softmax", "logit")
Score = Literal["softmax", "logit"]


def _scorer(model: nn.Module, score: str) -> nn.Module:
    if score == "logit":
        return model
    if score == "softmax":
        return nn.Sequential(model, nn.Softmax(dim=1))
    raise ValueError(f"score={score!r}; expected one of {SCORES}")


@method(forward_only=True)
def occlusion(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    window: Count = 32,
    stride: Count = 16,
    baseline: float = 0.0,
    score: Score = "softmax",
    chunk_size: Count = 16,
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


def _mirror_lerp(
    out_len: int, crop: int, cells: int, shifts: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis: the two grid indices and the weight of the second, `[N, crop]` each, for the
    rows (or columns) `shift .. shift + crop` of a `cells`-long axis resized to `out_len` samples.

    As skimage's resize (scipy.ndimage.zoom with grid_mode=True): output sample o sits at input
    coordinate (o + 0.5) * cells / out_len - 0.5; mode='reflect' mirrors about the edge samples
    without repeating them (index -1 reads 1, index cells reads cells - 2), as numpy.pad's 'reflect'.
    """
    device = shifts.device
    # coordinate = ((2o + 1) * cells - out_len) / (2 * out_len): floor and remainder in integers.
    num = (2 * torch.arange(out_len, device=device) + 1) * cells - out_len
    lo = torch.div(num, 2 * out_len, rounding_mode="floor")
    frac = (num - lo * 2 * out_len).to(dtype) / (2 * out_len)
    hi = lo + 1
    last = cells - 1
    # Coordinates lie in [-0.5, cells - 0.5), so one reflection suffices; the clamp covers cells == 1.
    lo = torch.where(lo < 0, -lo, lo).clamp(0, last)
    hi = torch.where(hi > last, 2 * last - hi, hi).clamp(0, last)
    at = shifts[:, None] + torch.arange(crop, device=device)  # [N, crop]
    return lo[at], hi[at], frac[at]


def rise_masks(grids: torch.Tensor, shifts: torch.Tensor, size: tuple[int, int], cells: int) -> torch.Tensor:
    """RISE masks `[N, 1, H, W]` from binary grids `[N, s, s]` and shifts `[N, 2]` in
    `[0, ceil(H/s)) x [0, ceil(W/s))` (Petsiuk, Das, Saenko 2018, arXiv:1806.07421, section 3.2).

    Each grid is upsampled bilinearly to (s+1) cells of ceil(H/s) x ceil(W/s) pixels and cropped to
    H x W at its shift, which gives smooth masks at every offset. The masks equal the authors' code
    (github.com/eclique/RISE, `generate_masks`): scikit-image's
    `resize(grid, up_size, order=1, mode='reflect', anti_aliasing=False)[x:x + H, y:y + W]`, i.e.
    half-pixel-centred bilinear interpolation that mirrors the grid at its borders without repeating
    the edge cell. Computed separably on the grids' device, for all N at once, in the grids' dtype.
    """
    h, w = size
    n = len(grids)
    ch, cw = -(-h // cells), -(-w // cells)
    shifts = shifts.to(grids.device)
    r0, r1, fr = _mirror_lerp((cells + 1) * ch, h, cells, shifts[:, 0], grids.dtype)
    c0, c1, fc = _mirror_lerp((cells + 1) * cw, w, cells, shifts[:, 1], grids.dtype)
    # Rows first: [N, s, s] -> [N, H, s].
    top = grids.gather(1, r0[:, :, None].expand(n, h, cells))
    bottom = grids.gather(1, r1[:, :, None].expand(n, h, cells))
    rows = torch.lerp(top, bottom, fr[:, :, None])
    # Then columns: [N, H, s] -> [N, H, W].
    left = rows.gather(2, c0[:, None, :].expand(n, h, w))
    right = rows.gather(2, c1[:, None, :].expand(n, h, w))
    return torch.lerp(left, right, fc[:, None, :])[:, None]


@method(forward_only=True, stochastic=True, softmax=True)
@torch.no_grad()
def rise(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    n_masks: Count = 2000,
    cells: Count = 7,
    p_keep: Annotated[float, Interval(gt=0, lt=1)] = 0.5,
    chunk_size: Count = 16,
) -> torch.Tensor:
    """RISE (Petsiuk, Das, Saenko 2018, arXiv:1806.07421, eq. 6): the mean of random masks weighted
    by the target's softmax probability on the masked image, divided by `p_keep`.

    All images share the same masks, drawn from torch's global generator (seeded by the job).
    Costs `n_masks` forwards per image, `chunk_size` at a time. `[B, C, H, W]` -> `[B, 1, H, W]`.
    """
    _, _, h, w = inputs.shape
    device = inputs.device
    grids = (torch.rand(n_masks, cells, cells) < p_keep).float().to(device)
    shifts = torch.stack(
        [
            torch.randint(0, -(-h // cells), (n_masks,)),
            torch.randint(0, -(-w // cells), (n_masks,)),
        ],
        dim=1,
    ).to(device)

    def masks(lo: int, hi: int) -> torch.Tensor:
        return rise_masks(grids[lo:hi], shifts[lo:hi], (h, w), cells)

    return masks_weighted_by_softmax(model, inputs, target, masks, n_masks, chunk_size) / p_keep


def masks_weighted_by_softmax(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor,
    masks: Callable[[int, int], torch.Tensor], n_masks: int, chunk_size: int,
) -> torch.Tensor:  # fmt: skip
    """RISE's sum: the mean over `n_masks` masks (`masks(lo, hi)`: masks `lo` to `hi`, `[m, 1, H, W]`)
    of each mask times the target's softmax probability on the image it masks, `[B, 1, H, W]`; the
    images go through the model `chunk_size` at a time.
    """
    b, _, h, w = inputs.shape
    images = min(b, chunk_size)
    per_forward = max(1, chunk_size // images)
    saliency = torch.zeros(b, h, w, device=inputs.device)
    for lo in range(0, n_masks, per_forward):
        m = masks(lo, min(lo + per_forward, n_masks))
        for i in range(0, b, images):
            x, t = inputs[i : i + images], target[i : i + images]
            masked = (m[:, None] * x[None]).flatten(0, 1)  # [m * g, C, H, W], mask-major
            p = model(masked).float().softmax(dim=1).view(len(m), len(x), -1)
            p_target = p.gather(2, t.view(1, -1, 1).expand(len(m), -1, 1))[..., 0]  # [m, g]
            saliency[i : i + images] += torch.einsum("mg,mhw->ghw", p_target, m[:, 0])
    return (saliency / n_masks)[:, None]
