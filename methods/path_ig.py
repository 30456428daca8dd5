"""Integrated gradients along other paths: Guided IG (Kapishnikov et al. 2021) and Blur IG (Xu et al. 2020),
as PAIR's `saliency` library defines them, batched on the device.

Blur IG integrates along the path of ever stronger Gaussian blurs of the image, each blur a product with
two banded matrices (scipy's `gaussian_filter`, zero outside the image, radius 4 sigma), image-step
pairs forwarded `chunk_size` at a time. Guided IG walks from the baseline to the image moving, at each
of its steps, the features of least absolute gradient first, never more than `max_dist` (of the path)
ahead of or behind the straight line; its steps follow the gradients, so each step is one
forward+backward of every image at once, and the selection runs per image on the device in float64.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Gt, Interval
from torch import nn

from methods import path_ig_cpu
from methods.common import Count, input_gradients, like_inputs, method, numba_threads


def blur_matrix(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[size, size]`: row i holds the Gaussian taps (std `sigma`, radius int(4 sigma + 0.5), summing to
    1) that scipy's `gaussian_filter1d` with `mode="constant"` gives output i; sigma 0: the identity.
    """
    if sigma == 0:
        return torch.eye(size, dtype=dtype, device=device)
    radius = int(4.0 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 * taps**2 / sigma**2)
    phi /= phi.sum()
    offset = torch.arange(size)[None, :] - torch.arange(size)[:, None]  # j - i
    inside = offset.abs() <= radius
    rows = torch.where(
        inside, phi[(offset + radius).clamp(0, 2 * radius)], torch.zeros((), dtype=torch.float64)
    )
    return rows.to(dtype=dtype, device=device)


def blur_matrices(
    h: int, w: int, sigmas: list[float], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and column blur matrices `[len(sigmas), h, h]` and `[len(sigmas), w, w]` of `sigmas`."""
    rows = torch.stack([blur_matrix(h, s, like.dtype, like.device) for s in sigmas])
    cols = rows if h == w else torch.stack([blur_matrix(w, s, like.dtype, like.device) for s in sigmas])
    return rows, cols


def blurred(x: torch.Tensor, matrices: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The image `x` `[C, H, W]` blurred by each pair of `blur_matrices` (over H and W, each channel on
    its own): `[k, C, H, W]`.
    """
    rows, cols = matrices
    return torch.einsum("khi,ciw,kvw->kchv", rows, x, cols)


@method()
def blur_ig(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    max_sigma: Annotated[float, Gt(0)] = 50.0,
    steps: Count = 100,
    grad_step: Annotated[float, Gt(0)] = 0.01,
    sqrt: bool = False,
    chunk_size: Count = 16,
) -> torch.Tensor:
    """Blur IG (Xu et al. 2020, arXiv:2004.03383, eq. 4), as PAIR's `BlurIG`: minus the sum over the
    path's `steps` points (blur sigma_i = i max_sigma / steps, or sqrt(i max_sigma / steps) with
    `sqrt`) of (sigma_{i+1} - sigma_i) times the derivative of the blurred image in sigma (a forward
    difference of `grad_step`) times the gradient of the target logit there. `[B, C, H, W]`.
    """
    if sqrt:
        sigmas = [math.sqrt(i * max_sigma / steps) for i in range(steps + 1)]
    else:
        sigmas = [i * max_sigma / steps for i in range(steps + 1)]
    total = torch.zeros_like(inputs)
    h, w = inputs.shape[2:]
    for start in range(0, steps, chunk_size):  # the blurs of a chunk of steps, for every image
        chunk = range(start, min(steps, start + chunk_size))
        at = blur_matrices(h, w, [sigmas[i] for i in chunk], inputs)
        ahead = blur_matrices(h, w, [sigmas[i] + grad_step for i in chunk], inputs)
        widths = torch.tensor(
            [sigmas[i + 1] - sigmas[i] for i in chunk], dtype=inputs.dtype, device=inputs.device
        )
        for b, (x, t) in enumerate(zip(inputs, target, strict=True)):
            points = blurred(x, at)
            slope = (blurred(x, ahead) - points) / grad_step
            grads = input_gradients(model, like_inputs(points, inputs), t.expand(len(chunk)), len(chunk))
            total[b] += (widths[:, None, None, None] * slope * grads).sum(dim=0)
    return -total


# Guided IG's selection on the CPU in `methods.path_ig_cpu` (False: torch's ops, as on a GPU; the tests
# run both).
COMPILED_ON_CPU = True


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The `k`-th smallest (1-based) of each row of `values` `[B, N]`, float32 and >= 0 (+inf allowed):
    `[B]`, exactly `kthvalue`'s. A radix select: the rows' values counted by their top 16 bits (a
    non-negative float's bits order as its value), then the k-th found among the one bucket that holds
    it; several times faster than `kthvalue` on the CPU.
    """
    rows = values.shape[0]
    high = values.view(torch.int32) >> 16  # 0 to 0x7F80 (+inf)
    keys = high + torch.arange(rows, device=values.device)[:, None] * 65536
    counts = torch.bincount(keys.flatten(), minlength=rows * 65536).view(rows, 65536)
    below = counts.cumsum(dim=1)
    bucket = (below < k).sum(dim=1)  # the first bucket whose running count reaches k
    before = torch.where(bucket > 0, below.gather(1, (bucket - 1).clamp(min=0)[:, None])[:, 0], 0)
    out = torch.empty(rows, dtype=values.dtype, device=values.device)
    for r, (row, b, n) in enumerate(
        zip(values, (high == bucket[:, None]), (k - before).tolist(), strict=True)
    ):
        out[r] = row[b].kthvalue(n).values
    return out


@method()
def guided_ig(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: Count = 200,
    fraction: Annotated[float, Interval(ge=0, le=1)] = 0.25,
    max_dist: Annotated[float, Interval(ge=0, le=1)] = 0.02,
    baseline: float = 0.0,
    chunk_size: Count = 16,
) -> torch.Tensor:
    """Guided IG (Kapishnikov et al. 2021, arXiv:2106.09788, algorithm 1), as PAIR's `GuidedIG`: the
    sum over the adaptive path's `steps` steps of the change of each feature times the gradient of the
    target logit where the step began. At each step the `fraction` of features of least absolute
    gradient move toward the image until the path has covered (step + 1) / steps of the L1 distance,
    none straying more than `max_dist` from the straight line. On the CPU each step's selection runs
    compiled (`methods.path_ig_cpu`; with `COMPILED_ON_CPU` False, torch's ops as on a GPU). `[B, C, H, W]`.
    """
    dtype = torch.float64
    images = inputs.detach().to(dtype).flatten(1)
    base = torch.full_like(images, baseline)
    span = images - base
    x = base.clone()
    attr = torch.zeros_like(images)
    l1_total = span.abs().sum(dim=1)
    ahead, moves = span > 0, span != 0  # the direction of each feature's way, and whether it has one
    k = int(math.floor(fraction * (images.shape[1] - 1))) + 1  # numpy's quantile, interpolation="lower"
    inf = math.inf
    compiled = inputs.device.type == "cpu" and COMPILED_ON_CPU
    if compiled:
        numba_threads()
    for step in range(steps):
        here = like_inputs(x.view_as(inputs).to(inputs.dtype), inputs)
        grads = input_gradients(model, here, target, chunk_size).flatten(1)
        alpha = (step + 1.0) / steps
        alpha_min, alpha_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
        if compiled:  # the CPU: the step of every image in a few fused passes (`methods.path_ig_cpu`)
            grads = grads.float().contiguous()
            share = 1 - (step + 1) / steps
            path_ig_cpu.guided_steps(
                x.numpy(), grads.numpy(), images.numpy(), base.numpy(), attr.numpy(), l1_total.numpy(),
                alpha_min, alpha_max, share, k,
            )  # fmt: skip
            continue
        size = grads.abs().float()  # |grad| in float32 orders as in float64 (the model's gradients)
        x_min, x_max = base + span * alpha_min, base + span * alpha_max
        l1_target = l1_total * (1 - (step + 1) / steps)
        start = x.clone()
        active = l1_total > 0  # an image equal to its baseline gets 0
        while bool(active.any()):  # every image's step, in lockstep: PAIR's loop, one image at a time
            # A feature is behind the path when its share of the way, (x - base) / span, is under
            # alpha_min: x under x_min where span > 0, above it where span < 0, never where span is 0.
            behind = torch.where(ahead, x < x_min, x > x_min) & moves
            x = torch.where(active[:, None] & behind, x_min, x)
            l1_current = (x - images).abs().sum(dim=1)
            gap = (l1_target - l1_current).abs()
            close = gap <= (1e-9 * torch.maximum(l1_target.abs(), l1_current.abs())).clamp(min=1e-9)
            active &= ~close
            if not bool(active.any()):
                break
            size.masked_fill_(x == x_max, inf)
            threshold = kth_smallest(size, k)
            # Of least |grad|, not at x_max (an infinite threshold: every finite one).
            threshold = torch.where(threshold == inf, torch.finfo(size.dtype).max, threshold)
            chosen = (size <= threshold[:, None]) & active[:, None]
            room = torch.where(chosen, (x - x_max).abs(), 0.0).sum(dim=1)
            gamma = torch.where(room > 0, (l1_current - l1_target) / room.clamp(min=1e-300), inf)
            full = gamma > 1.0
            step_to = torch.where(full[:, None], x_max, x + (x_max - x) * gamma[:, None])
            x = torch.where(chosen, step_to, x)
            active &= full
        attr += (x - start) * grads.to(dtype)
    return attr.view_as(inputs).to(inputs.dtype)
