"""FullGrad's terms on the CPU, compiled with numba: two passes over a gradient instead of five.

A term (`methods.full_grad._unit_sum`) needs each channel's range of |g| and then a weighted sum over
the channels of |g| less its least value. In torch's ops that is |g| written out, then read for its
least values, again for its greatest and again for the sum; here one pass finds both ends of every
channel's range and a second makes the sum, from g itself, in one call, so nothing of a gradient's
size is written. A
gradient comes as `[B, P, C]` (positions by channels: a channels-last map, `rows`) or `[B, C, P]`
(a contiguous one, `planes`). The sums over channels are reassociated (`fastmath`) so that they run
as vector operations; an image's term depends on neither its batch nor the number of threads.
Cached by numba next to this file and compiled ahead by `python -m metrics.compile`.
"""

from __future__ import annotations

import numba
import numpy as np

FAST = {"reassoc", "nsz"}  # vector sums and vector min/max; a NaN still gives a NaN


@numba.njit(cache=True, fastmath=FAST)
def _scale(low: np.ndarray, high: np.ndarray, k: np.ndarray) -> np.ndarray:
    """k_c / (k_c (high - low) + 1e-7) `[B, C]`, in the maps' precision: what (|g_c| - low) is
    multiplied by to make |k_c g_c| shifted to 0 and divided by its range (+ 1e-7).
    """
    eps = low.dtype.type(1e-7)
    scale = np.empty_like(low)
    for b in range(low.shape[0]):
        for c in range(low.shape[1]):
            scale[b, c] = k[c] / (k[c] * (high[b, c] - low[b, c]) + eps)
    return scale


def warm() -> None:
    """Compile both kernels for float32 maps (cached, see the module's docstring)."""
    g = np.random.default_rng(0).random((2, 6, 3), dtype=np.float32)
    k, out = np.ones(3, dtype=np.float32), np.empty((2, 6), dtype=np.float32)
    term_rows(g, k, out, 4)
    term_planes(np.ascontiguousarray(g.transpose(0, 2, 1)), k, out, 4)


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def term_rows(g: np.ndarray, k: np.ndarray, out: np.ndarray, tasks: int) -> None:
    """`out` `[B, P]` := the term of `g` `[B, P, C]` with factors `k` `[C]`; the range pass splits the
    positions into blocks, about `tasks` in all, each reduced on its own, then combined.
    """
    b_, p_, c_ = g.shape
    per = max(1, min(p_, tasks // b_))
    step = -(-p_ // per)
    part_low = np.empty((b_, per, c_), g.dtype)
    part_high = np.empty((b_, per, c_), g.dtype)
    for task in numba.prange(b_ * per):
        b, j = task // per, task % per
        lo, hi = part_low[b, j], part_high[b, j]
        lo[:] = np.inf
        hi[:] = 0
        for p in range(j * step, min(p_, (j + 1) * step)):
            for c in range(c_):
                a = abs(g[b, p, c])
                lo[c] = min(lo[c], a)
                hi[c] = max(hi[c], a)
    low, high = part_low[:, 0].copy(), part_high[:, 0].copy()
    for b in range(b_):
        for j in range(1, per):
            for c in range(c_):
                low[b, c] = min(low[b, c], part_low[b, j, c])
                high[b, c] = max(high[b, c], part_high[b, j, c])
    scale = _scale(low, high, k)
    for i in numba.prange(b_ * p_):
        b, p = i // p_, i % p_
        s = g.dtype.type(0)
        for c in range(c_):
            s += scale[b, c] * (abs(g[b, p, c]) - low[b, c])
        out[b, p] = s


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def term_planes(g: np.ndarray, k: np.ndarray, out: np.ndarray, block: int) -> None:
    """`out` `[B, P]` := the term of `g` `[B, C, P]` with factors `k` `[C]`; the sum pass takes the
    positions in blocks of `block`, one task each.
    """
    b_, c_, p_ = g.shape
    low, high = np.empty((b_, c_), g.dtype), np.empty((b_, c_), g.dtype)
    for task in numba.prange(b_ * c_):
        b, c = task // c_, task % c_
        lo, hi = g.dtype.type(np.inf), g.dtype.type(0)
        for p in range(p_):
            a = abs(g[b, c, p])
            lo = min(lo, a)
            hi = max(hi, a)
        low[b, c], high[b, c] = lo, hi
    scale = _scale(low, high, k)
    per = -(-p_ // block)
    for task in numba.prange(b_ * per):
        b, j = task // per, task % per
        start, stop = j * block, min(p_, (j + 1) * block)
        acc = out[b, start:stop]
        acc[:] = 0
        for c in range(c_):
            s, lo = scale[b, c], low[b, c]
            for p in range(start, stop):
                acc[p - start] += s * (abs(g[b, c, p]) - lo)
