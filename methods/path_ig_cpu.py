"""Guided IG's selection on the CPU, compiled with numba: one step of every image's path in a few fused
passes, the images in parallel.

`methods.path_ig.guided_ig` moves each image's point at each step until it has covered its share of
the L1 distance, choosing each time the features of least |gradient| (a k-th smallest) that have not
reached the step's x_max. In torch's ops each round of that loop is some thirty passes over the image's
features; here it is four (features behind the path, the L1 distance, the room left, the move), and the
k-th smallest a radix select (counts of the values' top 16 bits, then the one bucket that holds it).
Cached by numba next to this file and compiled ahead by `python -m metrics.compile`.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True)
def kth_smallest(size: np.ndarray, k: int, counts: np.ndarray) -> float:
    """The `k`-th smallest (1-based) of `size` (float32, >= 0, +inf allowed); `counts` `[65536]` int64
    scratch.
    """
    bits = size.view(np.int32)
    counts[:] = 0
    for i in range(bits.size):
        counts[bits[i] >> 16] += 1
    seen = 0
    bucket = 0
    while seen + counts[bucket] < k:
        seen += counts[bucket]
        bucket += 1
    inside = np.empty(counts[bucket], np.float32)
    n = 0
    for i in range(bits.size):
        if bits[i] >> 16 == bucket:
            inside[n] = size[i]
            n += 1
    return float(np.sort(inside)[k - seen - 1])


@numba.njit(parallel=True, cache=True)
def guided_steps(
    x: np.ndarray,
    grads: np.ndarray,
    images: np.ndarray,
    base: np.ndarray,
    attr: np.ndarray,
    l1_total: np.ndarray,
    alpha_min: float,
    alpha_max: float,
    l1_share: float,
    k: int,
) -> None:
    """One step of every image's path (`x`, `images`, `base`, `attr` `[B, N]` float64; `grads` `[B, N]`
    float32, the gradients at `x`): moves `x` and adds the step's attribution to `attr`, as PAIR's
    `guided_ig_impl` does for one image.
    """
    inf = np.float32(np.inf)
    most = np.float32(3.4028234663852886e38)
    for b in numba.prange(x.shape[0]):
        if l1_total[b] == 0:
            continue
        xb, image, start, grad = x[b], images[b], base[b], grads[b]
        n = xb.size
        old = xb.copy()
        size = np.abs(grad)
        counts = np.empty(65536, np.int64)
        l1_target = l1_total[b] * l1_share
        while True:
            l1 = 0.0
            for i in range(n):
                span = image[i] - start[i]
                low = start[i] + span * alpha_min
                if (span > 0 and xb[i] < low) or (span < 0 and xb[i] > low):
                    xb[i] = low
                l1 += abs(xb[i] - image[i])
            if abs(l1_target - l1) <= max(1e-9 * max(abs(l1_target), abs(l1)), 1e-9):
                break
            for i in range(n):
                if xb[i] == start[i] + (image[i] - start[i]) * alpha_max:
                    size[i] = inf
            threshold = kth_smallest(size, k, counts)
            if threshold == inf:
                threshold = most
            room = 0.0
            for i in range(n):
                if size[i] <= threshold:
                    room += abs(xb[i] - (start[i] + (image[i] - start[i]) * alpha_max))
            gamma = (l1 - l1_target) / room if room > 0 else math.inf
            for i in range(n):
                if size[i] <= threshold:
                    high = start[i] + (image[i] - start[i]) * alpha_max
                    xb[i] = high if gamma > 1.0 else xb[i] + (high - xb[i]) * gamma
            if gamma <= 1.0:
                break
        for i in range(n):
            attr[b, i] += (xb[i] - old[i]) * grad[i]


def warm() -> None:
    """Compile the kernel for the types `guided_ig` passes (cached, see the module's docstring)."""
    x = np.zeros((1, 8), np.float64)
    images = np.linspace(-1, 1, 8)[None].copy()
    grads = np.linspace(1, 2, 8, dtype=np.float32)[None].copy()
    guided_steps(
        x, grads, images, np.zeros_like(x), np.zeros_like(x), np.abs(images).sum(1), 0.0, 0.5, 0.5, 2
    )
