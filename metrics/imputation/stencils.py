"""The linear imputation's operator and grid transfers as tensor operations: the 8-neighbour stencil
(as shifted adds of slices, never convolutions, so an image's result does not depend on its batch), the
neighbour weights, the residual without cancellation, and the 2x coarsening and bilinear prolongation.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def blur(x: torch.Tensor) -> torch.Tensor:
    """Sums over each pixel's 3x3 window weighted [1, 2, 1] x [1, 2, 1], zero outside: `[..., H, W]`."""
    h = x * 2
    h[..., 1:].add_(x[..., :-1])
    h[..., :-1].add_(x[..., 1:])
    v = h * 2
    v[..., 1:, :].add_(h[..., :-1, :])
    v[..., :-1, :].add_(h[..., 1:, :])
    return v


def degree(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """`[1, 1, H, W]` sum of each pixel's in-image neighbour weights (1; 2/3 on edges; 5/12 in corners)."""
    ones = torch.ones(1, 1, h, w, dtype=like.dtype, device=like.device)
    return (blur(ones) - 4) / 12


def laplacian(u: torch.Tensor) -> torch.Tensor:
    """`sum_j w_ij (u_j - u_i)` over in-image neighbours, from differences of neighbours (no cancellation).

    `sum_{3x3} k_y k_x (u_yx - u_00)` with k = [1, 2, 1] splits into the horizontal second differences
    blurred vertically plus the vertical second difference times the in-image horizontal weights
    (4 inside, 3 in the first and last columns).
    """
    dx = F.pad(u[..., 1:] - u[..., :-1], (1, 1))
    ex = dx[..., 1:] - dx[..., :-1]
    dy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 1, 1))
    ey = dy[..., 1:, :] - dy[..., :-1, :]
    ep = F.pad(ex, (0, 0, 1, 1))
    t = torch.add(ep[..., :-2, :], ep[..., 2:, :]).add_(ex, alpha=2).add_(ey, alpha=4)
    t[..., :1].sub_(ey[..., :1])
    t[..., -1:].sub_(ey[..., -1:])
    return t.div_(12)


def pad_even(x: torch.Tensor, value: float) -> torch.Tensor:
    """`x` padded with `value` at the bottom and right to even sides."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, w % 2, 0, h % 2), value=value) if h % 2 or w % 2 else x


def box(x: torch.Tensor) -> torch.Tensor:
    """Sums over 2x2 blocks (zero padded to even sizes)."""
    f = pad_even(x, 0.0)
    rows = f[..., 0::2, :] + f[..., 1::2, :]
    return rows[..., 0::2] + rows[..., 1::2]


def prolong_into(c: torch.Tensor, out: torch.Tensor, axis: int) -> torch.Tensor:
    """4x linear upsampling by 2 along `axis`, cell centred and clamped at the edges, into `out`.

    Fine 2I is 3 c[I] + c[I-1], fine 2I+1 is 3 c[I] + c[I+1] (c[-1] = c[0], c[n] = c[n-1]).
    """
    n = c.shape[axis]
    even = out.unflatten(axis, (n, 2)).select(axis + 1, 0)
    odd = out.unflatten(axis, (n, 2)).select(axis + 1, 1)
    if n > 1:
        torch.add(
            c.narrow(axis, 0, n - 1), c.narrow(axis, 1, n - 1), alpha=3, out=even.narrow(axis, 1, n - 1)
        )
        torch.add(c.narrow(axis, 1, n - 1), c.narrow(axis, 0, n - 1), alpha=3, out=odd.narrow(axis, 0, n - 1))
    torch.mul(c.narrow(axis, 0, 1), 4, out=even.narrow(axis, 0, 1))
    torch.mul(c.narrow(axis, n - 1, 1), 4, out=odd.narrow(axis, n - 1, 1))
    return out


def prolong(c: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """16x bilinear upsampling by 2 of `[B, C, h', w']`, cropped to `[B, C, h, w]` (allocating)."""
    b, ch, hc, wc = c.shape
    cols = prolong_into(c, c.new_empty(b, ch, hc, 2 * wc), 3)
    return prolong_into(cols, c.new_empty(b, ch, 2 * hc, 2 * wc), 2)[..., :h, :w]


def coarsen(unknown: torch.Tensor) -> torch.Tensor:
    """A coarse cell is unknown when all its (in-image) children are."""
    u = pad_even(unknown, 1.0)
    rows = torch.minimum(u[..., 0::2, :], u[..., 1::2, :])
    return torch.minimum(rows[..., 0::2], rows[..., 1::2])
