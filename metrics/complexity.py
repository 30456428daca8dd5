"""Complexity of attribution maps: how concentrated the evidence is, whatever the model says.

Both metrics read one value per pixel: the attribution summed over channels, then its absolute value
(`|sum_c a_c|`, the pixel value that the faithfulness metrics rank by). A `[B, 1, H, W]` map is read
as is. Both are scale-invariant, and a map that is zero everywhere is scored as a constant map (its
limit along constant maps c -> 0): sparseness 0 and complexity log(H*W), the worst value of each, so
that a method that says nothing is never rewarded. Both keep non-finite values non-finite (the job
rejects them).

All of it runs on the maps' device, batched over images, with no host round trip.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from metrics.contract import Result, metric


def check_chunk_size(*, chunk_size: int = 16, **_: object) -> None:
    """Raise `ValueError` unless `chunk_size` is a positive int."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}; expected a positive number of images per pass")


def check_maps(inputs: torch.Tensor, attributions: torch.Tensor, target: torch.Tensor) -> None:
    """Raise `ValueError` unless maps `[B, 1 or C, H, W]` and target `[B]` fit inputs `[B, C, H, W]`.

    Shapes only: no host round trip.
    """
    b, c, h, w = inputs.shape
    if attributions.dim() != 4 or attributions.shape[0] != b or attributions.shape[2:] != (h, w):
        raise ValueError(
            f"attributions of shape {tuple(attributions.shape)} do not match inputs "
            f"{tuple(inputs.shape)}; expected [{b}, 1 or {c}, {h}, {w}]"
        )
    if attributions.shape[1] not in (1, c):
        raise ValueError(f"attributions have {attributions.shape[1]} channels; expected 1 or {c}")
    if target.shape != (b,):
        raise ValueError(f"target of shape {tuple(target.shape)}; expected [{b}]")


def pixel_magnitude(attributions: torch.Tensor) -> torch.Tensor:
    """`[B, 1 or C, H, W]` -> `[B, H*W]` float32: |attribution summed over channels| per pixel."""
    return attributions.float().sum(dim=1).flatten(1).abs()


def gini(values: torch.Tensor) -> torch.Tensor:
    """Gini index of each row of non-negative `values` `[B, n]` -> `[B]`; 0 for an all-zero row.

    For sorted v_(1) <= ... <= v_(n): sum_k (2k - n - 1) v_(k) / (n sum_k v_k). A one-hot row gives
    (n - 1) / n, a constant row 0.
    """
    n = values.shape[1]
    v = torch.sort(values, dim=1).values
    k = torch.arange(1, n + 1, device=v.device, dtype=v.dtype)
    total = v.sum(dim=1)
    weighted = (v * (2 * k - n - 1)).sum(dim=1)
    return torch.where(total == 0, 0.0, weighted / (n * total))


def entropy(values: torch.Tensor) -> torch.Tensor:
    """Entropy (natural log) of each row of non-negative `values` `[B, n]` normalised to sum 1 -> `[B]`.

    0 log 0 = 0. A uniform row gives log(n), a one-hot row 0, an all-zero row log(n) (as a constant row).
    """
    n = values.shape[1]
    total = values.sum(dim=1, keepdim=True)
    p = values / total
    h = 0.0 - torch.special.xlogy(p, p).sum(dim=1)  # +0, not -0, for a one-hot row
    return torch.where(total.squeeze(1) == 0, math.log(n), h)


def _of_pixels(
    score: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    chunk_size: int,
) -> Result:
    """`score` of each image's pixel magnitudes `[B, H*W]`, after the shapes and settings are checked."""
    check_chunk_size(chunk_size=chunk_size)
    check_maps(inputs, attributions, target)
    return Result({"": score(pixel_magnitude(attributions))})


@metric(better={"": "higher"}, check=check_chunk_size)
def sparseness(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    chunk_size: int = 16,
) -> Result:
    """Sparseness: the Gini index of the pixel magnitudes (Chalasani et al., ICML 2020,
    https://arxiv.org/abs/1810.06583; as in Quantus, higher is better: a sparser map is
    easier to read).

    Pixel magnitudes are |attribution summed over channels|. For the sorted magnitudes
    v_(1) <= ... <= v_(n) of an image with n = H*W pixels, the Gini index is
    sum_k (2k - n - 1) v_(k) / (n sum_k v_k), in [0, (n - 1) / n]: (n - 1) / n for a single non-zero
    pixel, 0 for a constant map and, by definition here, 0 for a map that is zero everywhere (as a
    constant map; Quantus adds 1e-7 to every value instead, which gives the same 0). Computed exactly,
    without Quantus's 1e-7.

    Args:
        model: unused (part of the metric contract).
        inputs: `[B, C, H, W]` normalised images; only their shape is read.
        attributions: `[B, 1 or C, H, W]` maps.
        target: `[B]` classes; only the shape is read.
        chunk_size: accepted for uniformity with the other metrics; all images are scored at once.

    Returns:
        `Result` with `values[""]`, the Gini index per image `[B]` (the row's `sparseness`).

    Example:
        >>> a = torch.zeros(2, 1, 2, 2)
        >>> a[0, 0, 0, 0], a[1] = 1.0, 3.0
        >>> sparseness(None, torch.zeros(2, 3, 2, 2), a, torch.zeros(2, dtype=torch.long)).values[""]
        tensor([0.7500, 0.0000])
    """
    return _of_pixels(gini, inputs, attributions, target, chunk_size)


@metric(better={"": "lower"}, check=check_chunk_size)
def complexity(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    chunk_size: int = 16,
) -> Result:
    """Complexity: the entropy of the pixel magnitudes as a distribution (Bhatt, Weller, Moura,
    IJCAI 2020, https://arxiv.org/abs/2005.00631; lower is better).

    Pixel magnitudes |attribution summed over channels| are divided by their sum to give p_i over the
    n = H*W pixels, and the complexity is -sum_i p_i ln p_i (natural log, 0 ln 0 = 0), in [0, ln n]:
    0 for a single non-zero pixel, ln n for a constant map. A map that is zero everywhere has no
    distribution; it is given ln n, the value of every constant map, so that it scores as the least
    informative map rather than as the simplest one (and agrees with `sparseness`, which gives it 0).

    Args:
        model: unused (part of the metric contract).
        inputs: `[B, C, H, W]` normalised images; only their shape is read.
        attributions: `[B, 1 or C, H, W]` maps.
        target: `[B]` classes; only the shape is read.
        chunk_size: accepted for uniformity with the other metrics; all images are scored at once.

    Returns:
        `Result` with `values[""]`, the entropy per image `[B]` (the row's `complexity`).

    Example:
        >>> a = torch.zeros(2, 1, 2, 2)
        >>> a[0, 0, 0, 0], a[1] = 1.0, 3.0
        >>> complexity(None, torch.zeros(2, 3, 2, 2), a, torch.zeros(2, dtype=torch.long)).values[""]
        tensor([0.0000, 1.3863])
    """
    return _of_pixels(entropy, inputs, attributions, target, chunk_size)
