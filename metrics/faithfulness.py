"""Deletion and insertion curves (Petsiuk, Das, Saenko, RISE, BMVC 2018, https://arxiv.org/abs/1806.07421).

Pixels are ranked by the attribution summed over channels, most important first (stable sort).
Deletion starts from the image and replaces the top pixels, step by step, by a substrate; insertion
starts from the substrate and puts the top pixels of the image back. The score at each point is the
target class's softmax probability (or logit), and the AUC is the trapezoid over the fraction of pixels
changed. The defaults are those of RISE's evaluation code: 28 steps (224*8 pixels per step at 224x224),
zeros in the normalised input space for deletion, an 11x11 sigma-5 blur of the image for insertion.

All of it runs on the inputs' device, batched over (image, step) pairs, with no host round trip.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from metrics.contract import Curve, Result, metric

Substrate = Literal["zero", "mean", "blur", "uniform"]
Score = Literal["softmax", "logit"]
SUBSTRATES = ("zero", "mean", "blur", "uniform")
SCORES = ("softmax", "logit")


@lru_cache(maxsize=4)
def _rise_kernel(size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's blur kernel `[size, size]`: scipy's gaussian_filter of a centred delta.

    gaussian_filter truncates at 4 sigma and reflects at the border, so with sigma 5 on an 11x11
    delta the kernel is the folded Gaussian, not a plain truncated one; it still sums to 1.
    """
    from scipy.ndimage import gaussian_filter

    delta = torch.zeros(size, size, dtype=torch.float64)
    delta[size // 2, size // 2] = 1.0
    return torch.from_numpy(gaussian_filter(delta.numpy(), sigma)).float()


def blur(inputs: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Per-channel Gaussian blur with zero padding, as RISE's insertion substrate. `[B, C, H, W]`."""
    c = inputs.shape[1]
    kernel = _rise_kernel(size, sigma).to(inputs).expand(c, 1, size, size)
    return F.conv2d(inputs, kernel, padding=size // 2, groups=c)


def make_substrate(inputs: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The image that replaced pixels come from, in the model's (normalised) input space.

    Args:
        inputs: `[B, C, H, W]` normalised images.
        kind: `zero` (zeros, the dataset mean after normalisation), `mean` (each image's own
            per-channel mean), `blur` (RISE's 11x11 sigma-5 blur) or `uniform` (noise uniform over
            each channel's range in the batch).
        generator: random source for `uniform`.
    """
    if kind == "zero":
        return torch.zeros_like(inputs)
    if kind == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs).contiguous()
    if kind == "blur":
        return blur(inputs)
    if kind == "uniform":
        lo = inputs.amin(dim=(0, 2, 3), keepdim=True)
        hi = inputs.amax(dim=(0, 2, 3), keepdim=True)
        noise = torch.rand(inputs.shape, generator=generator, device=inputs.device)
        return lo + (hi - lo) * noise.to(inputs.dtype)
    raise ValueError(f"substrate={kind!r}; expected one of {SUBSTRATES}")


def pixel_rank(attributions: torch.Tensor, tie_break: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of each pixel, 0 for the most important: `[B, 1 or C, H, W]` -> `[B, H*W]` int64.

    Pixels are sorted by the attribution summed over channels, descending. Ties keep the order of
    `tie_break`, a permutation of the `H*W` positions (sorted stably in permuted order, mapped back;
    ROAD draws one from the job's seed), or pixel order (row-major) when None, which is reproducible
    on every device.
    """
    saliency = attributions.sum(dim=1).flatten(1)
    if tie_break is None:
        order = torch.sort(saliency, dim=1, descending=True, stable=True).indices
    else:
        order = tie_break[torch.sort(saliency[:, tie_break], dim=1, descending=True, stable=True).indices]
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def check_curve(
    *, steps: int = 28, substrate: str = "zero", score: str = "softmax", chunk_size: int = 16, **_: object
) -> None:
    """Raise `ValueError` naming a bad deletion or insertion setting and what is allowed."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}; expected a positive number of steps")
    if substrate not in SUBSTRATES:
        raise ValueError(f"substrate={substrate!r}; expected one of {', '.join(SUBSTRATES)}")
    if score not in SCORES:
        raise ValueError(f"score={score!r}; expected one of {', '.join(SCORES)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}; expected a positive number of images per forward")


def check_inputs(inputs: torch.Tensor, attributions: torch.Tensor, target: torch.Tensor) -> None:
    """Raise `ValueError` unless maps `[B, 1 or C, H, W]` (finite) and target `[B]` fit the inputs."""
    b, _, h, w = inputs.shape
    if attributions.dim() != 4 or attributions.shape[0] != b or attributions.shape[2:] != (h, w):
        raise ValueError(
            f"attributions of shape {tuple(attributions.shape)} do not match inputs "
            f"{tuple(inputs.shape)}; expected [{b}, 1 or C, {h}, {w}]"
        )
    if not torch.isfinite(attributions).all():
        raise ValueError("attributions contain NaN or inf; a ranking needs finite values")
    if target.shape != (b,):
        raise ValueError(f"target of shape {tuple(target.shape)}; expected [{b}]")


@torch.no_grad()
def causal_curve(
    model: nn.Module,
    start: torch.Tensor,
    finish: torch.Tensor,
    rank: torch.Tensor,
    target: torch.Tensor,
    steps: int,
    score: str = "softmax",
    chunk_size: int = 16,
) -> Curve:
    """Scores as the top-ranked pixels of `start` turn into those of `finish`, step by step.

    Point i shows `finish` where `rank < min(i * ceil(H*W / steps), H*W)` and `start` elsewhere, for
    i = 0..steps. The (image, point) pairs are forwarded `chunk_size` at a time.

    Args:
        model: classifier returning logits `[N, K]`.
        start: `[B, C, H, W]` image at point 0.
        finish: `[B, C, H, W]` image at the last point.
        rank: `[B, H*W]` rank of each pixel (see `pixel_rank`).
        target: `[B]` class whose score is tracked.
        steps: number of steps S; the curve has S+1 points.
        score: `softmax` (probability) or `logit`.
        chunk_size: (image, point) pairs per forward pass.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}; expected a positive number of steps")
    if score not in SCORES:
        raise ValueError(f"score={score!r}; expected one of {SCORES}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; expected a positive number of images per forward")
    b, c, h, w = start.shape
    hw, points = h * w, steps + 1
    per_step = -(-hw // steps)
    changed = (torch.arange(points, device=start.device) * per_step).clamp(max=hw)
    scores = torch.empty(b * points, device=start.device)
    for lo in range(0, b * points, chunk_size):
        pair = torch.arange(lo, min(lo + chunk_size, b * points), device=start.device)
        img, point = pair // points, pair % points
        keep_start = (rank[img] >= changed[point, None]).view(-1, 1, h, w)
        x = torch.where(keep_start, start[img], finish[img])
        logits = model(x).float()
        out = logits.softmax(dim=1) if score == "softmax" else logits
        scores[lo : lo + len(pair)] = out.gather(1, target[img, None]).squeeze(1)
    scores = scores.view(b, points)
    fractions = changed.to(scores.dtype) / hw
    return Curve(fractions, scores, torch.trapezoid(scores, fractions, dim=1))


@metric(better={"auc": "lower"}, check=check_curve)
def deletion(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int = 28,
    substrate: str = "zero",
    score: str = "softmax",
    chunk_size: int = 16,
) -> Result:
    """Deletion curve: remove the most important pixels first; a faithful map drops the score fast.

    Lower AUC is better.

    Args:
        model: classifier returning logits.
        inputs: `[B, C, H, W]` normalised images.
        attributions: `[B, 1 or C, H, W]` maps; summed over channels to rank pixels.
        target: `[B]` class to track, by default the model's top-1 on the clean image.
        steps: number of steps (RISE: 28 at 224x224, i.e. 224*8 pixels per step).
        substrate: what deleted pixels become: `zero` (RISE), `mean`, `blur`, `uniform`.
        score: `softmax` (RISE) or `logit`.
        chunk_size: (image, step) pairs per forward pass.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
        >>> x, a = torch.randn(2, 3, 4, 4), torch.rand(2, 1, 4, 4)
        >>> curve = deletion(model, x, a, torch.tensor([0, 1]), steps=4).curves[""]
        >>> curve.scores.shape, curve.fractions.tolist()
        (torch.Size([2, 5]), [0.0, 0.25, 0.5, 0.75, 1.0])
    """
    check_curve(steps=steps, substrate=substrate, score=score, chunk_size=chunk_size)
    check_inputs(inputs, attributions, target)
    finish = make_substrate(inputs, substrate)
    curve = causal_curve(model, inputs, finish, pixel_rank(attributions), target, steps, score, chunk_size)
    return Result({"auc": curve.auc}, {"": curve})


@metric(better={"auc": "higher"}, check=check_curve)
def insertion(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int = 28,
    substrate: str = "blur",
    score: str = "softmax",
    chunk_size: int = 16,
) -> Result:
    """Insertion curve: restore the most important pixels first; a faithful map raises the score fast.

    Higher AUC is better. Arguments as for `deletion`; the substrate (default: RISE's blur) is the
    starting image.
    """
    check_curve(steps=steps, substrate=substrate, score=score, chunk_size=chunk_size)
    check_inputs(inputs, attributions, target)
    start = make_substrate(inputs, substrate)
    curve = causal_curve(model, start, inputs, pixel_rank(attributions), target, steps, score, chunk_size)
    return Result({"auc": curve.auc}, {"": curve})
