"""ROAD: RemOve And Debias (Rong et al., ICML 2022, https://arxiv.org/abs/2202.00449).

Pixels are ranked by the attribution summed over channels. At each percentage p, MoRF (most relevant
first) removes the top `round(p/100 * H*W)` pixels and LeRF (least relevant first) the bottom ones; the
removed pixels are imputed from the kept ones (`metrics.imputation`: the noisy linear imputation by
default, whose fill does not leak the removal mask's shape) and the model scores the imputed image. A
faithful map makes the MoRF curve fall fast (low AUC) and the LeRF curve stay high (high AUC).

Reproducibility: ties in the ranking are broken by one random permutation of the pixel positions, and
the imputation noise is one `[C, H, W]` pattern per (order, percentage); both are drawn from torch's
global RNG on the inputs' device at the start of the call (the permutation first, then the noise, in
order then percentage order), shared by all images, so that an image's result depends neither on the
batch nor on `chunk_size`.

The (image, order, percentage) items are imputed and forwarded `chunk_size` at a time, all on the inputs'
device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch
from torch import nn

from metrics.contract import Curve, Result, metric
from metrics.faithfulness import check_inputs, pixel_rank
from metrics.imputation import METHODS, TOL, impute

ORDERS = ("morf", "lerf")
SCORES = ("softmax", "logit", "accuracy")
PERCENTAGES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def check_road(**params: Any) -> None:
    """Raise `ValueError` naming the first bad ROAD parameter and what is allowed (others are ignored)."""
    if "percentages" in params:
        _check_percentages(params["percentages"])
    if "orders" in params:
        orders = params["orders"]
        if (
            isinstance(orders, str)
            or not isinstance(orders, Sequence)
            or not orders
            or any(o not in ORDERS for o in orders)
            or len(set(orders)) != len(orders)
        ):
            raise ValueError(f"orders={orders!r}; expected a non-empty subset of {ORDERS} without repeats")
    if "imputation" in params and params["imputation"] not in METHODS:
        raise ValueError(f"imputation={params['imputation']!r}; expected one of {METHODS}")
    if "noise_std" in params and not (_is_real(params["noise_std"]) and params["noise_std"] >= 0):
        raise ValueError(f"noise_std={params['noise_std']!r}; expected a finite number >= 0")
    if "score" in params and params["score"] not in SCORES:
        raise ValueError(f"score={params['score']!r}; expected one of {SCORES}")
    if "tol" in params and not (_is_real(params["tol"]) and params["tol"] > 0):
        raise ValueError(f"tol={params['tol']!r}; expected a finite number > 0")
    chunk = params.get("chunk_size", 1)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size={chunk!r}; expected a positive int (items per forward pass)")
    for key in ("mean", "std"):
        if key in params:
            value = params[key]
            ok = isinstance(value, Sequence) and len(value) > 0 and all(_is_real(v) for v in value)
            if not ok or (key == "std" and any(v <= 0 for v in value)):
                want = "positive finite numbers" if key == "std" else "finite numbers"
                raise ValueError(f"{key}={value!r}; expected a non-empty sequence of {want}, one per channel")


def _is_real(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_percentages(percentages: Any) -> None:
    ok = (
        isinstance(percentages, Sequence)
        and not isinstance(percentages, str)
        and len(percentages) > 0
        and all(_is_real(p) and 0 < p < 100 for p in percentages)
        and all(a < b for a, b in zip(percentages[:-1], percentages[1:], strict=True))
    )
    if not ok:
        raise ValueError(
            f"percentages={percentages!r}; expected a non-empty, strictly increasing sequence of numbers "
            "strictly between 0 and 100"
        )


def removal_counts(percentages: Sequence[float], pixels: int) -> list[int]:
    """Pixels removed at each percentage: `round(p / 100 * pixels)` (Python's round, half to even)."""
    return [round(p / 100 * pixels) for p in percentages]


def curve_auc(scores: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """`[B]` mean height of `[B, S]` curves: trapezoid over `fractions` / their span; one point: itself."""
    if fractions.numel() == 1:
        return scores[:, 0].clone()
    return torch.trapezoid(scores, fractions, dim=1) / (fractions[-1] - fractions[0])


@metric(
    better={"morf_auc": "lower", "lerf_auc": "higher", "combined": "higher"},
    needs=("normalization",),
    check=check_road,
)
@torch.no_grad()
def road(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    percentages: Sequence[float] = PERCENTAGES,
    orders: Sequence[str] = ORDERS,
    imputation: str = "linear",
    noise_std: float = 0.01,
    score: str = "softmax",
    tol: float = TOL,
    chunk_size: int = 16,
) -> Result:
    """ROAD's MoRF and LeRF curves with noisy linear imputation (see the module docstring).

    Args:
        model: classifier returning logits `[N, K]`.
        inputs: `[B, C, H, W]` normalised images (the model's inputs).
        attributions: `[B, 1 or C, H, W]` maps; summed over channels to rank pixels.
        target: `[B]` class whose score is tracked.
        mean: per-channel mean of the normalisation; pixels are `inputs * std + mean`, in [0, 1].
        std: per-channel std of the normalisation.
        percentages: percentages of pixels removed, strictly increasing, each strictly in (0, 100).
        orders: `morf` (most relevant first) and/or `lerf` (least relevant first).
        imputation: `linear` (ROAD's noisy linear imputation) or `mean` (kept pixels' channel mean).
        noise_std: std of the Gaussian noise added to imputed pixels, in [0, 1] pixel units.
        score: `softmax` (the target's probability), `logit`, or `accuracy` (top-1 is the target).
        tol: the linear imputation's error tolerance (see `metrics.imputation.noisy_linear_impute`).
        chunk_size: (image, order, percentage) items imputed and forwarded together.

    Returns:
        `morf_auc` and/or `lerf_auc` `[B]` (each curve's mean height, `curve_auc`), `combined` =
        (lerf_auc - morf_auc) / 2 with both orders; per order, `Curve(fractions [S], scores [B, S])`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, a = torch.randn(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
        >>> result = road(model, x, a, torch.tensor([0, 1]), mean=(0.5,) * 3, std=(0.2,) * 3,
        ...               percentages=(25, 50, 75))
        >>> sorted(result.values), result.curves["morf"].scores.shape
        (['combined', 'lerf_auc', 'morf_auc'], torch.Size([2, 3]))
    """
    check_road(mean=mean, std=std, percentages=percentages, orders=orders, imputation=imputation,
               noise_std=noise_std, score=score, tol=tol, chunk_size=chunk_size)  # fmt: skip
    counts = _checked_counts(inputs, attributions, target, mean, std, percentages)
    # Shared random draws, first thing: one tie-break permutation, one noise pattern per perturbation.
    b, c, h, w = inputs.shape
    tie_break = torch.randperm(h * w, device=inputs.device)
    noise = None
    if noise_std > 0:
        shape = (len(orders), len(percentages), c, h, w)
        noise = torch.randn(shape, device=inputs.device, dtype=inputs.dtype) * noise_std
    # Per order, a key of each pixel that is below k exactly for the k pixels that order removes first:
    # the rank for MoRF, the rank from the bottom for LeRF (int32: half the bytes to gather per item).
    rank = pixel_rank(attributions, tie_break)
    keys = torch.stack([rank if o == "morf" else h * w - 1 - rank for o in orders]).to(torch.int32)
    perturb = _Perturbation(inputs, mean, std, keys, counts, noise, imputation, tol)
    scores = torch.empty(perturb.items, device=inputs.device)
    for lo in range(0, perturb.items, chunk_size):
        item = torch.arange(lo, min(lo + chunk_size, perturb.items), device=inputs.device)
        img, x = perturb(item)
        scores[lo : lo + len(item)] = _score(model(x).float(), target[img], score)
    return _curves(scores.view(b, len(orders), len(percentages)), percentages, orders)


def _checked_counts(
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    percentages: Sequence[float],
) -> list[int]:
    """The pixels removed at each percentage, once the shapes fit and a pixel is left at every one."""
    if inputs.dim() != 4:
        raise ValueError(f"inputs of shape {tuple(inputs.shape)}; expected [B, C, H, W]")
    check_inputs(inputs, attributions, target)
    if len(mean) != inputs.shape[1]:
        raise ValueError(f"mean and std have {len(mean)} channels but inputs have {inputs.shape[1]}")
    if len(std) != len(mean):
        raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
    h, w = inputs.shape[2:]
    counts = removal_counts(percentages, h * w)
    if max(counts) >= h * w:
        raise ValueError(
            f"percentages={tuple(percentages)!r} remove all {h * w} pixels of a {h}x{w} image at "
            f"{percentages[counts.index(max(counts))]}%; nothing would be left to impute from"
        )
    return counts


class _Perturbation:
    """The (image, order, percentage) items, item `i` being image `i // (O * S)`, order
    `i // S % O` and percentage `i % S`: each item's image with its removed pixels imputed, back in the
    model's input space and memory format.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        keys: torch.Tensor,
        counts: list[int],
        noise: torch.Tensor | None,
        imputation: str,
        tol: float,
    ) -> None:
        b, c, self.h, self.w = inputs.shape
        device = inputs.device
        shift = torch.tensor(mean, dtype=inputs.dtype, device=device).view(1, c, 1, 1)
        scale = torch.tensor(std, dtype=inputs.dtype, device=device).view(1, c, 1, 1)
        self.pixels = (inputs * scale + shift).contiguous()  # planes, as the imputation reads them
        self.inv_scale, self.offset = 1 / scale, -shift / scale  # back to the model's inputs in one pass
        self.layout = torch.channels_last if _channels_last(inputs) else torch.contiguous_format
        self.keys, self.noise, self.imputation, self.tol = keys, noise, imputation, tol
        self.removed_count = torch.tensor(counts, device=device, dtype=torch.int32)
        self.orders, self.steps = len(keys), len(counts)
        self.items = b * self.orders * self.steps

    def __call__(self, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The items' images (indices `[n]`) and their imputed inputs `[n, C, H, W]`."""
        img, order, step = (
            item // (self.orders * self.steps),
            item // self.steps % self.orders,
            item % self.steps,
        )
        removed = (self.keys[order, img] < self.removed_count[step, None]).view(-1, self.h, self.w)
        shared = None if self.noise is None else self.noise[order, step]
        filled = impute(self.pixels[img], removed, shared, method=self.imputation, tol=self.tol)
        normed = torch.empty_like(filled, memory_format=self.layout)
        return img, torch.addcmul(self.offset, filled, self.inv_scale, out=normed)


def _curves(scores: torch.Tensor, percentages: Sequence[float], orders: Sequence[str]) -> Result:
    """Each order's curve `[B, S]` over the fractions p/100, its AUC, and the combined value."""
    fractions = torch.tensor([p / 100 for p in percentages], dtype=scores.dtype, device=scores.device)
    values: dict[str, torch.Tensor] = {}
    curves: dict[str, Curve] = {}
    for i, name in enumerate(orders):
        auc = curve_auc(scores[:, i], fractions)
        curves[name] = Curve(fractions, scores[:, i].contiguous(), auc)
        values[f"{name}_auc"] = auc
    if len(orders) == 2:
        values["combined"] = (values["lerf_auc"] - values["morf_auc"]) / 2
    return Result(values, curves)


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _score(logits: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    if score == "accuracy":
        return (logits.argmax(dim=1) == target).to(logits.dtype)
    out = logits.softmax(dim=1) if score == "softmax" else logits
    return out.gather(1, target[:, None]).squeeze(1)
