"""Honest timing, the same for every method and metric.

Warm-up first, then repeated timed calls; the median and the interquartile range are reported. On CUDA
the calls are timed with CUDA events after a synchronisation; on CPU with `perf_counter`. Every timed
call counts the images that went through the model, with and without autograd, so that its cost can
be set against the bound it implies: the model's own forward (or forward+backward) time per image,
measured in the same job at the model's best batch size.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Timing:
    """Times of repeated calls, in milliseconds.

    Attributes:
        times_ms: one entry per timed call.
        forwards: images forwarded without autograd, per call.
        backwards: images forwarded with autograd (assumed to be backpropagated), per call.
    """

    times_ms: list[float]
    forwards: int = 0
    backwards: int = 0

    @property
    def median_ms(self) -> float:  # noqa: D102
        return statistics.median(self.times_ms)

    @property
    def best_ms(self) -> float:  # noqa: D102
        return min(self.times_ms)

    @property
    def iqr_ms(self) -> float:  # noqa: D102
        if len(self.times_ms) < 2:
            return 0.0
        q = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q[2] - q[0]


@dataclass
class ForwardCounter:
    """Counts the images that pass through a model's forward, split by whether autograd records."""

    forwards: int = 0
    backwards: int = 0
    _handle: Any = field(default=None, repr=False)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # Image batches anywhere in the arguments: Captum's DeepLift calls model((x,), (baseline,))
        # and joins the two in a hook of its own, so both count.
        n = sum(t.shape[0] for t in _tensors(args) if t.dim() == 4)
        if torch.is_grad_enabled():
            self.backwards += n
        else:
            self.forwards += n


def _tensors(args: Any) -> Iterator[torch.Tensor]:
    if isinstance(args, torch.Tensor):
        yield args
    elif isinstance(args, (tuple, list)):
        for a in args:
            yield from _tensors(a)


@contextmanager
def count_forwards(model: nn.Module) -> Iterator[ForwardCounter]:
    """Count images forwarded through `model` inside the block; the hook is always removed."""
    counter = ForwardCounter()
    handle = model.register_forward_pre_hook(counter._hook)
    try:
        yield counter
    finally:
        handle.remove()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a clock read means the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end)
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    model: nn.Module | None = None,
    warmup: Callable[[], Any] | None = None,
    min_repeats: int = 1,
    max_repeats: int = 5,
    budget_s: float = 2.0,
) -> tuple[Any, Timing]:
    """Time `fn` after a warm-up, repeating while the time budget lasts.

    A call that takes longer than the budget is timed once (after the warm-up); a cheap call up to
    `max_repeats` times. Returns the output of the last call and the timing.

    Args:
        fn: the call to time; it must give the same output each time (seed inside it if random).
        device: where the work runs; CUDA is timed with events.
        model: if given, the images forwarded through it are counted (per call).
        warmup: call made once before timing (default: `fn` itself); a cheaper call on a slice of
            the input warms the same code paths at a fraction of the cost.
        min_repeats: timed calls at least.
        max_repeats: timed calls at most.
        budget_s: stop repeating once this much time has been spent on timed calls.
    """
    (warmup or fn)()
    synchronize(device)
    times: list[float] = []
    counts = (0, 0)
    out: Any = None
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < budget_s * 1e3):
        if model is None:
            out, ms = _timed(fn, device)
        else:
            with count_forwards(model) as counter:
                out, ms = _timed(fn, device)
            counts = (counter.forwards, counter.backwards)
        times.append(ms)
    return out, Timing(times, *counts)


@dataclass
class ForwardCost:
    """The model's own cost per image on this device, the unit of every bound.

    Attributes:
        batch_size: the batch size with the best forward throughput among those tried.
        forward_ms: forward time per image at that batch size (no autograd).
        forward_backward_ms: forward+backward time per image at that batch size.
        per_batch_ms: forward time per image for each batch size tried.
    """

    batch_size: int
    forward_ms: float
    forward_backward_ms: float
    per_batch_ms: dict[int, float]

    def best_of(self, other: ForwardCost) -> ForwardCost:
        """The faster of two measurements at the same batch size (the process warms up over time)."""
        per_batch = {
            bs: min(self.per_batch_ms.get(bs, float("inf")), other.per_batch_ms.get(bs, float("inf")))
            for bs in self.per_batch_ms | other.per_batch_ms
        }
        return ForwardCost(
            self.batch_size,
            per_batch[self.batch_size],
            min(self.forward_backward_ms, other.forward_backward_ms),
            per_batch,
        )

    def bound_ms(self, timing: Timing) -> float:
        """Time the forwards and backwards that `timing` counted would take at the model's speed."""
        return timing.forwards * self.forward_ms + timing.backwards * self.forward_backward_ms


def forward_cost(
    model: nn.Module,
    sample: torch.Tensor,
    device: torch.device,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
    batch_size: int | None = None,
    repeats: int = 3,
    memory_format: torch.memory_format = torch.contiguous_format,
    min_images: int = 16,
) -> ForwardCost:
    """Measure the model's forward time per image at each batch size, and forward+backward at the best.

    Each timed unit is a loop of calls covering at least `min_images` images, as methods and
    metrics run: a single short call is faster than a sustained loop on a busy CPU, and would make
    every bound look tighter than it is. The best of `repeats` units is kept (the model's own speed).

    Args:
        model: classifier on `device`.
        sample: `[N, C, H, W]` real inputs, tiled to fill each batch.
        device: where the model runs.
        batch_sizes: batch sizes to try.
        batch_size: if given, measure only this one.
        repeats: timed units per batch size.
        memory_format: layout of the inputs, as the job will feed them.
        min_images: images per timed unit.
    """

    def tiled(bs: int) -> torch.Tensor:
        x = sample.repeat((-(-bs // len(sample)), 1, 1, 1))[:bs]
        return x.to(device).contiguous(memory_format=memory_format)

    def per_image_ms(step: Callable[[torch.Tensor], Any], bs: int) -> float:
        x, calls = tiled(bs), -(-min_images // bs)

        def unit() -> None:
            for _ in range(calls):
                step(x)

        _, t = measure(unit, device, min_repeats=repeats, max_repeats=repeats)
        return t.best_ms / (calls * bs)

    def forward(x: torch.Tensor) -> None:
        with torch.no_grad():
            model(x)

    def forward_backward(x: torch.Tensor) -> None:
        # Gradient to the input only, as attribution methods take it (no weight gradients).
        xg = x.detach().requires_grad_()
        torch.autograd.grad(model(xg).logsumexp(dim=1).sum(), xg)

    sizes = [batch_size] if batch_size else list(batch_sizes)
    per_batch = {bs: per_image_ms(forward, bs) for bs in sizes}
    best = min(per_batch, key=per_batch.__getitem__)
    return ForwardCost(best, per_batch[best], per_image_ms(forward_backward, best), per_batch)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA's allocator peak on GPU, else the process's resident high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
