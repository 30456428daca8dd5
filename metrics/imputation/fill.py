"""The imputation's functions: ROAD's noisy linear imputation, the channel-mean fill, and the choice of
solver (see the package's docstring); their checks and their noise.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from metrics.imputation.solver import Solver, warn_unconverged

Method = Literal["linear", "mean"]
METHODS = ("linear", "mean")
SolverName = Literal["auto", "compiled", "torch"]
SOLVERS = ("auto", "compiled", "torch")

# Defaults of the linear solve. `TOL` bounds the V-cycle's estimate of the error left in any removed pixel,
# in [0, 1] pixel units; on 58 ROAD perturbations of the sample photos at 224x224 (Grad-CAM and saliency
# maps, 10% to 90% removed) the largest error against a sparse direct solve was 4.1e-5 (both solvers).
TOL = 2e-5
MAX_ITER = 100


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
    solver: SolverName = "auto",
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
    filled = Solver(images.to(dtype).contiguous(), removed, tol, max_iter).run().to(images.dtype)
    if noise is None:
        return filled
    return torch.where(removed.unsqueeze(1), filled + noise, filled)


def _compiled_fill(
    images: torch.Tensor, removed: torch.Tensor, tol: float, max_iter: int, noise: torch.Tensor | None
) -> torch.Tensor:
    if images.device.type != "cpu":
        raise ValueError(f"solver='compiled' runs on the CPU; images are on {images.device}")
    from metrics.imputation import cpu  # numba, imported on first use

    planes = torch.empty(images.shape, dtype=torch.float32).copy_(images.detach())  # filled in place
    if noise is not None:
        noise = noise.detach().to(torch.float32).expand_as(planes).contiguous()
    estimates = cpu.fill(
        planes.numpy(),
        removed.contiguous().numpy(),
        float(tol),
        int(max_iter),
        None if noise is None else noise.numpy(),
    )
    warn_unconverged(torch.from_numpy(estimates), tol, max_iter)
    return planes.to(images.dtype)


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
