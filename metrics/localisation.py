"""Localisation: does the map point at the evidence that is known to carry the class?

Each metric needs the data's ground truth (`GroundTruth`: the object's pixel mask and its box, as
masks over the image) and scores the map summed over channels, per image, on the device:

- `pointing_game` (Zhang et al. 2016, "Top-down neural attention by excitation backprop"; TorchRay's
  protocol): 1 when the map's maximum lies within `tolerance` pixels of the mask (15 px at 224,
  scaled with the input side), else 0;
- `energy_pointing_game` (Wang et al. 2020, Score-CAM): the share of the map's positive part that
  lies inside the box;
- `relevance_mass` (Arras et al. 2022, CLEVR-XAI): the share of |map| inside the mask;
- `relevance_rank` (Arras et al. 2022): of the K pixels with the largest |map|, K the mask's size,
  the share inside the mask.

All four are higher-is-better and 1 for a map that is the mask itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from metrics.contract import GroundTruth, Result, metric

REFERENCE_SIDE = 224


def _plane(attributions: torch.Tensor) -> torch.Tensor:
    """`[B, H, W]` float32: the map summed over channels."""
    return attributions.float().sum(dim=1)


def _share(weights: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """`[B]` the share of non-negative `weights` `[B, H, W]` inside `region`; 0 where all are 0."""
    total = weights.flatten(1).sum(dim=1)
    inside = (weights * region).flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def _check_tolerance(*, tolerance: float = 15.0, **_: object) -> None:
    if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < float("inf"):
        raise ValueError(f"tolerance={tolerance!r}; expected a number of pixels at 224, >= 0")


def _within(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """`[B, H, W]` bool: pixels whose Euclidean distance to the nearest mask pixel is <= radius."""
    r = int(radius)
    if r < 1:
        return mask
    offsets = torch.arange(-r, r + 1, device=mask.device, dtype=torch.float32)
    disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).float()
    hits = F.conv2d(mask[:, None].float(), disc[None, None], padding=r)
    return hits[:, 0] > 0.5


@metric(better={"": "higher"}, needs=("ground_truth",), check=_check_tolerance)
def pointing_game(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    ground_truth: GroundTruth,
    tolerance: float = 15.0,
    chunk_size: int | None = None,
) -> Result:
    """Hit (1) when the map's maximum lies within `tolerance` pixels of the object, else miss (0).

    The maximum is the first in row-major order when several pixels share it. A pixel is within the
    tolerance when its Euclidean distance (in pixels, between centres) to the nearest mask pixel is at
    most `tolerance * H / 224`; the edge counts as a hit.

    Args:
        model: unused (the contract's argument).
        inputs: unused.
        target: unused.
        attributions: `[B, 1 or C, H, W]` maps.
        ground_truth: the objects' masks.
        tolerance: pixels at a 224-pixel input, scaled with the input's height (TorchRay: 15).
        chunk_size: unused; no model passes.

    Example:
        >>> mask = torch.zeros(1, 8, 8, dtype=torch.bool); mask[0, 2, 2] = True
        >>> maps = torch.zeros(1, 1, 8, 8); maps[0, 0, 2, 5] = 1.0
        >>> gt = GroundTruth.from_masks(mask)
        >>> pointing_game(None, None, maps, None, ground_truth=gt, tolerance=3 * 224 / 8).values[""]
        tensor([1.])
    """
    _check_tolerance(tolerance=tolerance)
    plane = _plane(attributions)
    b, h, w = plane.shape
    near = _within(ground_truth.mask.to(plane.device), tolerance * h / REFERENCE_SIDE)
    top = plane.flatten(1).argmax(dim=1)
    hit = near.flatten(1).gather(1, top[:, None])[:, 0]
    return Result({"": hit.float()})


@metric(better={"": "higher"}, needs=("ground_truth",))
def energy_pointing_game(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    ground_truth: GroundTruth,
    chunk_size: int | None = None,
) -> Result:
    """The share of the map's positive part inside the object's box (0 where no value is positive).

    Args:
        model: unused (the contract's argument).
        inputs: unused.
        target: unused.
        attributions: `[B, 1 or C, H, W]` maps (summed over channels).
        ground_truth: the objects' boxes.
        chunk_size: unused; no model passes.
    """
    plane = _plane(attributions)
    return Result({"": _share(plane.clamp_min(0), ground_truth.box.to(plane.device))})


@metric(better={"": "higher"}, needs=("ground_truth",))
def relevance_mass(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    ground_truth: GroundTruth,
    chunk_size: int | None = None,
) -> Result:
    """The share of |map| inside the object's mask; a uniform map scores the mask's area share.

    Args:
        model: unused (the contract's argument).
        inputs: unused.
        target: unused.
        attributions: `[B, 1 or C, H, W]` maps (summed over channels).
        ground_truth: the objects' masks.
        chunk_size: unused; no model passes.
    """
    plane = _plane(attributions)
    return Result({"": _share(plane.abs(), ground_truth.mask.to(plane.device))})


@metric(better={"": "higher"}, needs=("ground_truth",))
def relevance_rank(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    ground_truth: GroundTruth,
    chunk_size: int | None = None,
) -> Result:
    """Of the K pixels with the largest |map| (K the mask's size), the share inside the mask.

    Ties at the K-th value are broken by a stable sort (row-major order first).

    Args:
        model: unused (the contract's argument).
        inputs: unused.
        target: unused.
        attributions: `[B, 1 or C, H, W]` maps (summed over channels).
        ground_truth: the objects' masks.
        chunk_size: unused; no model passes.
    """
    plane = _plane(attributions).abs().flatten(1)
    mask = ground_truth.mask.to(plane.device).flatten(1)
    k = mask.sum(dim=1)
    order = torch.sort(plane, dim=1, descending=True, stable=True).indices
    ranked = mask.gather(1, order)
    top = torch.arange(plane.shape[1], device=plane.device)[None] < k[:, None]
    return Result({"": torch.where(k > 0, (ranked & top).sum(dim=1) / k.clamp_min(1), 0.0)})
