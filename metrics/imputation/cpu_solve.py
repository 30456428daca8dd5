"""The compiled CPU solve of one plane, and of every plane of a batch on numba's threads: conjugate
gradients preconditioned by the V-cycle, from the full-multigrid start, stopped when the error estimate
is within `tol` and confirmed from the true residual.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from metrics.imputation.cpu_grids import fmg, grid_view, prepare_plane, solve_coarsest, vcycle
from metrics.imputation.cpu_passes import OPTS, apply_operator, cg_step, true_residual


@njit(**OPTS)
def solve_plane(plane, removed, noise, tol, max_iter, ws):
    """Fill the removed cells of one `[h, w]` plane in place, with the operator `prepare_plane` left in `ws`,
    and add `noise [h, w]` to them (none when it is empty); returns (iterations, error estimate).
    """
    shapes, off, sides, grids, fields, half, scratch, chol, work = ws
    inv, e, r, t, kept, field = grids[1], grids[2], grids[3], grids[4], grids[5], grids[6]
    x, res, z, p, q = fields[0], fields[1], fields[2], fields[3], fields[4]
    n = shapes.shape[0]
    h, w = plane.shape
    i0, e0 = grid_view(inv, off, shapes, 0), grid_view(e, off, shapes, 0)
    for i in range(h):
        for j in range(w):
            x[i + 1, j + 1] = 0.0 if removed[i, j] else plane[i, j]
    it = 0
    if n == 1:  # small enough for the dense solve
        true_residual(x, i0, sides[0], res, scratch, h, w)
        solve_coarsest(chol, res, e0, h, w, work)
        x += e0
        worst = true_residual(x, i0, sides[0], res, scratch, h, w)
    else:
        fmg(x, shapes, off, sides, inv, e, r, t, kept, field, half, chol, work, scratch)
        true_residual(x, i0, sides[0], res, scratch, h, w)
        rz, worst = vcycle(res, z, False, shapes, off, sides, inv, e, r, t, half, chol, work, scratch)
        beta = 0.0  # p = z
        while worst > tol and it < max_iter:
            it += 1
            alpha = rz / apply_operator(p, z, beta, i0, sides[0], q, h, w)
            cg_step(x, res, p, q, i0, e0, alpha, h, w)
            rz_new, worst = vcycle(res, z, True, shapes, off, sides, inv, e, r, t, half, chol, work, scratch)
            beta = rz_new / rz
            rz = rz_new
            if worst <= tol:  # confirm from the true residual; go on from it where it disagrees
                true_residual(x, i0, sides[0], res, scratch, h, w)
                rz, worst = vcycle(res, z, False, shapes, off, sides, inv, e, r, t, half, chol, work, scratch)
                beta = 0.0
    if noise.shape[0]:
        for i in range(h):
            for j in range(w):
                plane[i, j] = x[i + 1, j + 1] + noise[i, j] if removed[i, j] else x[i + 1, j + 1]
    else:
        plane[:, :] = x[1 : h + 1, 1 : w + 1]
    return it, worst


@njit(parallel=True, **OPTS)
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
            prepare_plane(removed[i], ws)
            for ch in range(first, c if per_image else first + 1):
                nz = noise[i, ch] if noise.shape[0] else none
                it, wr = solve_plane(planes[i, ch], removed[i], nz, tol, max_iter, ws)
                iterations[i, ch] = it
                worst[i, ch] = wr
