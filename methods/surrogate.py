"""LIME and KernelSHAP on image regions: a linear surrogate of the model's score, fitted to images whose
regions are kept or replaced by a baseline.

An image's regions are superpixels (scikit-image's SLIC or quickshift, on the image rescaled to [0, 1])
or a regular grid. Each sample keeps a subset of the regions (z in {0, 1}^F) and replaces the rest
with the baseline (0: the data's mean colour, as Captum's default); the samples' target scores are
forwarded `chunk_size` images at a time, and a weighted linear regression of the scores on z gives one
coefficient per region, the region's attribution. LIME (Ribeiro et al. 2016) draws each region with
probability 1/2 and weights a sample by an exponential kernel of its cosine distance to the image
(Captum's `Lime` defaults), fitting a ridge regression (the lime library's, alpha 1); KernelSHAP
(Lundberg and Lee 2017) draws the number of kept regions from the Shapley kernel's distribution, adds
the all-kept and none-kept samples at weight 1e6, and fits least squares (Captum's `KernelShap`). The
regressions run in float64 on the CPU, as scikit-image's would. An image's draws come from torch's
generator (seeded by the job) in image order, all its samples at once: the maps do not depend on
`chunk_size`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
import torch
from annotated_types import Ge, Gt
from torch import nn
from torch.nn import functional as F

from methods.common import Count, like_inputs, method, with_extras
from methods.perturbation import Score, _scorer

Segments = Literal["slic", "quickshift", "grid"]
# Captum's weight of KernelSHAP's all-kept and none-kept samples (in theory infinite).
ENDPOINT_WEIGHT = 1e6


def regions(
    inputs: torch.Tensor, segments: str, n_segments: int, compactness: float, grid: int
) -> torch.Tensor:
    """Each image's regions `[B, H, W]` (int64, numbered 0 to F-1 per image, on the inputs' device):
    SLIC superpixels (`n_segments`, `compactness`), quickshift's (the lime library's settings), or a
    `grid` x `grid` grid of cells.
    """
    b, _, h, w = inputs.shape
    if segments == "grid":
        rows = torch.arange(h, device=inputs.device) * grid // h
        cols = torch.arange(w, device=inputs.device) * grid // w
        return (rows[:, None] * grid + cols[None, :]).expand(b, h, w).clone()
    from skimage.segmentation import quickshift, slic

    out = []
    for x in inputs.detach().float().cpu():
        image = x.permute(1, 2, 0).numpy().astype(np.float64)
        low, high = image.min(), image.max()
        image = (image - low) / (high - low) if high > low else np.zeros_like(image)
        if segments == "slic":
            labels = slic(
                image, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1
            )
        elif segments == "quickshift":
            labels = quickshift(image, kernel_size=4, max_dist=200, ratio=0.2, channel_axis=-1)
        else:
            raise ValueError(f"segments={segments!r}; expected slic, quickshift or grid")
        _, numbered = np.unique(labels, return_inverse=True)
        out.append(torch.from_numpy(numbered.reshape(h, w).astype(np.int64)))
    return torch.stack(out).to(inputs.device)


def lime_samples(samples: int, features: int) -> torch.Tensor:
    """LIME's draws for one image: each region kept with probability 1/2, `[samples, features]`."""
    return torch.bernoulli(torch.full((samples, features), 0.5))


def kernel_shap_samples(samples: int, features: int) -> torch.Tensor:
    """KernelSHAP's draws for one image, `[samples, features]`: all kept, none kept, then each sample
    keeping k regions, k drawn with probability proportional to (F - 1) / (k (F - k)), the k chosen
    uniformly.
    """
    ends = torch.stack([torch.ones(features), torch.zeros(features)])[:samples]
    rest = samples - len(ends)
    if rest <= 0 or features < 2:
        return torch.cat([ends, torch.bernoulli(torch.full((max(rest, 0), features), 0.5))])
    k = torch.arange(1, features, dtype=torch.float64)
    count = torch.multinomial((features - 1) / (k * (features - k)), rest, replacement=True) + 1
    rank = torch.rand(rest, features).argsort(dim=1).argsort(dim=1)
    return torch.cat([ends, (rank < count[:, None]).double()]).float()


def linear_fit(z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, ridge: float) -> torch.Tensor:
    """The coefficients `[F]` of the weighted linear regression of `y` `[S]` on `z` `[S, F]` with an
    intercept, as scikit-learn fits it: centred on the weighted means, rows scaled by sqrt(weight);
    ridge penalty `ridge` on the coefficients (0: least squares, the least-norm solution when the
    samples leave it open).
    """
    z, y, weight = z.double().cpu(), y.double().cpu(), weight.double().cpu()
    total = weight.sum()
    zc = z - (weight[:, None] * z).sum(0) / total
    yc = y - (weight * y).sum() / total
    root = weight.sqrt()
    a, b = zc * root[:, None], yc * root
    if ridge > 0:
        return torch.linalg.solve(a.T @ a + ridge * torch.eye(z.shape[1], dtype=a.dtype), a.T @ b)
    return torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]


def fit_r2(z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, coef: torch.Tensor) -> float:
    """How well the surrogate fits its samples: the weighted R^2 of the linear model with coefficients
    `coef` and the intercept that `linear_fit` implies (scikit-learn's `score` with `sample_weight`).
    """
    z, y, w, coef = z.double().cpu(), y.double().cpu(), weight.double().cpu(), coef.double().cpu()
    total = w.sum()
    intercept = (w * y).sum() / total - ((w[:, None] * z).sum(0) / total) @ coef
    residual = (w * (y - intercept - z @ coef) ** 2).sum()
    spread = (w * (y - (w * y).sum() / total) ** 2).sum()
    if spread == 0:  # constant scores: a perfect fit or none, as scikit-learn says
        return 1.0 if residual == 0 else 0.0
    return float(1 - residual / spread)


def surrogate(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    features: torch.Tensor,
    draw: Callable[[int, int], torch.Tensor],
    weigh: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    samples: int,
    ridge: float,
    chunk_size: int,
) -> torch.Tensor:
    """Per image: draw the samples, score them `chunk_size` at a time, weigh them (`weigh(x, kept
    images, z)`), fit, and paint each region with its coefficient. `[B, 1, H, W]`, carrying the
    region map (`regions`, `[B, H, W]`) and each fit's weighted R^2 (`fit_r2`, `[B]`) as extras.
    """
    out = torch.empty(inputs.shape[0], 1, *inputs.shape[2:], device=inputs.device, dtype=torch.float32)
    fits = torch.empty(inputs.shape[0], dtype=torch.float64)
    for i, (x, t, regions_) in enumerate(zip(inputs, target.tolist(), features, strict=True)):
        count = int(regions_.max()) + 1
        z = draw(samples, count)
        kept_z = z.to(device=inputs.device, dtype=inputs.dtype)
        scores, weights = [], []
        for start in range(0, samples, chunk_size):
            keep = kept_z[start : start + chunk_size][:, regions_]  # [k, H, W]
            batch = like_inputs(keep[:, None] * x, inputs)  # the rest: the baseline, 0
            with torch.no_grad():
                scores.append(model(batch)[:, t].float())
            weights.append(weigh(x, batch, z[start : start + chunk_size]))
        y, w = torch.cat(scores), torch.cat(weights)
        coef = linear_fit(z, y, w, ridge)
        fits[i] = fit_r2(z, y, w, coef)
        out[i, 0] = coef.to(device=inputs.device, dtype=torch.float32)[regions_]
    return with_extras(out, regions=features.to(torch.int32), fit_r2=fits.float())


@method(forward_only=True, stochastic=True)
def lime(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    n_samples: Count = 1000,
    segments: Segments = "slic",
    n_segments: Count = 50,
    compactness: Annotated[float, Gt(0)] = 10.0,
    grid: Count = 8,
    kernel_width: Annotated[float, Gt(0)] = 1.0,
    ridge: Annotated[float, Ge(0)] = 1.0,
    score: Score = "logit",
    chunk_size: Count = 64,
) -> torch.Tensor:
    """LIME (Ribeiro et al. 2016, arXiv:1602.04938, eq. 1-2) on image regions: the ridge regression's
    coefficient of each region, from `n_samples` images keeping each region with probability 1/2,
    each weighted by exp(-d^2 / (2 kernel_width^2)), d the cosine distance between the sample and the
    image (Captum's `Lime` with `get_exp_kernel_similarity_function("cosine", kernel_width)`). `[B, 1, H, W]`.
    """
    features = regions(inputs, segments, n_segments, compactness, grid)
    scorer = _scorer(model, score)
    weigh = lime_kernel(kernel_width)
    return surrogate(scorer, inputs, target, features, lime_samples, weigh, n_samples, ridge, chunk_size)


def lime_kernel(width: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """LIME's weights of samples `batch` of image `x`: exp(-d^2 / (2 width^2)), d their cosine
    distance to the image (Captum's `get_exp_kernel_similarity_function("cosine", width)`).
    """

    def weigh(x: torch.Tensor, batch: torch.Tensor, _z: torch.Tensor) -> torch.Tensor:
        cosine = F.cosine_similarity(batch.flatten(1).float(), x.flatten()[None].float(), dim=1)
        return torch.exp(-((1 - cosine) ** 2) / (2 * width**2)).cpu()

    return weigh


@method(forward_only=True, stochastic=True)
def kernel_shap(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    n_samples: Count = 1000,
    segments: Segments = "slic",
    n_segments: Count = 50,
    compactness: Annotated[float, Gt(0)] = 10.0,
    grid: Count = 8,
    score: Score = "logit",
    chunk_size: Count = 64,
) -> torch.Tensor:
    """KernelSHAP (Lundberg and Lee 2017, arXiv:1705.07874, theorem 2) on image regions: least squares
    of the score on the kept regions over `n_samples` draws from the Shapley kernel, the all-kept and
    none-kept images weighted 1e6 (Captum's `KernelShap`): each region's Shapley value estimate, the
    values summing to f(image) - f(baseline) up to the end points' finite weight. `[B, 1, H, W]`.
    """
    features = regions(inputs, segments, n_segments, compactness, grid)

    def weigh(_x: torch.Tensor, _batch: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        kept = z.sum(dim=1)
        ends = (kept == 0) | (kept == z.shape[1])
        return torch.where(ends, ENDPOINT_WEIGHT, 1.0)

    scorer = _scorer(model, score)
    return surrogate(scorer, inputs, target, features, kernel_shap_samples, weigh, n_samples, 0.0, chunk_size)
