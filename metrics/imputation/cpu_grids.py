"""The compiled CPU solve's grids (numba): their sizes and views in one buffer, each grid's operator and
the coarsest grid's Cholesky factor, the V-cycle preconditioner and the full-multigrid start, and one
thread's workspace.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from metrics.imputation.cpu_passes import (
    OPTS,
    last_sweep,
    prolong_add,
    restrict,
    row_sides,
    smooth,
    stencil,
    true_residual,
)

COARSEST = 64  # cells on the coarsest grid, solved by a dense Cholesky factorisation
SWEEPS = 2  # Jacobi sweeps before and after each coarse correction on the coarse grids (1 on the finest)
FMG_SWEEPS = 2  # Jacobi sweeps on each coarse grid of the full-multigrid start
FMG_FINE_SWEEPS = 2  # and on the finest grid


@njit(**OPTS)
def grid_shapes(h, w):
    """`[L, 2]` interior sizes of the grids, halving (rounding up) until at most `COARSEST` cells."""
    n, a, b = 1, h, w
    while a * b > COARSEST:
        a, b, n = (a + 1) // 2, (b + 1) // 2, n + 1
    out = np.empty((n, 2), dtype=np.int64)
    a, b = h, w
    for k in range(n):
        out[k, 0], out[k, 1] = a, b
        a, b = (a + 1) // 2, (b + 1) // 2
    return out


@njit(**OPTS)
def grid_view(buf, off, shapes, k):
    """Grid `k`'s bordered plane in a buffer holding every grid's, one after the other."""
    return buf[off[k] : off[k + 1]].reshape((shapes[k, 0] + 2, shapes[k, 1] + 2))


@njit(**OPTS)
def inverse_weights(unknown, sides, inv, h, w) -> None:
    """`inv = unknown / d` with d = (sy * sx - 4) / 12 the in-image neighbour weight: 1 inside, 2/3 on
    the edges, 5/12 in the corners (0 where a 1x1 image has no neighbour).
    """
    for i in range(1, h + 1):
        sy = row_sides(i, h)
        for j in range(1, w + 1):
            d = (sy * sides[j] - 4) / np.float32(12.0)
            inv[i, j] = unknown[i, j] / d if d > 0 else 0.0


@njit(**OPTS)
def box_sum(fine, coarse, hc, wc) -> None:
    """Sums over each coarse cell's 2x2 children (children beyond an odd edge are the zero border)."""
    for ci in range(hc):
        top, bottom, out = fine[2 * ci + 1], fine[2 * ci + 2], coarse[ci + 1]
        for cj in range(wc):
            out[cj + 1] = top[2 * cj + 1] + top[2 * cj + 2] + bottom[2 * cj + 1] + bottom[2 * cj + 2]


@njit(**OPTS)
def cholesky(unknown, sides, h, w, chol) -> None:
    """The coarsest grid's operator on its unknown cells (identity elsewhere), factorised into `chol`."""
    n = h * w
    mat = np.zeros((n, n))
    for i in range(h):
        for j in range(w):
            a = i * w + j
            if unknown[i + 1, j + 1] == 0.0:
                mat[a, a] = 1.0
                continue
            mat[a, a] = (row_sides(i + 1, h) * sides[j + 1] - 4) / 12.0
            for di in range(-1, 2):
                for dj in range(-1, 2):
                    ni, nj = i + di, j + dj
                    if (di or dj) and 0 <= ni < h and 0 <= nj < w and unknown[ni + 1, nj + 1] != 0.0:
                        mat[a, ni * w + nj] = -(1.0 / 6.0 if di == 0 or dj == 0 else 1.0 / 12.0)
    chol[:, :] = 0.0
    for a in range(n):
        s = mat[a, a]
        for k in range(a):
            s -= chol[a, k] * chol[a, k]
        chol[a, a] = np.sqrt(s)
        for b in range(a + 1, n):
            t = mat[b, a]
            for k in range(a):
                t -= chol[b, k] * chol[a, k]
            chol[b, a] = t / chol[a, a]


@njit(**OPTS)
def solve_coarsest(chol, r, e, h, w, work) -> None:
    """`e = A^-1 r` on the coarsest grid (`r` is zero on known cells, and so is `e`)."""
    n = h * w
    for a in range(n):
        s = np.float64(r[a // w + 1, a % w + 1])
        for k in range(a):
            s -= chol[a, k] * work[k]
        work[a] = s / chol[a, a]
    for a in range(n - 1, -1, -1):
        s = work[a]
        for k in range(a + 1, n):
            s -= chol[k, a] * work[k]
        work[a] = s / chol[a, a]
    for a in range(n):
        e[a // w + 1, a % w + 1] = work[a]


@njit(**OPTS)
def vcycle(r0, z, presmoothed, shapes, off, sides, inv, e, r, t, half, chol, work, scratch):
    """`z = M r0` for the finest grid's residual `r0`, a symmetric V-cycle from zero; returns
    `(sum(r0 * z), max |z|)`. One Jacobi sweep before and one after the coarse correction on the finest
    grid (the one before is `inv * r0`, already in `e`'s finest plane when `presmoothed`), `SWEEPS`
    before and after on the others.
    """
    n = shapes.shape[0]
    for k in range(n - 1):  # down: smooth, then restrict the residual to the next grid
        h, w, hc, wc = shapes[k, 0], shapes[k, 1], shapes[k + 1, 0], shapes[k + 1, 1]
        ik, ek = grid_view(inv, off, shapes, k), grid_view(e, off, shapes, k)
        tk, rk = grid_view(t, off, shapes, k), r0 if k == 0 else grid_view(r, off, shapes, k)
        if k > 0 or not presmoothed:
            smooth(ek, tk, rk, ik, sides[k], h, w, 1 if k == 0 else SWEEPS, True)
        rc, ic = grid_view(r, off, shapes, k + 1), grid_view(inv, off, shapes, k + 1)
        restrict(ek, rk, ik, sides[k], tk, half, rc, ic, h, w, hc, wc)
    last = n - 1
    er, rr = grid_view(e, off, shapes, last), grid_view(r, off, shapes, last)
    solve_coarsest(chol, rr, er, shapes[last, 0], shapes[last, 1], work)
    for k in range(n - 2, -1, -1):  # up: add the coarse correction, then smooth
        h, w, hc, wc = shapes[k, 0], shapes[k, 1], shapes[k + 1, 0], shapes[k + 1, 1]
        ik, ek = grid_view(inv, off, shapes, k), grid_view(e, off, shapes, k)
        prolong_add(grid_view(e, off, shapes, k + 1), ek, ik, half, h, w, hc, wc)
        if k > 0:
            tk, rk = grid_view(t, off, shapes, k), grid_view(r, off, shapes, k)
            smooth(ek, tk, rk, ik, sides[k], h, w, SWEEPS, False)
    e0, i0 = grid_view(e, off, shapes, 0), grid_view(inv, off, shapes, 0)
    return last_sweep(e0, r0, i0, sides[0], z, scratch, shapes[0, 0], shapes[0, 1])


@njit(**OPTS)
def relax(f, t, inv, sides, h, w, sweeps) -> None:
    """`sweeps` Jacobi sweeps on a field `f` whose known cells hold their values: each unknown cell moves
    to the weighted mean of its neighbours (`t` is scratch, its border zero).
    """
    twelfth = np.float32(1.0 / 12.0)
    for k in range(sweeps):
        src, dst = (f, t) if k % 2 == 0 else (t, f)
        for i in range(1, h + 1):
            up, mid, down, out, iv, sy = src[i - 1], src[i], src[i + 1], dst[i], inv[i], row_sides(i, h)
            for j in range(1, w + 1):
                d = (sy * sides[j] - np.float32(4.0)) * twelfth
                out[j] = mid[j] + iv[j] * (stencil(up, mid, down, j) * twelfth - d * mid[j])
    if sweeps % 2 == 1:
        f[1 : h + 1, 1 : w + 1] = t[1 : h + 1, 1 : w + 1]


@njit(**OPTS)
def fmg(x, shapes, off, sides, inv, e, r, t, kept, field, half, chol, work, scratch) -> None:
    """The full-multigrid start, into `x`'s unknown cells (its kept cells hold the image).

    Each coarse grid's own problem, whose kept cells hold the mean of their kept pixels, is solved
    exactly on the coarsest grid, then prolonged to each finer grid and smoothed there by `FMG_SWEEPS`
    Jacobi sweeps (`FMG_FINE_SWEEPS` on the finest). `field` holds each grid's kept-pixel sums (`kept`
    their counts), then its field.
    """
    n = shapes.shape[0]
    for k in range(1, n):
        box_sum(
            x if k == 1 else grid_view(field, off, shapes, k - 1),
            grid_view(field, off, shapes, k),
            shapes[k, 0],
            shapes[k, 1],
        )
    for k in range(n - 1, 0, -1):
        h, w = shapes[k, 0], shapes[k, 1]
        fk, kk, ik = (
            grid_view(field, off, shapes, k),
            grid_view(kept, off, shapes, k),
            grid_view(inv, off, shapes, k),
        )
        for i in range(1, h + 1):
            fr, kr = fk[i], kk[i]
            for j in range(1, w + 1):
                fr[j] = fr[j] / max(kr[j], np.float32(1.0))  # 0 on unknown cells, whose sums are 0
        if k == n - 1:
            rk, ek = grid_view(r, off, shapes, k), grid_view(e, off, shapes, k)
            true_residual(fk, ik, sides[k], rk, scratch, h, w)
            solve_coarsest(chol, rk, ek, h, w, work)
            fk += ek
        else:
            prolong_add(
                grid_view(field, off, shapes, k + 1), fk, ik, half, h, w, shapes[k + 1, 0], shapes[k + 1, 1]
            )
            relax(fk, grid_view(t, off, shapes, k), ik, sides[k], h, w, FMG_SWEEPS)
    if n > 1:
        h0, w0 = shapes[0, 0], shapes[0, 1]
        i0 = grid_view(inv, off, shapes, 0)
        prolong_add(grid_view(field, off, shapes, 1), x, i0, half, h0, w0, shapes[1, 0], shapes[1, 1])
        relax(x, grid_view(t, off, shapes, 0), i0, sides[0], h0, w0, FMG_FINE_SWEEPS)


@njit(**OPTS)
def workspace(h, w):
    """A thread's buffers for `[h, w]` planes (each grid's planes one after the other, `grid_view`),
    zeroed once: every pass writes the interior of what it fills, so the borders stay zero from plane
    to plane.
    """
    shapes = grid_shapes(h, w)
    n = shapes.shape[0]
    off = np.zeros(n + 1, dtype=np.int64)
    for k in range(n):
        off[k + 1] = off[k] + (shapes[k, 0] + 2) * (shapes[k, 1] + 2)
    grids = np.zeros((7, off[n]), np.float32)  # unknown, inv, e, r, t, kept, field
    sides = np.zeros((n, w + 2), np.float32)
    for k in range(n):
        wk = shapes[k, 1]
        for j in range(1, wk + 1):
            sides[k, j] = 2 + (j > 1) + (j < wk)
    fields = np.zeros((5, h + 2, w + 2), np.float32)  # x, res, z, p, q
    nc = shapes[n - 1, 0] * shapes[n - 1, 1]
    chol, work = np.zeros((nc, nc)), np.zeros(nc)
    half = np.zeros((h // 2 + 3, w + 2), np.float32)
    scratch = np.zeros(w + 2, np.float32)
    return shapes, off, sides, grids, fields, half, scratch, chol, work


@njit(**OPTS)
def prepare_plane(removed, ws) -> None:
    """The operator of one removal mask on every grid, and the coarsest grid's factor. A coarse cell is
    unknown when it covers no kept pixel.
    """
    shapes, off, sides, grids, _, _, _, chol, _ = ws
    unknown, inv, kept = grids[0], grids[1], grids[5]
    n = shapes.shape[0]
    h, w = shapes[0, 0], shapes[0, 1]
    u0, k0 = grid_view(unknown, off, shapes, 0), grid_view(kept, off, shapes, 0)
    for i in range(h):
        for j in range(w):
            u0[i + 1, j + 1] = 1.0 if removed[i, j] else 0.0
            k0[i + 1, j + 1] = 0.0 if removed[i, j] else 1.0
    for k in range(1, n):
        kk, uk = grid_view(kept, off, shapes, k), grid_view(unknown, off, shapes, k)
        box_sum(grid_view(kept, off, shapes, k - 1), kk, shapes[k, 0], shapes[k, 1])
        for i in range(1, shapes[k, 0] + 1):
            for j in range(1, shapes[k, 1] + 1):
                uk[i, j] = 1.0 if kk[i, j] == 0.0 else 0.0
    for k in range(n):
        inverse_weights(
            grid_view(unknown, off, shapes, k),
            sides[k],
            grid_view(inv, off, shapes, k),
            shapes[k, 0],
            shapes[k, 1],
        )
    cholesky(grid_view(unknown, off, shapes, n - 1), sides[n - 1], shapes[n - 1, 0], shapes[n - 1, 1], chol)
