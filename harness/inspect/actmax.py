"""Activation maximisation: images that drive chosen channels of a layer, or chosen classes, as high
as they go (Erhan et al. 2009; Simonyan et al. 2014; the regularisers of keras-vis and of Yosinski et
al. 2015 and Olah et al. 2017).

Gradient ascent (Adam) on the pixels, from seeded noise, maximises per image the mean activation of
its channel (or its class's logit) minus an Lp-norm penalty and a total-variation penalty, the
image shifted by a random jitter before each forward; every `blur_every` steps the image is blurred
and every `scale_every` steps rescaled by a random factor around its centre.

All channels are optimised together, one image per channel, in chunks (of the batch size that runs
fastest within the memory budget, `best_chunk`). Each image's randomness (its starting
noise, jitter and scales) comes from a generator of its own, seeded by (seed, unit), and Adam works
element by element, so an image is the same whether its channel is optimised alone or with others,
up to rounding: the model's convolutions round differently with the batch's size (about 1e-6 of a
pixel per step on the test CPU). The forward stops at the layer (a hook ends the pass), so later
layers cost nothing, and a convolution or linear layer computes only the channels asked for.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from harness.runtime import fastest, timed


@dataclass(frozen=True)
class Ascent:
    """Settings of the ascent (every one goes into the figure's JSON).

    Attributes:
        steps: Adam steps.
        lr: Adam's learning rate, in pixel units (images live in [0, 1]).
        init_std: standard deviation of the starting noise around grey (0.5).
        lp: p of the Lp-norm penalty on the image's distance from grey.
        lp_weight: its weight (0: none).
        tv_weight: weight of the total-variation penalty (0: none).
        jitter: largest random shift in pixels, each axis, before each forward (0: none).
        blur_every: blur the image every this many steps (0: never), with a Gaussian of `blur_sigma`.
        blur_sigma: the blur's standard deviation in pixels.
        scale_every: rescale the image every this many steps (0: never) by a factor drawn from `scales`.
        scales: the range of the random scale factor.
        seed: seeds each unit's generator with `seed * 1_000_003 + unit`.
    """

    steps: int = 100
    lr: float = 0.05
    init_std: float = 0.01
    lp: float = 6.0
    lp_weight: float = 0.0
    tv_weight: float = 0.0
    jitter: int = 0
    blur_every: int = 0
    blur_sigma: float = 0.5
    scale_every: int = 0
    scales: tuple[float, float] = (0.95, 1.05)
    seed: int = 0

    def as_dict(self) -> dict:  # noqa: D102
        return asdict(self)


class _Stop(Exception):
    """Raised by the hook once the layer has run: the rest of the forward is not needed."""


def _generator(seed: int, unit: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + unit)


def _jitter(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Each image rolled by its own (dy, dx) (differentiable; a roll's gradient is the roll back)."""
    return torch.stack([torch.roll(x[i], (int(dy[i]), int(dx[i])), dims=(1, 2)) for i in range(len(x))])


def _rescale(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Each image zoomed by its own factor around its centre (reflected at the borders)."""
    theta = torch.zeros(len(x), 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / factors.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(
        F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c
    )
    return F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
    )


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, per image: `[N]`."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return dh + dw


def lp_penalty(x: torch.Tensor, p: float) -> torch.Tensor:
    """Mean of `|x - 0.5|^p` per image: `[N]`."""
    return (x - 0.5).abs().pow(p).flatten(1).mean(dim=1)


@torch.no_grad()
def penalty_gradient(x: torch.Tensor, s: Ascent, grad: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of `lp_weight * lp_penalty + tv_weight * total_variation`, summed over images,
    computed directly (a few passes over the pixels, no autograd graph) and added to `grad` (a new
    zero tensor when None): what `_ascend` adds to the objective's gradient.
    """
    grad = torch.zeros_like(x) if grad is None else grad
    per_image = x[0].numel()
    if s.lp_weight:
        d = x - 0.5
        if float(s.lp).is_integer() and s.lp % 2 == 0:  # |d|^p' = p d^(p-1) for an even p
            power = d.pow(int(s.lp) - 1)
        else:
            power = d.abs().pow(s.lp - 1) * d.sign()
        grad.add_(power, alpha=s.lp_weight * s.lp / per_image)
    if s.tv_weight:
        for dim in (2, 3):
            n = x.shape[dim]
            step = (x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)).sign_()
            scale = s.tv_weight / (per_image // x.shape[dim] * (n - 1))
            grad.narrow(dim, 1, n - 1).add_(step, alpha=scale)
            grad.narrow(dim, 0, n - 1).sub_(step, alpha=scale)
    return grad


class Objective:
    """Per image, the mean activation of its channel of `layer` (its class's logit when `layer` is
    None), with the forward stopped right after the layer (`stop=False` runs the whole model, as
    FlashTorch does).

    When the layer is a `Conv2d` (not grouped) or a `Linear`, the forward stops before it and the
    layer computes only the channels asked for: each image through the filters of its group of up
    to 8 images, of which it keeps its own (a chunk of 2 on a layer of 480 channels does 2/480 of
    the layer's work, forward and backward). The first call checks that this gives the layer's own
    output (a subclass that transforms its weight across channels would not) and otherwise runs the
    whole layer.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None,
        mean: Sequence[float],
        std: Sequence[float],
        stop: bool = True,
    ):
        self.model, self.layer, self.stop = model, layer, stop
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        module = model.get_submodule(layer) if layer is not None else None
        # None: not yet checked on the first call; False: the layer runs whole.
        self.narrow: bool | None = None if stop and _narrowable(module) else False

    def __call__(self, pixels: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """`[N]` activations of `units[i]` for image `pixels[i]` (pixels in [0, 1])."""
        x = (pixels - self.mean.to(pixels)) / self.std.to(pixels)
        rows = torch.arange(len(units), device=pixels.device)
        if self.layer is None:
            return self.model(x)[rows, units]
        layer = self.model.get_submodule(self.layer)
        if self.narrow is False:
            out = _output_of(self.model, layer, x, stop=self.stop)[rows, units]
        else:
            inputs = _inputs_of(self.model, layer, x)
            out = _own_units(layer, inputs, units)
            if self.narrow is None:
                with torch.no_grad():
                    whole = layer(*inputs)[rows, units]
                self.narrow = torch.allclose(
                    out.detach(), whole, rtol=1e-4, atol=1e-5 * float(whole.abs().max())
                )
                if not self.narrow:
                    out = layer(*inputs)[rows, units]
        return out.flatten(1).mean(dim=1) if out.dim() > 1 else out


def _narrowable(module: nn.Module | None) -> bool:
    if not (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)):
        return False
    own = {name for name, _ in module.named_parameters(recurse=False)}
    return own <= {"weight", "bias"} and not parametrize.is_parametrized(module)


def _output_of(model: nn.Module, layer: nn.Module, x: torch.Tensor, stop: bool) -> torch.Tensor:
    """`layer`'s output in the model's forward on `x`, the forward stopped there when `stop`."""
    captured = []

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        captured.append(output)
        if stop:
            raise _Stop

    _forward(model, x, layer.register_forward_hook(hook))
    return captured[0]


def _inputs_of(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple:
    """`layer`'s positional inputs in the model's forward on `x`, the forward stopped there."""
    captured = []

    def hook(_module: nn.Module, inputs: tuple) -> None:
        captured.append(inputs)
        raise _Stop

    _forward(model, x, layer.register_forward_pre_hook(hook))
    return captured[0]


def _forward(model: nn.Module, x: torch.Tensor, handle: Any) -> None:
    """The model's forward on `x` until a hook stops it; the hook's `handle` removed after."""
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()


def _own_units(layer: nn.Module, inputs: tuple, units: torch.Tensor, group: int = 8) -> torch.Tensor:
    """`[N, ...]`: image i's output at channel `units[i]` of `layer` (a Conv2d or Linear), computed
    with only the rows of the weight (and bias) that `units` name: `group` images at a time, each
    through the group's filters (`group` times the work of one filter per image, and that much
    memory, against the layer's width).
    """
    weight, bias = layer.weight, getattr(layer, "bias", None)
    assert isinstance(weight, torch.Tensor)
    parts = []
    for lo in range(0, len(units), group):
        some = units[lo : lo + group]
        chosen = {"weight": weight[some]}
        if isinstance(bias, torch.Tensor):
            chosen["bias"] = bias[some]
        out = torch.func.functional_call(layer, chosen, tuple(t[lo : lo + group] for t in inputs))
        rows = torch.arange(len(some), device=out.device)
        parts.append(out[rows, rows])  # each image's own unit of the group's
    return torch.cat(parts)


def pass_times(
    objective: Objective,
    units: Sequence[int],
    size: int,
    device: torch.device,
    sizes: Sequence[int],
    rounds: int = 3,
) -> dict[int, float]:
    """Seconds per image of one forward+backward pass of `objective` at each batch size of `sizes`:
    the bound of an ascent, and how to chunk it. Each size is warmed up once, then `rounds` rounds
    take the sizes in turn (enough passes for about 16 images each) and each size keeps its median,
    so that a slow spell of a shared machine does not fall on one size only.
    """
    batches = {}
    for b in sizes:
        x = torch.rand(b, 3, size, size, device=device, requires_grad=True)
        target = torch.tensor([units[i % len(units)] for i in range(b)], device=device)
        objective(x, target).sum().backward()  # warm-up
        batches[b] = (x, target)
    seconds: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(rounds):
        for b, (x, target) in batches.items():
            reps = max(2, 16 // b)

            def passes(x: torch.Tensor = x, target: torch.Tensor = target, reps: int = reps) -> None:
                for _ in range(reps):
                    x.grad = None
                    objective(x, target).sum().backward()

            seconds[b].append(timed(passes, device)[1] / 1e3 / (reps * b))
    return {b: statistics.median(t) for b, t in seconds.items()}


def best_chunk(per_image: dict[int, float], device: torch.device) -> int:
    """Images per ascent chunk, from `pass_times`: of the batch sizes within 5% of the fastest per
    image, the largest on a GPU (fewer, fuller launches) and the smallest on a CPU, where a batch
    buys nothing once the cores are busy and a larger one leaves the caches (EfficientNet-Lite0 at
    224 on the 2-core test machine: 12 ms per image pass at batches of 2 and 4, 16 to 18 at 8).
    """
    return fastest(per_image, largest=device.type != "cpu")


def maximise(
    objective: Objective,
    units: Sequence[int],
    size: int,
    settings: Ascent,
    device: torch.device,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images `[N, 3, size, size]` in [0, 1] that maximise each unit, with each unit's objective at
    the start (the seeded noise) and at the end; `chunk_size` units at a time (None: all at once).
    """
    chunk = chunk_size or len(units)
    images, start, end = [], [], []
    for lo in range(0, len(units), chunk):
        part = list(units[lo : lo + chunk])
        x, a0, a1 = _ascend(objective, part, size, settings, device)
        images.append(x)
        start.append(a0)
        end.append(a1)
    return torch.cat(images), torch.cat(start), torch.cat(end)


def _ascend(
    objective: Objective, units: list[int], size: int, s: Ascent, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gens = [_generator(s.seed, u) for u in units]
    target = torch.tensor(units, device=device)
    x = torch.stack([0.5 + s.init_std * torch.randn(3, size, size, generator=g) for g in gens])
    x = x.clamp(0, 1).to(device).requires_grad_(True)
    with torch.no_grad():
        start = objective(x, target).float().cpu()
    # Fused: one pass over the pixels per step (0.06 ms per 224-pixel image on the test CPU, against
    # 0.5 ms for the loop of separate operations).
    optimiser = torch.optim.Adam([x], lr=s.lr, fused=device.type in ("cpu", "cuda"))
    for step in range(1, s.steps + 1):
        shifts = torch.stack([torch.randint(-s.jitter, s.jitter + 1, (2,), generator=g) for g in gens])
        seen = _jitter(x, shifts[:, 0], shifts[:, 1]) if s.jitter else x
        optimiser.zero_grad(set_to_none=True)
        (-objective(seen, target)).sum().backward()  # images do not interact: each gets its own gradient
        if s.lp_weight or s.tv_weight:
            assert x.grad is not None
            penalty_gradient(x, s, x.grad)
        optimiser.step()
        with torch.no_grad():
            if s.blur_every and step % s.blur_every == 0:
                x.copy_(_blur(x, s.blur_sigma))
            if s.scale_every and step % s.scale_every == 0:
                lo, hi = s.scales
                factors = torch.stack([lo + (hi - lo) * torch.rand((), generator=g) for g in gens])
                x.copy_(_rescale(x, factors))
            x.clamp_(0, 1)
    with torch.no_grad():
        end = objective(x, target).float().cpu()
    return x.detach(), start, end
