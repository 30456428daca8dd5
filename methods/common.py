"""What every method shares: its traits, and splitting a batch of images into chunks that fit one
forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, TypeVar

import torch
from annotated_types import Ge

F = TypeVar("F", bound=Callable[..., Any])
# A setting's range is part of its annotation, where the config's checks read it
# (`harness.config.check_node`): `n_steps: Count = 50` refuses `method.n_steps=0` before any model work.
Count = Annotated[int, Ge(1)]


@dataclass(frozen=True)
class MethodTraits:
    """What the job, the report and the tests must know about a method, declared on the method.

    Attributes:
        forward_only: runs plain forwards only (no autograd): its config takes `${device.batch_size}`,
            and its jobs neither time nor size forward+backward passes.
        eager_only: hooks or rewrites modules inside the model (Captum's module hooks): it gets the
            eager model even when the device config compiles it (the row's `method_compiled: false`).
        stochastic: draws random numbers (from torch's or NumPy's global generator); the job seeds
            them before every call, so that every call gives the same map.
        ground_truth: takes the images' known evidence (`ground_truth=`, a `metrics.GroundTruth`),
            as the `oracle` does; only on data that has it.
        softmax: scores with the softmax of the logits whatever its settings (RISE), which a model
            with one logit makes constant; the job refuses such a model (a `score=softmax` setting
            is read from the settings).
        references: draws baselines from images of the data held out of the explained ones
            (`references=` `[R, C, H, W]`, `n_references` of them, bound by the job:
            `harness.data.references`), as Expected Gradients does.
        check_model: `(model, probe) -> None`, raising `ValueError` that names what in the model the
            method cannot handle (LRP: a product of two input-dependent tensors); the job runs it on
            one image before any timed or calibrating work.
        attention: reads a transformer's attention (`methods.transformer.AttentionProbs`); the job
            binds the model's token layout (`prefix_tokens`, `grid`).
        check_settings: `(settings, probe) -> None`, raising `ValueError` for settings that do not fit
            the images (a patch grid that does not split them), checked by the job once the settings
            it binds are bound, before any model work.
    """

    forward_only: bool = False
    eager_only: bool = False
    stochastic: bool = False
    ground_truth: bool = False
    softmax: bool = False
    references: bool = False
    check_model: Callable[[Any, torch.Tensor], None] | None = None
    attention: bool = False
    check_settings: Callable[[dict[str, Any], torch.Tensor], None] | None = None


def method(
    *,
    forward_only: bool = False,
    eager_only: bool = False,
    stochastic: bool = False,
    ground_truth: bool = False,
    softmax: bool = False,
    references: bool = False,
    check_model: Callable[[Any, torch.Tensor], None] | None = None,
    attention: bool = False,
    check_settings: Callable[[dict[str, Any], torch.Tensor], None] | None = None,
) -> Callable[[F], F]:
    """Mark a function as an attribution method with its traits (see `MethodTraits`)."""

    def mark(fn: F) -> F:
        traits = MethodTraits(
            forward_only,
            eager_only,
            stochastic,
            ground_truth,
            softmax,
            references,
            check_model,
            attention,
            check_settings,
        )
        fn.traits = traits  # type: ignore[attr-defined]
        return fn

    return mark


def traits_of(fn: Any) -> MethodTraits:
    """The traits of a method, or of a `functools.partial` of one (what Hydra builds)."""
    while isinstance(fn, partial):
        fn = fn.func
    found = getattr(fn, "traits", None)
    if not isinstance(found, MethodTraits):
        raise TypeError(f"{getattr(fn, '__name__', fn)!r} is not a method: mark it with @methods.method(...)")
    return found


def with_extras(maps: torch.Tensor, **extras: torch.Tensor) -> torch.Tensor:
    """`maps` carrying what else the method found per image (each `[B, ...]`: a surrogate's region map
    and the fit of its regression), which the job records with the attribution: as `method_<name>`
    in the job's `attributions.npz`, and the mean of each per-image value (`[B]`) in the row.
    """
    maps.extras = extras  # type: ignore[attr-defined]
    return maps


def extras_of(maps: Any) -> dict[str, torch.Tensor]:
    """The extras a method attached to its maps (`with_extras`), or none."""
    return dict(getattr(maps, "extras", None) or {})


_NOTED: ContextVar[list[float] | None] = ContextVar("noted_passes", default=None)


def note_passes(forwards: float = 0.0, backwards: float = 0.0) -> None:
    """Count work a method runs outside the model's forward that is the model's own work again, in
    images' worth of the model's forward and of its forward+backward: LRP's rule passes, its layers
    run again with other weights. The job adds it to the bound of the method's timing
    (`harness.runtime.count_forwards`), as it adds the images the model's forward sees.
    """
    noted = _NOTED.get()
    if noted is not None:
        noted[0] += forwards
        noted[1] += backwards


@contextmanager
def noting_passes() -> Iterator[list[float]]:
    """Collect `note_passes` inside the block: `[forwards, backwards]`."""
    noted = [0.0, 0.0]
    token = _NOTED.set(noted)
    try:
        yield noted
    finally:
        _NOTED.reset(token)


def chunked(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    target: torch.Tensor,
    images: int,
) -> torch.Tensor:
    """Apply `fn(inputs, target)` to `images` images at a time and concatenate the maps.

    Args:
        fn: attribution of a chunk, `([b, C, H, W], [b]) -> [b, 1 or C, H, W]`.
        inputs: `[B, C, H, W]` images.
        target: `[B]` classes.
        images: images per call, at least 1.
    """
    images = max(1, int(images))
    parts = [
        fn(inputs[i : i + images], target[i : i + images]).detach() for i in range(0, inputs.shape[0], images)
    ]
    return torch.cat(parts)


def input_gradients(
    model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, images: int
) -> torch.Tensor:
    """The gradient of each image's target logit with respect to the image, `images` images per
    forward+backward: `[B, C, H, W]`.
    """

    def gradient(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(model(x).gather(1, t[:, None]).sum(), x)
        return g

    return chunked(gradient, x, target, images)


def like_inputs(t: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """`t` (a batch the method builds from `inputs`: noisy copies, path points, masked images) in the
    memory format the model's inputs come in: channels-last when they are, else as it is.
    """
    if inputs.is_contiguous(memory_format=torch.channels_last) and not inputs.is_contiguous():
        return t.contiguous(memory_format=torch.channels_last)
    return t


def numba_threads() -> None:
    """Run the methods' numba kernels on as many threads as torch uses (at most numba's own)."""
    import numba

    most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), most)))


def seed_all(seed: int) -> None:
    """Seed every generator that methods draw from: torch's (all devices) and NumPy's global one,
    which Captum's GradientShap uses for its baselines and interpolation points.
    """
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
