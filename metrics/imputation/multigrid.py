"""The multigrid hierarchy of the batched solver: each grid's operator and buffers, the views of them a
group of images works on (`Plan`), the restriction and prolongation passes, and the V-cycle with the
coarsest grid's dense solve.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from metrics.imputation.stencils import blur, coarsen, degree

COARSEST = 64  # cells on the coarsest grid, solved by a dense Cholesky factorisation
SWEEPS = 2  # Jacobi sweeps before and after each coarse correction on the coarse grids (1 on the finest)


class Blur:
    """`blur` of a zero-bordered field's interior into `out`, with its views taken once."""

    def __init__(self, padded: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        self.src = (padded[..., :-2], padded[..., 2:], padded[..., 1:-1])
        self.rows = (rows, rows[..., :-2, :], rows[..., 2:, :], rows[..., 1:-1, :])
        self.out = out

    def __call__(self) -> torch.Tensor:
        """The blurred interior, in `out`."""
        left, right, mid = self.src
        rows, up, down, centre = self.rows
        torch.add(left, right, out=rows).add_(mid, alpha=2)
        return torch.add(up, down, out=self.out).add_(centre, alpha=2)


class Grid:
    """One grid of the hierarchy: its unknown cells, its operator, and work buffers for `n` images.

    On the unknown cells of a field `e` (zero elsewhere) the operator is
    `A e = unknown * (d e - sum_j w_ij e_j) = diag * e - off * blur(e)` with `diag = unknown * (d + 1/3)`
    and `off = unknown / 12`; a Jacobi sweep on `A e = r` is `e <- inv r + keep e + mix blur(e)`.
    Coefficients are `[B, 1, H, W]` for the whole batch; the buffers hold `n` images (the whole batch,
    or a group of it on the finest grid). The iterate lives inside a zero border (`padded`).
    """

    def __init__(self, unknown: torch.Tensor, channels: int, n: int, smoothing: bool = True) -> None:
        h, w = unknown.shape[-2:]
        d = degree(h, w, unknown)
        self.h, self.w = h, w
        self.unknown = unknown
        self.diag = unknown * (d + 1 / 3)
        self.off = unknown * (1 / 12)
        self.inv = unknown * (1 / d)
        # For `Plan.smooth` (the coarse grids'): inv * (1 - diag * inv) and inv * off.
        self.keep = self.inv * (-1 / 3) if smoothing else None
        self.mix = self.inv * (1 / 12) if smoothing else None
        he, we = h + h % 2, w + w % 2
        hc, wc = he // 2, we // 2
        new = partial(torch.empty, dtype=unknown.dtype, device=unknown.device)
        c = channels
        self.padded = new(n, c, h + 2, w + 2).zero_()  # the iterate, zero border
        self.rows = new(n, c, h + 2, w)
        self.blurred = new(n, c, h, w)
        self.start = new(n, c, h, w)  # inv * r
        self.res = new(n, c, he + 2, we + 2).zero_()  # the residual inside a zero border (and even padding)
        self.half = new(n, c, hc, we + 2)  # restriction along rows, then columns
        self.half_b = new(n, c, hc, we + 2)
        self.quarter_b = new(n, c, hc, wc)
        self.up_w = new(n, c, hc + 2, we)  # prolongation along columns, then rows
        self.up = new(n, c, he, we)
        self.r = new(n, c, h, w)  # the right-hand side, when the finer grid restricts into it
        self.plans: dict[tuple[int, int], Plan] = {}

    def plan(self, g: slice, coarse: Coarse) -> Plan:
        """The grid's operations on images `g` (made once per group)."""
        key = (g.start, g.stop)
        if key not in self.plans:
            self.plans[key] = Plan(self, g, coarse)
        return self.plans[key]


class Coarse:
    """Where a grid restricts to and prolongs from: the next grid's `r` and zero-bordered iterate."""

    def __init__(self, r: torch.Tensor, padded: torch.Tensor, unknown: torch.Tensor) -> None:
        self.r, self.padded, self.unknown = r, padded, unknown


class Plan:
    """A grid's operations on images `g`, with every view of its buffers and coefficients taken once."""

    def __init__(self, grid: Grid, g: slice, coarse: Coarse) -> None:
        n = g.stop - g.start
        h, w = grid.h, grid.w
        self.diag, self.off, self.inv = grid.diag[g], grid.off[g], grid.inv[g]
        self.unknown = grid.unknown[g]
        self.keep = None if grid.keep is None else grid.keep[g]
        self.mix = None if grid.mix is None else grid.mix[g]
        self.padded = grid.padded[:n]
        self.e = self.padded[:, :, 1:-1, 1:-1]
        self.start = grid.start[:n]
        self.blur = Blur(self.padded, grid.rows[:n], grid.blurred[:n])
        # Restriction: the residual, inside a zero border, along rows then columns (see `restrict`).
        res = grid.res[:n]
        self.res = res[:, :, 1 : h + 1, 1 : w + 1]
        half, half_b, quarter_b = grid.half[:n], grid.half_b[:n], grid.quarter_b[:n]
        hc, wc = half.shape[2], quarter_b.shape[3]
        self.rows_pass = transfer_views(res, half, half_b, 2, hc)
        self.cols_pass = transfer_views(half, coarse.r[g], quarter_b, 3, wc)
        self.coarse_r, self.coarse_unknown = coarse.r[g], coarse.unknown[g]
        # Prolongation: the coarse iterate (zero border) along columns, then rows.
        src, up_w, up = coarse.padded[g], grid.up_w[:n], grid.up[:n]
        self.cols_up = prolong_views(src, up_w, 3, wc)
        self.rows_up = prolong_views(up_w, up, 2, hc)
        self.up = up[:, :, :h, :w]

    def pre_smooth(self, r: torch.Tensor, sweeps: int) -> torch.Tensor:
        """`sweeps` Jacobi sweeps on `A e = r` from 0, in the iterate buffer."""
        torch.mul(self.inv, r, out=self.start)
        self.e.copy_(self.start)
        for _ in range(sweeps - 1):
            self.smooth()
        return self.e

    def smooth(self) -> torch.Tensor:
        """A Jacobi sweep after `pre_smooth` (which left `inv * r` in `start`)."""
        assert self.keep is not None and self.mix is not None
        t = self.blur()
        return torch.addcmul(self.start, self.keep, self.e, out=self.e).addcmul_(self.mix, t)

    def smooth_from(self, r: torch.Tensor) -> torch.Tensor:
        """A Jacobi sweep on `A e = r`, through the residual (`start` is scratch here)."""
        t = self.blur()
        res = torch.addcmul(r, self.diag, self.e, value=-1, out=self.start).addcmul_(self.off, t)
        return self.e.addcmul_(self.inv, res)

    def restrict(self, r: torch.Tensor) -> torch.Tensor:
        """The residual `r - A e` of the iterate, restricted (16x `P^T`) into the coarse grid's `r`.

        Per axis, coarse cell I gathers fine cells 2I-1, 2I, 2I+1, 2I+2 with weights 1, 3, 3, 1, the
        first and last fine cells' outer weight folding back onto the edge cells: the transpose of
        `correct`'s prolongation.
        """
        t = self.blur()
        torch.addcmul(r, self.diag, self.e, value=-1, out=self.res).addcmul_(self.off, t)
        restrict_pass(*self.rows_pass)
        restrict_pass(*self.cols_pass)
        return self.coarse_r.mul_(self.coarse_unknown)

    def correct(self) -> torch.Tensor:
        """Add the prolonged coarse iterate to this one.

        Per axis, fine cell 2I gets 3 c[I] + c[I-1] and 2I+1 gets 3 c[I] + c[I+1], clamped at the edges
        (c[-1] = c[0], c[n] = c[n-1]): 16x bilinear interpolation, hence the 1/256.
        """
        prolong_pass(*self.cols_up)
        prolong_pass(*self.rows_up)
        return self.e.addcmul_(self.unknown, self.up, value=1 / 256)


def transfer_views(f: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor, axis: int, n: int) -> tuple:
    """Views for `restrict_pass` of zero-bordered `f` (2n cells inside) along `axis` into `out`."""

    def at(x: torch.Tensor, start: int, stop: int | None = None, step: int = 1) -> torch.Tensor:
        index = [slice(None)] * 4
        index[axis] = slice(start, stop, step)
        return x[tuple(index)]

    return (
        at(f, 0, 2 * n, 2),  # cell 2I-1
        at(f, 3, None, 2),  # cell 2I+2
        at(f, 1, 2 * n + 1, 2),  # cell 2I
        at(f, 2, 2 * n + 2, 2),  # cell 2I+1
        out,
        tmp,
        (at(out, 0, 1), at(f, 1, 2)),  # the first cell folds back
        (at(out, n - 1, n), at(f, 2 * n, 2 * n + 1)),  # the last cell folds back
    )


def restrict_pass(
    before: torch.Tensor,
    after: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    out: torch.Tensor,
    tmp: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor],
    tail: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """One axis of the restriction, through the views `transfer_views` took."""
    torch.add(before, after, out=out)
    torch.add(first, second, out=tmp)
    out.add_(tmp, alpha=3)
    head[0].add_(head[1])
    tail[0].add_(tail[1])


def prolong_views(src: torch.Tensor, out: torch.Tensor, axis: int, n: int) -> tuple:
    """Views for `prolong_pass` of zero-bordered `src` (n cells inside) along `axis` into `out`."""

    def at(x: torch.Tensor, start: int, stop: int | None = None, step: int = 1) -> torch.Tensor:
        index = [slice(None)] * 4
        index[axis] = slice(start, stop, step)
        return x[tuple(index)]

    mid = at(src, 1, n + 1)
    return (
        (at(src, 0, n), mid, at(out, 0, None, 2)),  # even fine cells: c[I-1] + 3 c[I]
        (at(src, 2, n + 2), mid, at(out, 1, None, 2)),  # odd fine cells: c[I+1] + 3 c[I]
        (at(out, 0, 1), at(src, 1, 2)),  # clamped at the first cell
        (at(out, 2 * n - 1, 2 * n), at(src, n, n + 1)),  # and at the last
    )


def prolong_pass(
    even: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    odd: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    head: tuple[torch.Tensor, torch.Tensor],
    tail: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """One axis of the prolongation, through the views `prolong_views` took."""
    torch.add(even[0], even[1], alpha=3, out=even[2])
    torch.add(odd[0], odd[1], alpha=3, out=odd[2])
    head[0].add_(head[1])
    tail[0].add_(tail[1])


class Hierarchy:
    """Grids from the image's down to at most `COARSEST` cells; the coarsest is solved densely."""

    def __init__(self, unknown: torch.Tensor, channels: int, group: int) -> None:
        b = unknown.shape[0]
        masks = [unknown]
        while math.prod(masks[-1].shape[-2:]) > COARSEST:
            masks.append(coarsen(masks[-1]))
        self.grids = [Grid(m, channels, group if k == 0 else b, k > 0) for k, m in enumerate(masks[:-1])]
        m = self.coarsest = masks[-1]
        h, w = m.shape[-2:]
        n = h * w
        eye = torch.eye(n, dtype=m.dtype, device=m.device)
        # The operator on the whole coarsest grid, restricted to the unknowns (identity elsewhere).
        full = degree(h, w, m).flatten() * eye - (blur(eye.view(n, 1, h, w)).view(n, n) - 4 * eye) / 12
        mv = m.view(b, n)
        mat = mv[:, :, None] * mv[:, None, :] * full + torch.diag_embed(1 - mv)
        self.inverse = torch.cholesky_inverse(torch.linalg.cholesky(mat))
        self.last = Coarse(
            m.new_empty(b, channels, h, w), m.new_zeros(b, channels, h + 2, w + 2), m
        )  # the coarsest grid's right-hand side and answer
        self.below = [Coarse(g.r, g.padded, g.unknown) for g in self.grids[1:]] + [self.last]
        every = slice(0, b)
        self.plans = [grid.plan(every, self.below[k]) for k, grid in enumerate(self.grids) if k > 0]

    def solve_coarsest(self, r: torch.Tensor) -> torch.Tensor:
        """`A^-1 r` on the coarsest grid, by its dense inverse."""
        b, c, h, w = r.shape
        return torch.bmm(r.reshape(b, c, h * w), self.inverse).view(b, c, h, w)

    def vcycle(self, k: int) -> torch.Tensor:
        """Approximately solve `A_k e = r_k` on grid k >= 1 for the whole batch, symmetric in `r_k`.

        `r_k` is read from grid k's `r` buffer; the answer, inside a zero border, is left in its iterate.
        """
        if k == len(self.grids):
            last = self.last
            last.padded[:, :, 1:-1, 1:-1] = self.solve_coarsest(last.r)
            return last.padded
        plan, r = self.plans[k - 1], self.grids[k].r
        sweeps = SWEEPS
        plan.pre_smooth(r, sweeps)
        plan.restrict(r)
        self.vcycle(k + 1)
        plan.correct()
        for _ in range(sweeps):
            plan.smooth()
        return plan.padded
