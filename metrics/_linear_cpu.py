"""The linear imputation's solve on the CPU, compiled with numba: one (image, channel) plane per thread.

The system, the method and the stopping rule are `metrics.imputation`'s (conjugate gradients
preconditioned by a symmetric geometric-multigrid V-cycle, started from a full-multigrid guess, stopped
when every removed pixel's normalised residual is within `tol`, confirmed with the true residual). Here
each step is a loop that makes one pass over a plane, so that a CG iteration reads and writes a plane
about ten times instead of forty, with no per-operation overhead, and each plane is solved on its own:
a result depends neither on its batch nor on the number of threads.

Planes are float32 `[h + 2, w + 2]` with a zero border (interior `[1:h+1, 1:w+1]`), so the 8-neighbour
stencil needs no bounds checks: out-of-image neighbours read 0 and drop out, as the system says.
Each grid's operator is two arrays: `inv` (1 / the cell's in-image neighbour weight on removed cells, 0
on kept ones: the mask too) and `sides` (per column, 2 + its in-image horizontal neighbours; the weight
of cell (i, j) is (sy_i * sides_j - 4) / 12, computed, not stored); iterates and residuals are zero
outside the removed cells. Loops are written row
by row with reductions in loops of their own, so that LLVM vectorises them; a maximum is taken over
the float's bits as integers (for non-negative floats the order is the same), which vectorises too.
"""

from __future__ import annotations

import os

import numba
import numba.np.ufunc.parallel
import numpy as np
import torch
from numba import njit, prange

_COARSEST = 64  # cells on the coarsest grid, solved by a dense Cholesky factorisation
_SWEEPS = 2  # Jacobi sweeps before and after each coarse correction on the coarse grids (1 on the finest)
_FMG_SWEEPS = 2  # Jacobi sweeps on each coarse grid of the full-multigrid start
_FMG_FINE_SWEEPS = 2  # and on the finest grid
_OPTS = {"cache": True, "fastmath": True, "nogil": True, "error_model": "numpy", "boundscheck": False}
_TWELFTH = np.float32(1.0 / 12.0)


# -- passes over a plane ----------------------------------------------------------------------------------


@njit(**_OPTS)
def _stencil(up, mid, down, j):
    """`12 * sum_j w_ij e_j` over the 8 neighbours of column `j` (edge weight 2, diagonal 1)."""
    return np.float32(2.0) * (up[j] + down[j] + mid[j - 1] + mid[j + 1]) + (
        up[j - 1] + up[j + 1] + down[j - 1] + down[j + 1]
    )


@njit(**_OPTS)
def _sy(i, h):
    """Row `i`'s 2 + in-image vertical neighbours, as a float32."""
    return np.float32(2 + (i > 1) + (i < h))


@njit(**_OPTS)
def _max_bits(row, w, m):
    """`max(m, row[1:w+1])` for non-negative float32 values, compared as int32 bits (vectorises)."""
    bits = row.view(np.int32)
    for j in range(1, w + 1):
        m = max(m, bits[j])
    return m


@njit(**_OPTS)
def _as_float(bits):
    return np.array([bits], dtype=np.int32).view(np.float32)[0]


@njit(**_OPTS)
def _apply(p, z, beta, inv, sides, q, h, w):
    """`p = z + beta p`, then `q = A p` on the unknown cells; returns `sum(p * q)`. The direction's rows
    are updated one ahead of the rows of `q` that read them.
    """
    b = np.float32(beta)
    twelfth = np.float32(1.0 / 12.0)
    dot = 0.0
    for j in range(1, w + 1):
        p[1, j] = z[1, j] + b * p[1, j]
    for i in range(1, h + 1):
        if i < h:
            nxt, zn = p[i + 1], z[i + 1]
            for j in range(1, w + 1):
                nxt[j] = zn[j] + b * nxt[j]
        up, mid, down, o, iv, sy = p[i - 1], p[i], p[i + 1], q[i], inv[i], _sy(i, h)
        for j in range(1, w + 1):
            d = (sy * sides[j] - np.float32(4.0)) * twelfth
            o[j] = d * mid[j] - _stencil(up, mid, down, j) * twelfth if iv[j] > 0 else np.float32(0.0)
        acc = np.float32(0.0)
        for j in range(1, w + 1):
            acc += mid[j] * o[j]
        dot += acc
    return dot


@njit(**_OPTS)
def _jacobi(e, r, inv, sides, out, h, w) -> None:
    """One Jacobi sweep on `A e = r` into `out`: `e + inv (r - A e)` (0 on known cells, as `inv`)."""
    twelfth = np.float32(1.0 / 12.0)
    for i in range(1, h + 1):
        up, mid, down, o, rr, iv, sy = e[i - 1], e[i], e[i + 1], out[i], r[i], inv[i], _sy(i, h)
        for j in range(1, w + 1):
            d = (sy * sides[j] - np.float32(4.0)) * twelfth
            o[j] = mid[j] + iv[j] * (rr[j] - d * mid[j] + _stencil(up, mid, down, j) * twelfth)


@njit(**_OPTS)
def _last_sweep(e, r, inv, sides, z, scratch, h, w):
    """`_jacobi` into `z`, returning `(sum(r * z), max |z|)`."""
    _jacobi(e, r, inv, sides, z, h, w)
    dot, worst = 0.0, 0
    for i in range(1, h + 1):
        zr, rr = z[i], r[i]
        acc = np.float32(0.0)
        for j in range(1, w + 1):
            acc += rr[j] * zr[j]
            scratch[j] = abs(zr[j])
        dot += acc
        worst = _max_bits(scratch, w, worst)
    return dot, _as_float(worst)


@njit(**_OPTS)
def _smooth(e, t, r, inv, sides, h, w, sweeps, from_zero) -> None:
    """`sweeps` Jacobi sweeps on `A e = r` in `e` (`t` is scratch); from zero, the first is `inv * r`."""
    start = 0
    if from_zero:
        for i in range(1, h + 1):
            er, rr, iv = e[i], r[i], inv[i]
            for j in range(1, w + 1):
                er[j] = iv[j] * rr[j]
        start = 1
    for k in range(sweeps - start):  # e -> t -> e ...
        if k % 2 == 0:
            _jacobi(e, r, inv, sides, t, h, w)
        else:
            _jacobi(t, r, inv, sides, e, h, w)
    if (sweeps - start) % 2 == 1:
        e[1 : h + 1, 1 : w + 1] = t[1 : h + 1, 1 : w + 1]


@njit(**_OPTS)
def _step(x, res, p, q, inv, e, alpha, h, w) -> None:
    """`x += alpha p`, `res -= alpha q`, and the finest grid's first smoothing `e = inv * res`."""
    a = np.float32(alpha)
    for i in range(1, h + 1):
        xr, rr, pr, qr, iv, er = x[i], res[i], p[i], q[i], inv[i], e[i]
        for j in range(1, w + 1):
            xr[j] += a * pr[j]
            v = rr[j] - a * qr[j]
            rr[j] = v
            er[j] = iv[j] * v


@njit(**_OPTS)
def _true_residual(u, inv, sides, r, scratch, h, w):
    """`r = sum_j w_ij u_j - d_i u_i` on the unknown cells of the field `u`, recomputed from the field
    (not the CG recurrence) in float64 arithmetic: with few kept pixels the system is nearly singular,
    and float32 cancellation here (about 1e-7) would be amplified into errors of 1e-4. Returns the worst
    normalised residual `max |r_i| / d_i`.
    """
    worst = 0
    for i in range(1, h + 1):
        up, mid, down, rr, iv, sy = u[i - 1], u[i], u[i + 1], r[i], inv[i], _sy(i, h)
        for j in range(1, w + 1):
            s = 2.0 * (
                np.float64(up[j]) + np.float64(down[j]) + np.float64(mid[j - 1]) + np.float64(mid[j + 1])
            ) + (
                np.float64(up[j - 1])
                + np.float64(up[j + 1])
                + np.float64(down[j - 1])
                + np.float64(down[j + 1])
            )
            d = (np.float64(sy) * np.float64(sides[j]) - 4.0) / 12.0
            v = np.float32(s / 12.0 - d * np.float64(mid[j])) if iv[j] > 0 else np.float32(0.0)
            rr[j] = v
            scratch[j] = abs(v) * iv[j]
        worst = _max_bits(scratch, w, worst)
    return _as_float(worst)


@njit(**_OPTS)
def _restrict(e, r, inv, sides, res, half, coarse_r, coarse_inv, h, w, hc, wc) -> None:
    """Coarse `r` = the residual `r - A e` restricted by `P^T` (P the clamped bilinear prolongation of
    `_prolong_add`), on the coarse grid's unknown cells.

    Per axis, coarse cell I gathers fine cells 2I-1, 2I, 2I+1, 2I+2 with weights 1/4, 3/4, 3/4, 1/4; the
    outer quarter of the first and last fine cells folds back onto the edge cells. `res` (zero border)
    receives the residual, `half` the pass along the rows.
    """
    twelfth = np.float32(1.0 / 12.0)
    for i in range(1, h + 1):
        up, mid, down, rs, rr, iv, sy = e[i - 1], e[i], e[i + 1], res[i], r[i], inv[i], _sy(i, h)
        for j in range(1, w + 1):
            d = (sy * sides[j] - np.float32(4.0)) * twelfth
            ae = d * mid[j] - _stencil(up, mid, down, j) * twelfth
            rs[j] = rr[j] - ae if iv[j] > 0 else np.float32(0.0)
    quarter = np.float32(0.25)
    for ci in range(hc):
        a1 = np.float32(1.0 if ci == 0 else 0.75)
        a2 = np.float32(1.0 if (ci == hc - 1 and 2 * ci + 1 < h) else 0.75)
        a3 = np.float32(0.25 if 2 * ci + 3 <= h + 1 else 0.0)
        r0, r1, r2, r3 = res[2 * ci], res[2 * ci + 1], res[2 * ci + 2], res[min(2 * ci + 3, h + 1)]
        hr = half[ci]
        for j in range(w + 2):
            hr[j] = quarter * r0[j] + a1 * r1[j] + a2 * r2[j] + a3 * r3[j]
    for ci in range(hc):
        hr, cr, ci_ = half[ci], coarse_r[ci + 1], coarse_inv[ci + 1]
        for cj in range(wc):
            b1 = np.float32(1.0 if cj == 0 else 0.75)
            b2 = np.float32(1.0 if (cj == wc - 1 and 2 * cj + 1 < w) else 0.75)
            b3 = np.float32(0.25 if 2 * cj + 3 <= w + 1 else 0.0)
            s = (
                quarter * hr[2 * cj]
                + b1 * hr[2 * cj + 1]
                + b2 * hr[2 * cj + 2]
                + b3 * hr[min(2 * cj + 3, w + 1)]
            )
            cr[cj + 1] = s if ci_[cj + 1] > 0 else np.float32(0.0)


@njit(**_OPTS)
def _prolong_add(c, e, inv, half, h, w, hc, wc) -> None:
    """`e += P c` on the unknown cells: per axis fine cell 2I gets (3 c[I] + c[I-1]) / 4 and 2I+1 gets
    (3 c[I] + c[I+1]) / 4, clamped at the edges (c[-1] = c[0], c[n] = c[n-1]). `half` holds the pass
    along the columns, its first and last rows repeated.
    """
    quarter, three = np.float32(0.25), np.float32(0.75)
    for ci in range(1, hc + 1):
        hr, cr = half[ci], c[ci]
        for j in range(w):
            cj = j // 2 + 1
            hr[j] = three * cr[cj] + quarter * cr[min(max(cj - 1 + 2 * (j % 2), 1), wc)]
    half[0, :w] = half[1, :w]
    half[hc + 1, :w] = half[hc, :w]
    for i in range(h):
        near, far = half[i // 2 + 1], half[i // 2 + 2 * (i % 2)]
        er, iv = e[i + 1], inv[i + 1]
        for j in range(w):
            er[j + 1] += three * near[j] + quarter * far[j] if iv[j + 1] > 0 else np.float32(0.0)


# -- the grids --------------------------------------------------------------------------------------------


@njit(**_OPTS)
def _shapes(h, w):
    """`[L, 2]` interior sizes of the grids, halving (rounding up) until at most `_COARSEST` cells."""
    n, a, b = 1, h, w
    while a * b > _COARSEST:
        a, b, n = (a + 1) // 2, (b + 1) // 2, n + 1
    out = np.empty((n, 2), dtype=np.int64)
    a, b = h, w
    for k in range(n):
        out[k, 0], out[k, 1] = a, b
        a, b = (a + 1) // 2, (b + 1) // 2
    return out


@njit(**_OPTS)
def _view(buf, off, shapes, k):
    """Grid `k`'s bordered plane in a buffer holding every grid's, one after the other."""
    return buf[off[k] : off[k + 1]].reshape((shapes[k, 0] + 2, shapes[k, 1] + 2))


@njit(**_OPTS)
def _inverse(unknown, sides, inv, h, w) -> None:
    """`inv = unknown / d` with d = (sy * sx - 4) / 12 the in-image neighbour weight: 1 inside, 2/3 on
    the edges, 5/12 in the corners (0 where a 1x1 image has no neighbour).
    """
    for i in range(1, h + 1):
        sy = _sy(i, h)
        for j in range(1, w + 1):
            d = (sy * sides[j] - 4) / np.float32(12.0)
            inv[i, j] = unknown[i, j] / d if d > 0 else 0.0


@njit(**_OPTS)
def _box(fine, coarse, hc, wc) -> None:
    """Sums over each coarse cell's 2x2 children (children beyond an odd edge are the zero border)."""
    for ci in range(hc):
        top, bottom, out = fine[2 * ci + 1], fine[2 * ci + 2], coarse[ci + 1]
        for cj in range(wc):
            out[cj + 1] = top[2 * cj + 1] + top[2 * cj + 2] + bottom[2 * cj + 1] + bottom[2 * cj + 2]


@njit(**_OPTS)
def _cholesky(unknown, sides, h, w, chol) -> None:
    """The coarsest grid's operator on its unknown cells (identity elsewhere), factorised into `chol`."""
    n = h * w
    mat = np.zeros((n, n))
    for i in range(h):
        for j in range(w):
            a = i * w + j
            if unknown[i + 1, j + 1] == 0.0:
                mat[a, a] = 1.0
                continue
            mat[a, a] = (_sy(i + 1, h) * sides[j + 1] - 4) / 12.0
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


@njit(**_OPTS)
def _solve_coarsest(chol, r, e, h, w, work) -> None:
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


@njit(**_OPTS)
def _vcycle(r0, z, presmoothed, shapes, off, sides, inv, e, r, t, half, chol, work, scratch):
    """`z = M r0` for the finest grid's residual `r0`, a symmetric V-cycle from zero; returns
    `(sum(r0 * z), max |z|)`. One Jacobi sweep before and one after the coarse correction on the finest
    grid (the one before is `inv * r0`, already in `e`'s finest plane when `presmoothed`), `_SWEEPS`
    before and after on the others.
    """
    n = shapes.shape[0]
    for k in range(n - 1):
        h, w = shapes[k, 0], shapes[k, 1]
        ik, sk, ek, tk = (
            _view(inv, off, shapes, k),
            sides[k],
            _view(e, off, shapes, k),
            _view(t, off, shapes, k),
        )
        rk = r0 if k == 0 else _view(r, off, shapes, k)
        if k > 0 or not presmoothed:
            _smooth(ek, tk, rk, ik, sk, h, w, 1 if k == 0 else _SWEEPS, True)
        _restrict(
            ek,
            rk,
            ik,
            sk,
            tk,
            half,
            _view(r, off, shapes, k + 1),
            _view(inv, off, shapes, k + 1),
            h,
            w,
            shapes[k + 1, 0],
            shapes[k + 1, 1],
        )
    last = n - 1
    _solve_coarsest(
        chol, _view(r, off, shapes, last), _view(e, off, shapes, last), shapes[last, 0], shapes[last, 1], work
    )
    for k in range(n - 2, -1, -1):
        h, w = shapes[k, 0], shapes[k, 1]
        ik, ek = _view(inv, off, shapes, k), _view(e, off, shapes, k)
        _prolong_add(_view(e, off, shapes, k + 1), ek, ik, half, h, w, shapes[k + 1, 0], shapes[k + 1, 1])
        if k > 0:
            _smooth(
                ek, _view(t, off, shapes, k), _view(r, off, shapes, k), ik, sides[k], h, w, _SWEEPS, False
            )
    return _last_sweep(
        _view(e, off, shapes, 0),
        r0,
        _view(inv, off, shapes, 0),
        sides[0],
        z,
        scratch,
        shapes[0, 0],
        shapes[0, 1],
    )


@njit(**_OPTS)
def _relax(f, t, inv, sides, h, w, sweeps) -> None:
    """`sweeps` Jacobi sweeps on a field `f` whose known cells hold their values: each unknown cell moves
    to the weighted mean of its neighbours (`t` is scratch, its border zero).
    """
    twelfth = np.float32(1.0 / 12.0)
    for k in range(sweeps):
        src, dst = (f, t) if k % 2 == 0 else (t, f)
        for i in range(1, h + 1):
            up, mid, down, out, iv, sy = src[i - 1], src[i], src[i + 1], dst[i], inv[i], _sy(i, h)
            for j in range(1, w + 1):
                d = (sy * sides[j] - np.float32(4.0)) * twelfth
                out[j] = mid[j] + iv[j] * (_stencil(up, mid, down, j) * twelfth - d * mid[j])
    if sweeps % 2 == 1:
        f[1 : h + 1, 1 : w + 1] = t[1 : h + 1, 1 : w + 1]


@njit(**_OPTS)
def _fmg(x, shapes, off, sides, inv, e, r, t, kept, field, half, chol, work, scratch) -> None:
    """The full-multigrid start, into `x`'s unknown cells (its kept cells hold the image).

    Each coarse grid's own problem, whose kept cells hold the mean of their kept pixels, is solved
    exactly on the coarsest grid, then prolonged to each finer grid and smoothed there by `_FMG_SWEEPS`
    Jacobi sweeps (`_FMG_FINE_SWEEPS` on the finest). `field` holds each grid's kept-pixel sums (`kept`
    their counts), then its field.
    """
    n = shapes.shape[0]
    for k in range(1, n):
        _box(
            x if k == 1 else _view(field, off, shapes, k - 1),
            _view(field, off, shapes, k),
            shapes[k, 0],
            shapes[k, 1],
        )
    for k in range(n - 1, 0, -1):
        h, w = shapes[k, 0], shapes[k, 1]
        fk, kk, ik = _view(field, off, shapes, k), _view(kept, off, shapes, k), _view(inv, off, shapes, k)
        for i in range(1, h + 1):
            fr, kr = fk[i], kk[i]
            for j in range(1, w + 1):
                fr[j] = fr[j] / max(kr[j], np.float32(1.0))  # 0 on unknown cells, whose sums are 0
        if k == n - 1:
            rk, ek = _view(r, off, shapes, k), _view(e, off, shapes, k)
            _true_residual(fk, ik, sides[k], rk, scratch, h, w)
            _solve_coarsest(chol, rk, ek, h, w, work)
            fk += ek
        else:
            _prolong_add(
                _view(field, off, shapes, k + 1), fk, ik, half, h, w, shapes[k + 1, 0], shapes[k + 1, 1]
            )
            _relax(fk, _view(t, off, shapes, k), ik, sides[k], h, w, _FMG_SWEEPS)
    if n > 1:
        h0, w0 = shapes[0, 0], shapes[0, 1]
        i0 = _view(inv, off, shapes, 0)
        _prolong_add(_view(field, off, shapes, 1), x, i0, half, h0, w0, shapes[1, 0], shapes[1, 1])
        _relax(x, _view(t, off, shapes, 0), i0, sides[0], h0, w0, _FMG_FINE_SWEEPS)


@njit(**_OPTS)
def _workspace(h, w):
    """A thread's buffers for `[h, w]` planes (see `_Grids`), zeroed once: every pass writes the
    interior of what it fills, so the borders stay zero from plane to plane.
    """
    shapes = _shapes(h, w)
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


@njit(**_OPTS)
def _prepare(removed, ws) -> None:
    """The operator of one removal mask on every grid, and the coarsest grid's factor. A coarse cell is
    unknown when it covers no kept pixel.
    """
    shapes, off, sides, grids, _, _, _, chol, _ = ws
    unknown, inv, kept = grids[0], grids[1], grids[5]
    n = shapes.shape[0]
    h, w = shapes[0, 0], shapes[0, 1]
    u0, k0 = _view(unknown, off, shapes, 0), _view(kept, off, shapes, 0)
    for i in range(h):
        for j in range(w):
            u0[i + 1, j + 1] = 1.0 if removed[i, j] else 0.0
            k0[i + 1, j + 1] = 0.0 if removed[i, j] else 1.0
    for k in range(1, n):
        kk, uk = _view(kept, off, shapes, k), _view(unknown, off, shapes, k)
        _box(_view(kept, off, shapes, k - 1), kk, shapes[k, 0], shapes[k, 1])
        for i in range(1, shapes[k, 0] + 1):
            for j in range(1, shapes[k, 1] + 1):
                uk[i, j] = 1.0 if kk[i, j] == 0.0 else 0.0
    for k in range(n):
        _inverse(
            _view(unknown, off, shapes, k), sides[k], _view(inv, off, shapes, k), shapes[k, 0], shapes[k, 1]
        )
    _cholesky(_view(unknown, off, shapes, n - 1), sides[n - 1], shapes[n - 1, 0], shapes[n - 1, 1], chol)


@njit(**_OPTS)
def _solve_plane(plane, removed, noise, tol, max_iter, ws):
    """Fill the removed cells of one `[h, w]` plane in place, with the operator `_prepare` left in `ws`,
    and add `noise [h, w]` to them (none when it is empty); returns (iterations, error estimate).
    """
    shapes, off, sides, grids, fields, half, scratch, chol, work = ws
    inv, e, r, t, kept, field = grids[1], grids[2], grids[3], grids[4], grids[5], grids[6]
    x, res, z, p, q = fields[0], fields[1], fields[2], fields[3], fields[4]
    n = shapes.shape[0]
    h, w = plane.shape
    i0, e0 = _view(inv, off, shapes, 0), _view(e, off, shapes, 0)
    for i in range(h):
        for j in range(w):
            x[i + 1, j + 1] = 0.0 if removed[i, j] else plane[i, j]
    it = 0
    if n == 1:  # small enough for the dense solve
        _true_residual(x, i0, sides[0], res, scratch, h, w)
        _solve_coarsest(chol, res, e0, h, w, work)
        x += e0
        worst = _true_residual(x, i0, sides[0], res, scratch, h, w)
    else:
        _fmg(x, shapes, off, sides, inv, e, r, t, kept, field, half, chol, work, scratch)
        _true_residual(x, i0, sides[0], res, scratch, h, w)
        rz, worst = _vcycle(res, z, False, shapes, off, sides, inv, e, r, t, half, chol, work, scratch)
        beta = 0.0  # p = z
        while worst > tol and it < max_iter:
            it += 1
            alpha = rz / _apply(p, z, beta, i0, sides[0], q, h, w)
            _step(x, res, p, q, i0, e0, alpha, h, w)
            rz_new, worst = _vcycle(res, z, True, shapes, off, sides, inv, e, r, t, half, chol, work, scratch)
            beta = rz_new / rz
            rz = rz_new
            if worst <= tol:  # confirm from the true residual; go on from it where it disagrees
                _true_residual(x, i0, sides[0], res, scratch, h, w)
                rz, worst = _vcycle(
                    res, z, False, shapes, off, sides, inv, e, r, t, half, chol, work, scratch
                )
                beta = 0.0
    if noise.shape[0]:
        for i in range(h):
            for j in range(w):
                plane[i, j] = x[i + 1, j + 1] + noise[i, j] if removed[i, j] else x[i + 1, j + 1]
    else:
        plane[:, :] = x[1 : h + 1, 1 : w + 1]
    return it, worst


def warm() -> None:
    """Compile `solve_planes` for the types `fill` passes (numba caches it beside this file)."""
    planes = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)
    removed = np.zeros((1, 16, 16), dtype=bool)
    removed[0, 4:12, 4:12] = True
    fill(planes, removed, 1e-5, 100)


def fill(
    planes: np.ndarray, removed: np.ndarray, tol: float, max_iter: int, noise: np.ndarray | None = None
) -> np.ndarray:
    """Fill `planes [B, C, H, W]` (float32, C-contiguous) in place where `removed [B, H, W]` (bool) is
    True, plus `noise` (like `planes`) there when given, on as many threads as torch uses; returns each
    plane's error estimate `[B, C]` (float64).
    """
    iterations = np.zeros(planes.shape[:2], dtype=np.int64)
    estimates = np.zeros(planes.shape[:2], dtype=np.float64)
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    spaces = _workspaces(planes.shape[2], planes.shape[3], threads)
    if noise is None:
        noise = np.zeros((0, 0, 0, 0), dtype=np.float32)
    solve_planes(planes, removed, noise, float(tol), int(max_iter), threads, spaces, iterations, estimates)
    return estimates


_SPACES: dict[tuple[int, int, int], tuple] = {}


def _start_threads() -> None:
    """Start numba's threads with a passive OpenMP wait policy, for them alone.

    numba's OpenMP pool is not torch's (each library brings its own libgomp), and OpenMP threads spin for
    some milliseconds after a parallel region by default: between ROAD's imputations and its forward
    passes, this pool would spin on the cores the model needs. Passive threads sleep at once; the policy
    is read when numba loads its OpenMP runtime, which happens here, and the environment is restored.
    """
    saved = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        numba.np.ufunc.parallel._launch_threads()
    finally:
        if saved is None:
            del os.environ["OMP_WAIT_POLICY"]
        else:
            os.environ["OMP_WAIT_POLICY"] = saved


_start_threads()


def _workspaces(h: int, w: int, threads: int) -> tuple:
    """`threads` workspaces for `[h, w]` planes (`_workspace`, stacked), kept for the next call: fresh
    ones cost page faults (about 6 ms for a 224x224 workspace here, more than solving a plane). The
    last 4 sizes are kept.
    """
    key = (h, w, threads)
    if key not in _SPACES:
        one = [_workspace(h, w) for _ in range(threads)]
        _SPACES[key] = one[0][:3] + tuple(np.stack([ws[k] for ws in one]) for k in range(3, 9))
        while len(_SPACES) > 4:
            del _SPACES[next(iter(_SPACES))]
    return _SPACES[key]


@njit(parallel=True, **_OPTS)
def solve_planes(planes, removed, noise, tol, max_iter, threads, spaces, iterations, worst) -> None:
    """Fill `planes [B, C, H, W]` (float32, C-contiguous) in place where `removed [B, H, W]` is True,
    plus `noise [B, C, H, W]` there (none when `noise` is empty), on `threads` threads with the
    workspaces `spaces` (`_workspaces`); each plane's iterations and error estimate go into
    `iterations [B, C]` and `worst [B, C]`. A thread takes every `threads`-th image (its channels share
    the operator) or, with fewer images than threads, every `threads`-th plane.
    """
    b, c, h, w = planes.shape
    per_image = b >= threads
    units = b if per_image else b * c
    shapes, off, sides, grids, fields, half, scratch, chol, work = spaces
    none = np.zeros((0, 0), dtype=np.float32)
    for thread in prange(threads):
        ws = (
            shapes,
            off,
            sides,
            grids[thread],
            fields[thread],
            half[thread],
            scratch[thread],
            chol[thread],
            work[thread],
        )
        for unit in range(thread, units, threads):
            i = unit if per_image else unit // c
            first = 0 if per_image else unit % c
            _prepare(removed[i], ws)
            for ch in range(first, c if per_image else first + 1):
                nz = noise[i, ch] if noise.shape[0] else none
                it, wr = _solve_plane(planes[i, ch], removed[i], nz, tol, max_iter, ws)
                iterations[i, ch] = it
                worst[i, ch] = wr
