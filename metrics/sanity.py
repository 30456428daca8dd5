"""Sanity checks: does the map depend on the model at all?

- `model_randomisation` (Adebayo et al. 2018, https://arxiv.org/abs/1810.03292): re-initialise the
  model's blocks, cascading from the logits down (or each block alone), on a copy of the model, re-run
  the method on each randomised model and compare each map with the trained model's map;
- `random_logit` (Sixt et al. 2020, https://arxiv.org/abs/1912.09818): compare the map of the target
  class with the map of another class drawn from the job's seed.

Both compare per image by the Spearman rank correlation of |map| (`spearman_abs`) and of the signed map
(`spearman`), and by SSIM of |map| scaled from its minimum to its maximum, to [0, 1] (`ssim`), maps
summed over channels.
A map that does not depend on the model keeps similarity 1; lower is better.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from metrics.contract import Better, Curve, Result, metric

SIMILARITIES = ("spearman_abs", "spearman", "ssim")
ORDERS = ("cascading", "independent")
LOWER: dict[str, Better] = dict.fromkeys(SIMILARITIES, "lower")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """`[B, N]` ranks (0-based) of each row's values, tied values sharing their mean rank."""
    s = x.sort(dim=1).values
    left = torch.searchsorted(s, x, side="left")
    right = torch.searchsorted(s, x, side="right")
    return (left + right - 1).double() / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`[B]` Spearman rank correlation of the rows of `a` and `b` `[B, ...]` (ties: mean ranks, as
    `scipy.stats.spearmanr`); 0 where either row is constant (no ranking to agree with).
    """
    ra, rb = _ranks(a.flatten(1).double()), _ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    den = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(dim=1) / den.clamp_min(1e-300), 0.0).float()


def _gaussian(sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, device=device, dtype=torch.float64)
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5, data_range: float = 1.0) -> torch.Tensor:
    """`[B]` mean SSIM (Wang et al. 2004) of images `[B, H, W]`, as scikit-image's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`: a Gaussian
    window truncated at 3.5 sigma, averaged over the pixels whose window lies inside the image.
    """
    w = _gaussian(sigma, 3.5, a.device)
    k = len(w)
    if min(a.shape[-2:]) < k:
        raise ValueError(f"SSIM needs maps of at least {k}x{k} pixels; got {tuple(a.shape[-2:])}")

    def blur(x: torch.Tensor) -> torch.Tensor:  # valid convolution: the cropped pixels only
        x = F.conv2d(x[:, None], w.view(1, 1, 1, k))
        return F.conv2d(x, w.view(1, 1, k, 1))[:, 0]

    a, b = a.double(), b.double()
    ux, uy = blur(a), blur(b)
    vx, vy, vxy = blur(a * a) - ux * ux, blur(b * b) - uy * uy, blur(a * b) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1).float()


def _unit(plane: torch.Tensor) -> torch.Tensor:
    """|map| `[B, H, W]` scaled from its minimum to its maximum, to [0, 1] (a constant map is 0).

    Not divided by its maximum alone: a map on a large offset (RISE's, whose every value is the mean
    score of the masks that kept its pixel) would then look alike whatever its structure.
    """
    m = plane.abs()
    low = m.flatten(1).amin(dim=1)[:, None, None]
    span = (m.flatten(1).amax(dim=1)[:, None, None] - low).clamp_min(torch.finfo(m.dtype).tiny)
    return (m - low) / span


def similarity(maps: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image similarities `[B]` of `maps` with `reference` (both `[B, 1 or C, H, W]`)."""
    a, b = maps.float().sum(dim=1), reference.float().sum(dim=1)
    return {
        "spearman_abs": spearman(a.abs(), b.abs()),
        "spearman": spearman(a, b),
        "ssim": ssim(_unit(a), _unit(b)),
    }


def blocks_modules(model: nn.Module, blocks: Sequence[str | Sequence[str]]) -> list[list[nn.Module]]:
    """The modules of each block (a name or a list of names), checked to exist in `model`."""
    names = dict(model.named_modules())
    out = []
    for block in blocks:
        group = [block] if isinstance(block, str) else list(block)
        missing = [n for n in group if n not in names or n == ""]
        if missing:
            tops = ", ".join(n for n, _ in model.named_children())
            raise ValueError(
                f"block {missing[0]!r} is not a module of the model; its top-level modules: {tops}"
            )
        out.append([names[n] for n in group])
    return out


def reinitialise(modules: Sequence[nn.Module], seed: int, reset_batchnorm: bool) -> None:
    """Re-initialise, in place, every layer inside `modules` with PyTorch's own initialiser
    (`reset_parameters`, which for BatchNorm also resets its running statistics), drawn from `seed`;
    BatchNorm layers only when `reset_batchnorm`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for top in modules:
            for m in top.modules():
                if isinstance(m, _BatchNorm) and not reset_batchnorm:
                    continue
                reset = getattr(m, "reset_parameters", None)
                if callable(reset) and any(True for _ in m.parameters(recurse=False)):
                    reset()


def check_randomisation(
    *, blocks: Sequence[str | Sequence[str]] | None = None, order: str = "cascading", **_: object
) -> None:
    """Raise `ValueError` naming a bad setting of `model_randomisation` and what is allowed (`blocks`
    only when given: the job chooses `auto` blocks from the model, and the metric checks them).
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r}; expected one of {', '.join(ORDERS)}")
    if blocks is not None and (not blocks or any(not b for b in blocks)):
        raise ValueError(
            f"blocks={list(blocks)}; expected a non-empty list of module names (or lists of them) in "
            "forward order (set model.blocks)"
        )


@metric(better=LOWER, needs=("explain_with", "trained"), check=check_randomisation)
def model_randomisation(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    explain_with: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    trained: nn.Module,
    blocks: Sequence[str | Sequence[str]],
    order: str = "cascading",
    reset_batchnorm: bool = True,
    seed: int = 0,
    chunk_size: int | None = None,
) -> Result:
    """Similarity of the maps of randomised models with the trained model's maps (Adebayo et al. 2018).

    Block i (its position in `blocks`) is always re-initialised from seed `seed * 1009 + i`, so the
    cascading and independent orders draw the same weights for it. The trained model is never
    modified: each randomised model is a copy.

    Args:
        model: the job's model (unused: `trained` is copied, as loaded, before speed options).
        inputs: `[B, C, H, W]` images.
        attributions: `[B, 1 or C, H, W]` the method's maps on the trained model.
        target: `[B]` classes explained.
        explain_with: runs the method, `(model, inputs, target) -> maps`.
        trained: the trained model, left as it is.
        blocks: the model's stages in forward order (`model.blocks`), each a module name or a list.
        order: `cascading` (from the last block down, cumulatively) or `independent` (each alone).
        reset_batchnorm: re-initialise BatchNorm layers too (weights 1, biases 0, running mean 0,
            variance 1), as the paper re-initialises every variable of a block.
        seed: the job's seed.
        chunk_size: unused; the method chunks its own passes.

    Returns:
        values: cascading, the similarity once every block is re-initialised; independent, the mean
            over blocks. Curves (`fractions` = share of the block list done; point 0 is the trained
            model, point k the k-th block from the top, alone or with those above it). Arrays: `maps`
            `[B, S, H, W]` float16, each randomised model's map summed over channels (S blocks).
    """
    check_randomisation(blocks=blocks, order=order)
    groups = blocks_modules(trained, blocks)
    points = {k: [torch.ones(len(inputs), device=inputs.device)] for k in SIMILARITIES}
    randomised, maps = copy.deepcopy(trained), []
    for step, i in enumerate(reversed(range(len(groups)))):
        if order == "independent" and step > 0:
            randomised = copy.deepcopy(trained)
        mods = blocks_modules(randomised, [blocks[i]])[0]
        reinitialise(mods, seed * 1009 + i, reset_batchnorm)
        m = explain_with(randomised, inputs, target)
        maps.append(m.float().sum(dim=1).half())
        for key, v in similarity(m, attributions).items():
            points[key].append(v)
    fractions = torch.linspace(0, 1, len(groups) + 1, device=inputs.device)
    curves, values = {}, {}
    for key, pts in points.items():
        scores = torch.stack(pts, dim=1)
        curves[key] = Curve(fractions, scores, torch.trapezoid(scores, fractions, dim=1))
        values[key] = scores[:, -1] if order == "cascading" else scores[:, 1:].mean(dim=1)
    return Result(values, curves, {"maps": torch.stack(maps, dim=1)})


@metric(better=LOWER, needs=("explain",))
def random_logit(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    explain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    seed: int = 0,
    chunk_size: int | None = None,
) -> Result:
    """Similarity of the map of another class with the target's map (Sixt et al. 2020).

    The other class of an image of target t is `(t + d_t) mod K`, K the model's classes, `d` a table
    of K shifts drawn uniformly from 1..K-1 by a generator seeded with `seed`: the same other class
    for every method of a sweep, and for an image whatever batch or chunk it is scored in.

    Args:
        model: the job's model (one forward tells K).
        inputs: `[B, C, H, W]` images.
        attributions: `[B, 1 or C, H, W]` maps of `target`.
        target: `[B]` classes explained.
        explain: the method, `(inputs, target) -> maps`.
        seed: the job's seed.
        chunk_size: unused; the method chunks its own passes.
    """
    with torch.no_grad():
        k = model(inputs[:1]).shape[1]
    if k < 2:
        raise ValueError(f"random_logit needs a model of 2 or more classes; it has {k}")
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, k, (k,), generator=g).to(target.device)
    other = (target + shift[target]) % k
    return Result(similarity(explain(inputs, other), attributions))
