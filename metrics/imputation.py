"""Fill removed pixels from the kept ones: ROAD's noisy linear imputation and a channel-mean fill.

ROAD (Rong, Leemann, Borisov, Kasneci, Kasneci, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022, https://arxiv.org/abs/2202.00449) replaces removed pixels by a value
that carries no information about the removal pattern: each removed pixel becomes the weighted mean of
its 8 neighbours (1/6 for the 4 edge neighbours, 1/12 for the 4 diagonals; neighbours outside the image
are dropped and the remaining weights renormalised), all removed pixels of an image solved together, then
Gaussian noise is added to the removed pixels.

For removed pixel i with in-image neighbours N(i), weights w_ij and d_i = sum_j w_ij, the equation is

    d_i x_i - sum_{j in N(i) removed} w_ij x_j = sum_{j in N(i) kept} w_ij v_j,

one system per image, whose matrix (shared by the channels) is symmetric positive definite as long as
every connected group of removed pixels touches a kept pixel (always, unless no pixel is kept).

The reference code builds the system on the host and calls a sparse direct solver, image by image. Here it
is solved on the images' device by conjugate gradients preconditioned by a symmetric geometric-multigrid
V-cycle (Jacobi smoothing, bilinear prolongation, restriction its transpose, a coarse cell unknown when it
covers no kept pixel, a dense solve on the coarsest grid), started from a full-multigrid guess (the
hierarchy's coarse problems, solved from coarse to fine). Each (image, channel) system stops once the
V-cycle's estimate of its remaining error, `max |M r|`, is within `tol`, confirmed from the residual
recomputed from the field (in float64 arithmetic on the CPU; from differences of neighbours on other
devices), not the CG recurrence.

Two implementations of that one method (`linear_fill(solver=...)`):

- `compiled` (CPU, the default there): loops compiled by numba (`metrics._linear_cpu`), each pass over a
  plane fused into one loop, each (image, channel) plane solved on its own on one of torch's CPU threads.
  On this project's 2-core CPU it fills a 224x224 image (3 channels) in about 2.6 ms, a quarter of the
  batched-tensor version's 11 ms, whose CG iteration costs about forty small tensor operations per plane.
- `torch` (any device, the default off the CPU): batched tensor operations over images and channels,
  stencils as shifted adds of slices (never convolutions, so an image's result does not depend on its
  batch), each image's iterate frozen once it has converged; on the CPU the finest grid is worked 2
  images at a time (a pass over memory then stays in cache), the coarse grids for the whole batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Literal

import torch
from torch.nn import functional as F

Method = Literal["linear", "mean"]
METHODS = ("linear", "mean")
Solver = Literal["auto", "compiled", "torch"]
SOLVERS = ("auto", "compiled", "torch")

# Defaults of the linear solve. `TOL` bounds the V-cycle's estimate of the error left in any removed pixel,
# in [0, 1] pixel units; on 58 ROAD perturbations of the sample photos at 224x224 (Grad-CAM and saliency
# maps, 10% to 90% removed) the largest error against a sparse direct solve was 4.1e-5 (both solvers).
TOL = 2e-5
MAX_ITER = 100

_COARSEST = 64  # cells on the coarsest grid, solved by a dense Cholesky factorisation
_SWEEPS = 2  # Jacobi sweeps before and after each coarse correction on the coarse grids (1 on the finest)
_FMG_SWEEPS = 2  # Jacobi sweeps on each coarse grid of the full-multigrid start
_CPU_GROUP = 2  # images whose finest-grid work runs together on CPU, so that a pass stays in cache


class ImputationWarning(RuntimeWarning):
    """The linear imputation stopped at `max_iter` before every image reached `tol`."""


def noisy_linear_impute(
    images: torch.Tensor,
    removed: torch.Tensor,
    *,
    noise_std: float = 0.01,
    tol: float = TOL,
    max_iter: int = MAX_ITER,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """ROAD's noisy linear imputation: each removed pixel becomes the weighted mean of its 8 neighbours.

    All removed pixels of an image are solved together (see the module docstring for the equations),
    then Gaussian noise of std `noise_std` is added to them. Kept pixels are returned unchanged.

    The solve stops for each (image, channel) once the multigrid V-cycle's estimate of the remaining
    error, `max |M r|` over the removed pixels, is at most `tol` (in [0, 1] pixel units), confirmed from
    the residual of the returned values. The estimate follows the error closely (the V-cycle inverts
    the smooth part of the residual that a residual test would let through): on the sample photos at
    224x224 with Grad-CAM and saliency maps, 10% to 90% removed, the default 2e-5 left at most 4.1e-5
    absolute error against a sparse direct solve (medians 1.0e-5 to 2.2e-5 per map kind and solver),
    in 3 to 8 iterations (5.6 on average). If
    `max_iter` iterations do not get every system there, an `ImputationWarning` says how many and how
    far, and the last iterate is returned.

    Args:
        images: `[B, C, H, W]` pixels in [0, 1].
        removed: `[B, H, W]` bool, True where a pixel is removed (imputed). Every image must keep at
            least one pixel.
        noise_std: std of the Gaussian noise added to the imputed pixels (0 for none).
        tol: the largest error estimate allowed, in pixel units (see above).
        max_iter: most conjugate-gradient iterations.
        generator: random source of the noise, on the images' device; None uses torch's global RNG.

    Returns:
        `[B, C, H, W]` images with the removed pixels imputed.

    Example:
        >>> img = torch.zeros(1, 1, 3, 3)
        >>> img[0, 0, :, 0] = 1.0  # left column white, the rest black
        >>> removed = torch.zeros(1, 3, 3, dtype=torch.bool)
        >>> removed[0, 1, 1] = True  # the centre: 1/6 + 2/12 of its neighbours' weight is white
        >>> round(noisy_linear_impute(img, removed, noise_std=0.0)[0, 0, 1, 1].item(), 4)
        0.3333
    """
    _check_params(noise_std=noise_std, tol=tol, max_iter=max_iter)
    noise = _noise(images, noise_std, generator)
    return impute(images, removed, noise, method="linear", tol=tol, max_iter=max_iter)


def channel_mean_impute(
    images: torch.Tensor,
    removed: torch.Tensor,
    *,
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill each removed pixel with its image's per-channel mean over the kept pixels, plus noise.

    The cheap baseline of ROAD's reference code (its `ChannelMeanImputer`, which averages over the whole
    image; here only the kept pixels count, so the fill does not depend on what was removed).

    Args:
        images: `[B, C, H, W]` pixels in [0, 1].
        removed: `[B, H, W]` bool, True where a pixel is removed. Every image must keep at least one pixel.
        noise_std: std of the Gaussian noise added to the imputed pixels (0 for none).
        generator: random source of the noise, on the images' device; None uses torch's global RNG.

    Example:
        >>> img = torch.tensor([[[[0.0, 1.0], [0.5, 0.0]]]])
        >>> removed = torch.tensor([[[False, False], [False, True]]])
        >>> channel_mean_impute(img, removed, noise_std=0.0)[0, 0, 1, 1].item()
        0.5
    """
    _check_params(noise_std=noise_std)
    noise = _noise(images, noise_std, generator)
    return impute(images, removed, noise, method="mean")


def impute(
    images: torch.Tensor,
    removed: torch.Tensor,
    noise: torch.Tensor | None,
    *,
    method: str = "linear",
    tol: float = TOL,
    max_iter: int = MAX_ITER,
) -> torch.Tensor:
    """Fill the removed pixels by `method` and add `noise` to them; kept pixels are returned unchanged.

    The common core of `noisy_linear_impute` and `channel_mean_impute`, for callers that draw their own
    noise (ROAD draws one pattern per perturbation, shared by all images, so that a result does not
    depend on the batch).

    Args:
        images: `[B, C, H, W]` pixels.
        removed: `[B, H, W]` bool, True where a pixel is removed.
        noise: already scaled noise broadcastable to `[B, C, H, W]` (e.g. `[C, H, W]`), or None.
        method: `linear` (ROAD's linear imputation) or `mean` (kept pixels' per-channel mean).
        tol: stopping tolerance of the linear solve (see `noisy_linear_impute`).
        max_iter: most iterations of the linear solve.
    """
    _check_images(images, removed)
    if method == "linear":
        return linear_fill(images, removed, tol=tol, max_iter=max_iter, noise=noise)
    if method == "mean":
        filled = mean_fill(images, removed)
    else:
        raise ValueError(f"imputation method={method!r}; expected one of {METHODS}")
    if noise is not None:
        filled = filled + noise
    return torch.where(removed.unsqueeze(1), filled, images)


def mean_fill(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Each image's per-channel mean over its kept pixels, `[B, C, 1, 1]` broadcast to `[B, C, H, W]`."""
    kept = (~removed).unsqueeze(1).to(images.dtype)
    mean = (images * kept).sum(dim=(2, 3), keepdim=True) / kept.sum(dim=(2, 3), keepdim=True)
    return mean.expand_as(images)


def linear_fill(
    images: torch.Tensor,
    removed: torch.Tensor,
    *,
    tol: float = TOL,
    max_iter: int = MAX_ITER,
    solver: Solver = "auto",
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The linear imputation, `[B, C, H, W]` (kept pixels as given), plus `noise` (broadcastable to the
    images, already scaled) on the removed pixels when given. See `noisy_linear_impute`.

    `solver`: `compiled` (loops compiled by numba, one (image, channel) plane per thread; CPU, float32
    work), `torch` (batched tensor operations, any device), or `auto` (compiled for CPU images in
    float32 or lower precision, torch otherwise). Both solve the same system by the same method to the
    same `tol`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}; expected one of {SOLVERS}")
    if not bool(removed.any()):
        return images.clone()
    if solver == "auto":
        on_cpu = images.device.type == "cpu" and images.dtype != torch.float64
        solver = "compiled" if on_cpu else "torch"
    if solver == "compiled":
        return _compiled_fill(images, removed, tol, max_iter, noise)
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    filled = _Solver(images.to(dtype).contiguous(), removed, tol, max_iter).run().to(images.dtype)
    if noise is None:
        return filled
    return torch.where(removed.unsqueeze(1), filled + noise, filled)


def _compiled_fill(
    images: torch.Tensor, removed: torch.Tensor, tol: float, max_iter: int, noise: torch.Tensor | None
) -> torch.Tensor:
    if images.device.type != "cpu":
        raise ValueError(f"solver='compiled' runs on the CPU; images are on {images.device}")
    from metrics import _linear_cpu  # numba, imported on first use

    planes = torch.empty(images.shape, dtype=torch.float32).copy_(images.detach())  # filled in place
    if noise is not None:
        noise = noise.detach().to(torch.float32).expand_as(planes).contiguous()
    estimates = _linear_cpu.fill(
        planes.numpy(),
        removed.contiguous().numpy(),
        float(tol),
        int(max_iter),
        None if noise is None else noise.numpy(),
    )
    warn_unconverged(torch.from_numpy(estimates), tol, max_iter)
    return planes.to(images.dtype)


# -- checks and noise -------------------------------------------------------------------------------------


def _check_params(
    *, noise_std: float | None = None, tol: float | None = None, max_iter: int | None = None
) -> None:
    if noise_std is not None and not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std={noise_std!r}; expected a finite number >= 0")
    if tol is not None and not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol={tol!r}; expected a finite number > 0")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter={max_iter!r}; expected a positive int")


def _check_images(images: torch.Tensor, removed: torch.Tensor) -> None:
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"images of shape {tuple(images.shape)} and dtype {images.dtype}; expected float [B, C, H, W]"
        )
    b, _, h, w = images.shape
    if removed.shape != (b, h, w) or removed.dtype != torch.bool:
        raise ValueError(
            f"removed of shape {tuple(removed.shape)} and dtype {removed.dtype}; "
            f"expected bool [{b}, {h}, {w}]"
        )
    if removed.device != images.device:
        raise ValueError(f"removed is on {removed.device} but images on {images.device}")
    nothing_kept = removed.flatten(1).all(dim=1)
    if bool(nothing_kept.any()):
        which = nothing_kept.nonzero().flatten().tolist()
        raise ValueError(f"images {which} have every pixel removed: nothing to impute from")


def _noise(images: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor | None:
    if std == 0:
        return None
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return noise.mul_(std)


# -- stencils ---------------------------------------------------------------------------------------------


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Sums over each pixel's 3x3 window weighted [1, 2, 1] x [1, 2, 1], zero outside: `[..., H, W]`."""
    h = x * 2
    h[..., 1:].add_(x[..., :-1])
    h[..., :-1].add_(x[..., 1:])
    v = h * 2
    v[..., 1:, :].add_(h[..., :-1, :])
    v[..., :-1, :].add_(h[..., 1:, :])
    return v


def _degree(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """`[1, 1, H, W]` sum of each pixel's in-image neighbour weights (1; 2/3 on edges; 5/12 in corners)."""
    ones = torch.ones(1, 1, h, w, dtype=like.dtype, device=like.device)
    return (_blur(ones) - 4) / 12


def _laplacian(u: torch.Tensor) -> torch.Tensor:
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


def _pad_even(x: torch.Tensor, value: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, w % 2, 0, h % 2), value=value) if h % 2 or w % 2 else x


def _box(x: torch.Tensor) -> torch.Tensor:
    """Sums over 2x2 blocks (zero padded to even sizes)."""
    f = _pad_even(x, 0.0)
    rows = f[..., 0::2, :] + f[..., 1::2, :]
    return rows[..., 0::2] + rows[..., 1::2]


def _prolong_into(c: torch.Tensor, out: torch.Tensor, axis: int) -> torch.Tensor:
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


def _prolong(c: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """16x bilinear upsampling by 2 of `[B, C, h', w']`, cropped to `[B, C, h, w]` (allocating)."""
    b, ch, hc, wc = c.shape
    cols = _prolong_into(c, c.new_empty(b, ch, hc, 2 * wc), 3)
    return _prolong_into(cols, c.new_empty(b, ch, 2 * hc, 2 * wc), 2)[..., :h, :w]


def _coarsen(unknown: torch.Tensor) -> torch.Tensor:
    """A coarse cell is unknown when all its (in-image) children are."""
    u = _pad_even(unknown, 1.0)
    rows = torch.minimum(u[..., 0::2, :], u[..., 1::2, :])
    return torch.minimum(rows[..., 0::2], rows[..., 1::2])


# -- multigrid --------------------------------------------------------------------------------------------


class _Blur:
    """`_blur` of a zero-bordered field's interior into `out`, with its views taken once."""

    def __init__(self, padded: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        self.src = (padded[..., :-2], padded[..., 2:], padded[..., 1:-1])
        self.rows = (rows, rows[..., :-2, :], rows[..., 2:, :], rows[..., 1:-1, :])
        self.out = out

    def __call__(self) -> torch.Tensor:
        left, right, mid = self.src
        rows, up, down, centre = self.rows
        torch.add(left, right, out=rows).add_(mid, alpha=2)
        return torch.add(up, down, out=self.out).add_(centre, alpha=2)


class _Grid:
    """One grid of the hierarchy: its unknown cells, its operator, and work buffers for `n` images.

    On the unknown cells of a field `e` (zero elsewhere) the operator is
    `A e = unknown * (d e - sum_j w_ij e_j) = diag * e - off * blur(e)` with `diag = unknown * (d + 1/3)`
    and `off = unknown / 12`; a Jacobi sweep on `A e = r` is `e <- inv r + keep e + mix blur(e)`.
    Coefficients are `[B, 1, H, W]` for the whole batch; the buffers hold `n` images (the whole batch,
    or a group of it on the finest grid). The iterate lives inside a zero border (`padded`).
    """

    def __init__(self, unknown: torch.Tensor, channels: int, n: int, smoothing: bool = True) -> None:
        h, w = unknown.shape[-2:]
        d = _degree(h, w, unknown)
        self.h, self.w = h, w
        self.unknown = unknown
        self.diag = unknown * (d + 1 / 3)
        self.off = unknown * (1 / 12)
        self.inv = unknown * (1 / d)
        # For `_Plan.smooth` (the coarse grids'): inv * (1 - diag * inv) and inv * off.
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
        self.plans: dict[tuple[int, int], _Plan] = {}

    def plan(self, g: slice, coarse: _Coarse) -> _Plan:
        key = (g.start, g.stop)
        if key not in self.plans:
            self.plans[key] = _Plan(self, g, coarse)
        return self.plans[key]


class _Coarse:
    """Where a grid restricts to and prolongs from: the next grid's `r` and zero-bordered iterate."""

    def __init__(self, r: torch.Tensor, padded: torch.Tensor, unknown: torch.Tensor) -> None:
        self.r, self.padded, self.unknown = r, padded, unknown


class _Plan:
    """A grid's operations on images `g`, with every view of its buffers and coefficients taken once."""

    def __init__(self, grid: _Grid, g: slice, coarse: _Coarse) -> None:
        n = g.stop - g.start
        h, w = grid.h, grid.w
        self.diag, self.off, self.inv = grid.diag[g], grid.off[g], grid.inv[g]
        self.unknown = grid.unknown[g]
        self.keep = None if grid.keep is None else grid.keep[g]
        self.mix = None if grid.mix is None else grid.mix[g]
        self.padded = grid.padded[:n]
        self.e = self.padded[:, :, 1:-1, 1:-1]
        self.start = grid.start[:n]
        self.blur = _Blur(self.padded, grid.rows[:n], grid.blurred[:n])
        # Restriction: the residual, inside a zero border, along rows then columns (see `restrict`).
        res = grid.res[:n]
        self.res = res[:, :, 1 : h + 1, 1 : w + 1]
        half, half_b, quarter_b = grid.half[:n], grid.half_b[:n], grid.quarter_b[:n]
        hc, wc = half.shape[2], quarter_b.shape[3]
        self.rows_pass = _transfer_views(res, half, half_b, 2, hc)
        self.cols_pass = _transfer_views(half, coarse.r[g], quarter_b, 3, wc)
        self.coarse_r, self.coarse_unknown = coarse.r[g], coarse.unknown[g]
        # Prolongation: the coarse iterate (zero border) along columns, then rows.
        src, up_w, up = coarse.padded[g], grid.up_w[:n], grid.up[:n]
        self.cols_up = _prolong_views(src, up_w, 3, wc)
        self.rows_up = _prolong_views(up_w, up, 2, hc)
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
        _restrict_pass(*self.rows_pass)
        _restrict_pass(*self.cols_pass)
        return self.coarse_r.mul_(self.coarse_unknown)

    def correct(self) -> torch.Tensor:
        """Add the prolonged coarse iterate to this one.

        Per axis, fine cell 2I gets 3 c[I] + c[I-1] and 2I+1 gets 3 c[I] + c[I+1], clamped at the edges
        (c[-1] = c[0], c[n] = c[n-1]): 16x bilinear interpolation, hence the 1/256.
        """
        _prolong_pass(*self.cols_up)
        _prolong_pass(*self.rows_up)
        return self.e.addcmul_(self.unknown, self.up, value=1 / 256)


def _transfer_views(f: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor, axis: int, n: int) -> tuple:
    """Views for `_restrict_pass` of zero-bordered `f` (2n cells inside) along `axis` into `out`."""

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


def _restrict_pass(
    before: torch.Tensor,
    after: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    out: torch.Tensor,
    tmp: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor],
    tail: tuple[torch.Tensor, torch.Tensor],
) -> None:
    torch.add(before, after, out=out)
    torch.add(first, second, out=tmp)
    out.add_(tmp, alpha=3)
    head[0].add_(head[1])
    tail[0].add_(tail[1])


def _prolong_views(src: torch.Tensor, out: torch.Tensor, axis: int, n: int) -> tuple:
    """Views for `_prolong_pass` of zero-bordered `src` (n cells inside) along `axis` into `out`."""

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


def _prolong_pass(
    even: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    odd: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    head: tuple[torch.Tensor, torch.Tensor],
    tail: tuple[torch.Tensor, torch.Tensor],
) -> None:
    torch.add(even[0], even[1], alpha=3, out=even[2])
    torch.add(odd[0], odd[1], alpha=3, out=odd[2])
    head[0].add_(head[1])
    tail[0].add_(tail[1])


class _Hierarchy:
    """Grids from the image's down to at most `_COARSEST` cells; the coarsest is solved densely."""

    def __init__(self, unknown: torch.Tensor, channels: int, group: int) -> None:
        b = unknown.shape[0]
        masks = [unknown]
        while math.prod(masks[-1].shape[-2:]) > _COARSEST:
            masks.append(_coarsen(masks[-1]))
        self.grids = [_Grid(m, channels, group if k == 0 else b, k > 0) for k, m in enumerate(masks[:-1])]
        m = self.coarsest = masks[-1]
        h, w = m.shape[-2:]
        n = h * w
        eye = torch.eye(n, dtype=m.dtype, device=m.device)
        # The operator on the whole coarsest grid, restricted to the unknowns (identity elsewhere).
        full = _degree(h, w, m).flatten() * eye - (_blur(eye.view(n, 1, h, w)).view(n, n) - 4 * eye) / 12
        mv = m.view(b, n)
        mat = mv[:, :, None] * mv[:, None, :] * full + torch.diag_embed(1 - mv)
        self.inverse = torch.cholesky_inverse(torch.linalg.cholesky(mat))
        self.last = _Coarse(
            m.new_empty(b, channels, h, w), m.new_zeros(b, channels, h + 2, w + 2), m
        )  # the coarsest grid's right-hand side and answer
        self.below = [_Coarse(g.r, g.padded, g.unknown) for g in self.grids[1:]] + [self.last]
        every = slice(0, b)
        self.plans = [grid.plan(every, self.below[k]) for k, grid in enumerate(self.grids) if k > 0]

    def solve_coarsest(self, r: torch.Tensor) -> torch.Tensor:
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
        sweeps = _SWEEPS
        plan.pre_smooth(r, sweeps)
        plan.restrict(r)
        self.vcycle(k + 1)
        plan.correct()
        for _ in range(sweeps):
            plan.smooth()
        return plan.padded


# -- the solver -------------------------------------------------------------------------------------------


class _Residual:
    """`_laplacian` on the finest grid for a group of images, in preallocated buffers."""

    def __init__(self, n: int, c: int, h: int, w: int, like: torch.Tensor) -> None:
        new = partial(torch.zeros, dtype=like.dtype, device=like.device)
        self.u, self.ey, self.t = new(n, c, h, w), new(n, c, h, w), new(n, c, h, w)
        self.dx = new(n, c, h, w + 1)  # horizontal differences, zero beyond the edges
        self.ex = new(n, c, h + 2, w)  # horizontal second differences, zero rows above and below
        self.dy = new(n, c, h + 1, w)

    def __call__(self, known: torch.Tensor, x: torch.Tensor, off: torch.Tensor, out: torch.Tensor) -> None:
        """`out = 12 * off * sum_j w_ij (u_j - u_i)` with `u = known + x` (`off` is unknown / 12)."""
        n = len(x)
        u, ey, t = self.u[:n], self.ey[:n], self.t[:n]
        dx, ex, dy = self.dx[:n], self.ex[:n], self.dy[:n]
        torch.add(known, x, out=u)
        torch.sub(u[..., 1:], u[..., :-1], out=dx[..., 1:-1])
        torch.sub(dx[..., 1:], dx[..., :-1], out=ex[..., 1:-1, :])
        torch.sub(u[..., 1:, :], u[..., :-1, :], out=dy[..., 1:-1, :])
        torch.sub(dy[..., 1:, :], dy[..., :-1, :], out=ey)
        torch.add(ex[..., :-2, :], ex[..., 2:, :], out=t).add_(ex[..., 1:-1, :], alpha=2).add_(ey, alpha=4)
        t[..., :1].sub_(ey[..., :1])
        t[..., -1:].sub_(ey[..., -1:])
        torch.mul(t, off, out=out)


class _Solver:
    """Preconditioned conjugate gradients for all images and channels at once, frozen per system.

    The finest grid's work runs a group of images at a time (on CPU, 2, so that a pass over memory stays
    in cache), the coarser grids' for the whole batch at once (to spread the per-operation overhead).
    Groups whose systems have all converged are skipped.
    """

    def __init__(self, images: torch.Tensor, removed: torch.Tensor, tol: float, max_iter: int) -> None:
        self.tol, self.max_iter = tol, max_iter
        b, c, h, w = images.shape
        self.unknown = removed.unsqueeze(1).to(images.dtype)
        self.known = images * (1 - self.unknown)
        group = min(b, b if images.device.type != "cpu" else _CPU_GROUP)
        self.groups = [slice(lo, min(lo + group, b)) for lo in range(0, b, group)]
        self.hier = _Hierarchy(self.unknown, c, group)
        self.scratch = images.new_empty(group, c, h, w)
        self.laplacian = _Residual(group, c, h, w, images)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The true residual `b - A x` of the fine system, computed without cancellation, by groups."""
        out = torch.empty_like(x)
        off = self.hier.grids[0].off if self.hier.grids else self.unknown / 12
        for g in self.groups:
            self.laplacian(self.known[g], x[g], off[g], out[g])
        return out

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`[n, C]` inner products."""
        return torch.mul(a, b, out=self.scratch[: len(a)]).sum(dim=(2, 3))

    def fmg(self) -> torch.Tensor:
        """A full-multigrid start: each coarse grid's own problem (its kept cells hold the mean of their
        kept pixels) is solved exactly on the coarsest grid, then from each grid's answer, prolonged to
        the next finer grid, by `_FMG_SWEEPS` Jacobi sweeps there; the finest grid gets the prolongation.
        """
        hier = self.hier
        sums, counts = [self.known], [1 - self.unknown]
        for _ in hier.grids:
            sums.append(_box(sums[-1]))
            counts.append(_box(counts[-1]))
        k = len(hier.grids)
        u = sums[k] / counts[k].clamp(min=1)
        u = u + hier.solve_coarsest(_laplacian(u).mul_(hier.coarsest))
        for k in range(len(hier.grids) - 1, 0, -1):
            grid, plan = hier.grids[k], hier.plans[k - 1]
            u = (sums[k] / counts[k].clamp(min=1)).addcmul_(
                grid.unknown, _prolong(u, grid.h, grid.w), value=1 / 16
            )
            u += plan.pre_smooth(grid.off * _blur(u) - grid.diag * u, _FMG_SWEEPS)
        return _prolong(u, *self.known.shape[-2:]).mul_(self.unknown).mul_(1 / 16)

    def precondition(
        self, plans: list[_Plan], views: list[tuple], on: list[bool]
    ) -> Iterator[torch.Tensor | None]:
        """`z = M r` per group (None for groups that are off), each valid until the next is made (the
        finest grid's buffers are shared by the groups). The V-cycle, split around the coarse grids'
        batched part: a Jacobi sweep from 0 and the restricted residual (per group), the coarse V-cycle
        (whole batch), then the coarse correction and a second Jacobi sweep (per group).
        """
        for plan, (_, r_g, _, _), live in zip(plans, views, on, strict=True):
            if live:
                torch.mul(plan.inv, r_g, out=plan.e)
                plan.restrict(r_g)
        self.hier.vcycle(1)
        for plan, (_, r_g, _, _), live in zip(plans, views, on, strict=True):
            if live:
                torch.mul(plan.inv, r_g, out=plan.e)
                plan.correct()
                yield plan.smooth_from(r_g)
            else:
                yield None

    def estimate(self, z: torch.Tensor) -> torch.Tensor:
        """`[n, C]` the error estimate `max |z|` of `z = M r`."""
        return torch.abs(z, out=self.scratch[: len(z)]).amax(dim=(2, 3))

    def run(self) -> torch.Tensor:
        """The filled images: CG from the full-multigrid start, each (image, channel) frozen once its
        error estimate `max |M r|` is within `tol` (its step sizes become 0), then confirmed from the
        true residual.
        """
        hier, groups, tol = self.hier, self.groups, self.tol
        if not hier.grids:  # small enough for the dense solve
            return self.known + hier.solve_coarsest(self.residual(torch.zeros_like(self.known)))
        fine, below = hier.grids[0], hier.below[0]
        plans = [fine.plan(g, below) for g in groups]
        b, c, h, w = self.known.shape
        p_padded = self.known.new_zeros(b, c, h + 2, w + 2)
        p = p_padded[..., 1:-1, 1:-1]
        x = self.fmg()
        r = self.residual(x)
        views = [
            (
                x[g],
                r[g],
                p[g],
                _Blur(p_padded[g], fine.rows[: g.stop - g.start], fine.blurred[: g.stop - g.start]),
            )
            for g in groups
        ]
        everyone = [True] * len(groups)
        rz = r.new_empty(b, c)
        est = r.new_empty(b, c)

        def start() -> None:
            """The direction `p = M r`, its `r.z` and error estimate, from the residual now in `r`."""
            for g, z, (_, r_g, p_g, _) in zip(
                groups, self.precondition(plans, views, everyone), views, strict=True
            ):
                assert z is not None
                p_g.copy_(z)
                rz[g] = self.dot(r_g, z)
                est[g] = self.estimate(z)

        start()
        active = est > tol
        fresh = True  # `r` is the true residual
        for _ in range(self.max_iter):
            if not bool(active.any()):
                if fresh:
                    break
                r.copy_(self.residual(x))  # confirm from the true residual; go on where it disagrees
                start()
                active = est > tol
                fresh = True
                if not bool(active.any()):
                    break
            fresh = False
            live = [bool(active[g].any()) for g in groups]
            for g, (x_g, r_g, p_g, blur), plan, on in zip(groups, views, plans, live, strict=True):
                if on:
                    q = torch.mul(plan.diag, p_g, out=plan.start).addcmul_(plan.off, blur(), value=-1)
                    alpha = torch.where(active[g], rz[g] / self.dot(p_g, q), 0.0)[..., None, None]
                    x_g.addcmul_(alpha, p_g)
                    r_g.addcmul_(alpha, q, value=-1)
            for g, z, (_, r_g, p_g, _) in zip(
                groups, self.precondition(plans, views, live), views, strict=True
            ):
                if z is not None:
                    rz_new = self.dot(r_g, z)
                    beta = torch.where(active[g], rz_new / rz[g], 0.0)[..., None, None]
                    torch.addcmul(z, beta, p_g, out=p_g)
                    rz[g] = torch.where(active[g], rz_new, rz[g])
                    est[g] = torch.where(active[g], self.estimate(z), est[g])
                    active[g] &= est[g] > tol
        else:
            if not fresh:
                r.copy_(self.residual(x))
                start()
            warn_unconverged(est, tol, self.max_iter)
        return x.add_(self.known)


def warn_unconverged(estimates: torch.Tensor, tol: float, max_iter: int) -> None:
    """Warn (`ImputationWarning`) about the (image, channel) systems whose error estimate exceeds `tol`."""
    failed = estimates > tol
    if bool(failed.any()):
        warnings.warn(
            f"linear imputation: {int(failed.sum())} of {failed.numel()} (image, channel) systems did "
            f"not reach tol={tol:g} in max_iter={max_iter} iterations (largest error estimate "
            f"{estimates.max().item():.2g}); their fill may be off by more than the stated error",
            ImputationWarning,
            stacklevel=5,
        )
