"""The compiled CPU solve's passes over one plane (numba): the operator, a Jacobi sweep, a CG step, the
true residual, the restriction and the prolongation, each one loop over the plane's rows.

Planes are float32 `[h + 2, w + 2]` with a zero border (interior `[1:h+1, 1:w+1]`), so the 8-neighbour
stencil needs no bounds checks: out-of-image neighbours read 0 and drop out, as the system says.
Each grid's operator is two arrays: `inv` (1 / the cell's in-image neighbour weight on removed cells, 0
on kept ones: the mask too) and `sides` (per column, 2 + its in-image horizontal neighbours; the weight
of cell (i, j) is (sy_i * sides_j - 4) / 12, computed, not stored); iterates and residuals are zero
outside the removed cells. Loops are written row by row with reductions in loops of their own, so that
LLVM vectorises them; a maximum is taken over the float's bits as integers (for non-negative floats the
order is the same), which vectorises too.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Every kernel's compile options; `cache` keeps the machine code (see `metrics.imputation.cpu`).
OPTS = {"cache": True, "fastmath": True, "nogil": True, "error_model": "numpy", "boundscheck": False}


@njit(**OPTS)
def stencil(up, mid, down, j):
    """`12 * sum_j w_ij e_j` over the 8 neighbours of column `j` (edge weight 2, diagonal 1)."""
    return np.float32(2.0) * (up[j] + down[j] + mid[j - 1] + mid[j + 1]) + (
        up[j - 1] + up[j + 1] + down[j - 1] + down[j + 1]
    )


@njit(**OPTS)
def row_sides(i, h):
    """Row `i`'s 2 + in-image vertical neighbours, as a float32."""
    return np.float32(2 + (i > 1) + (i < h))


@njit(**OPTS)
def max_bits(row, w, m):
    """`max(m, row[1:w+1])` for non-negative float32 values, compared as int32 bits (vectorises)."""
    bits = row.view(np.int32)
    for j in range(1, w + 1):
        m = max(m, bits[j])
    return m


@njit(**OPTS)
def as_float(bits):
    """The float32 whose bits are the int32 `bits`."""
    return np.array([bits], dtype=np.int32).view(np.float32)[0]


@njit(**OPTS)
def apply_operator(p, z, beta, inv, sides, q, h, w):
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
        up, mid, down, o, iv, sy = p[i - 1], p[i], p[i + 1], q[i], inv[i], row_sides(i, h)
        for j in range(1, w + 1):
            d = (sy * sides[j] - np.float32(4.0)) * twelfth
            o[j] = d * mid[j] - stencil(up, mid, down, j) * twelfth if iv[j] > 0 else np.float32(0.0)
        acc = np.float32(0.0)
        for j in range(1, w + 1):
            acc += mid[j] * o[j]
        dot += acc
    return dot


@njit(**OPTS)
def jacobi(e, r, inv, sides, out, h, w) -> None:
    """One Jacobi sweep on `A e = r` into `out`: `e + inv (r - A e)` (0 on known cells, as `inv`)."""
    twelfth = np.float32(1.0 / 12.0)
    for i in range(1, h + 1):
        up, mid, down, o, rr, iv, sy = e[i - 1], e[i], e[i + 1], out[i], r[i], inv[i], row_sides(i, h)
        for j in range(1, w + 1):
            d = (sy * sides[j] - np.float32(4.0)) * twelfth
            o[j] = mid[j] + iv[j] * (rr[j] - d * mid[j] + stencil(up, mid, down, j) * twelfth)


@njit(**OPTS)
def last_sweep(e, r, inv, sides, z, scratch, h, w):
    """`jacobi` into `z`, returning `(sum(r * z), max |z|)`."""
    jacobi(e, r, inv, sides, z, h, w)
    dot, worst = 0.0, 0
    for i in range(1, h + 1):
        zr, rr = z[i], r[i]
        acc = np.float32(0.0)
        for j in range(1, w + 1):
            acc += rr[j] * zr[j]
            scratch[j] = abs(zr[j])
        dot += acc
        worst = max_bits(scratch, w, worst)
    return dot, as_float(worst)


@njit(**OPTS)
def smooth(e, t, r, inv, sides, h, w, sweeps, from_zero) -> None:
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
            jacobi(e, r, inv, sides, t, h, w)
        else:
            jacobi(t, r, inv, sides, e, h, w)
    if (sweeps - start) % 2 == 1:
        e[1 : h + 1, 1 : w + 1] = t[1 : h + 1, 1 : w + 1]


@njit(**OPTS)
def cg_step(x, res, p, q, inv, e, alpha, h, w) -> None:
    """`x += alpha p`, `res -= alpha q`, and the finest grid's first smoothing `e = inv * res`."""
    a = np.float32(alpha)
    for i in range(1, h + 1):
        xr, rr, pr, qr, iv, er = x[i], res[i], p[i], q[i], inv[i], e[i]
        for j in range(1, w + 1):
            xr[j] += a * pr[j]
            v = rr[j] - a * qr[j]
            rr[j] = v
            er[j] = iv[j] * v


@njit(**OPTS)
def true_residual(u, inv, sides, r, scratch, h, w):
    """`r = sum_j w_ij u_j - d_i u_i` on the unknown cells of the field `u`, recomputed from the field
    (not the CG recurrence) in float64 arithmetic: with few kept pixels the system is nearly singular,
    and float32 cancellation here (about 1e-7) would be amplified into errors of 1e-4. Returns the worst
    normalised residual `max |r_i| / d_i`.
    """
    worst = 0
    for i in range(1, h + 1):
        up, mid, down, rr, iv, sy = u[i - 1], u[i], u[i + 1], r[i], inv[i], row_sides(i, h)
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
        worst = max_bits(scratch, w, worst)
    return as_float(worst)


@njit(**OPTS)
def restrict(e, r, inv, sides, res, half, coarse_r, coarse_inv, h, w, hc, wc) -> None:
    """Coarse `r` = the residual `r - A e` restricted by `P^T` (P the clamped bilinear prolongation of
    `prolong_add`), on the coarse grid's unknown cells.

    Per axis, coarse cell I gathers fine cells 2I-1, 2I, 2I+1, 2I+2 with weights 1/4, 3/4, 3/4, 1/4; the
    outer quarter of the first and last fine cells folds back onto the edge cells. `res` (zero border)
    receives the residual, `half` the pass along the rows.
    """
    twelfth = np.float32(1.0 / 12.0)
    for i in range(1, h + 1):
        up, mid, down, rs, rr, iv, sy = e[i - 1], e[i], e[i + 1], res[i], r[i], inv[i], row_sides(i, h)
        for j in range(1, w + 1):
            d = (sy * sides[j] - np.float32(4.0)) * twelfth
            ae = d * mid[j] - stencil(up, mid, down, j) * twelfth
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


@njit(**OPTS)
def prolong_add(c, e, inv, half, h, w, hc, wc) -> None:
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
