"""Honest timing, the same for every method and metric.

Warm-up first, then repeated timed calls; the median and the interquartile range are reported. On CUDA
the calls are timed with CUDA events after a synchronisation; on CPU with `perf_counter`. Every timed
call counts the images that went through the model, with and without autograd, and carries its own
bound: what those images cost in plain forward (and forward+backward) loops of the model at its best
batch size, timed right before the first and right after the last of its repeats. Comparing a call
with loops timed next to it, rather than minutes earlier, keeps the ratio honest on a machine that
other work slows down and speeds up from one minute to the next.

What timing costs besides the calls is bounded: the warm-up of an expensive call runs only its first
model passes (`harness.runtime.passes.first_passes`), two bound loops bracket all repeats of a call,
and the batch sizes and loop speeds of a model are measured once per sweep
(`harness.runtime.calibration`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.runtime.clock import synchronize, timed
from harness.runtime.model_speed import KINDS, ModelSpeed
from harness.runtime.passes import ForwardCounter, count_forwards


@dataclass
class Timing:
    """Times of repeated calls, in milliseconds, and what timing them cost besides.

    Attributes:
        times_ms: one entry per timed call.
        forwards: images forwarded without autograd, per call.
        backwards: images forwarded with autograd (assumed to be backpropagated), per call.
        noted_forwards: the model's forward again outside it, in images' worth, per call, as the
            method noted it (`methods.common.note_passes`: LRP's rule passes).
        noted_backwards: the same for forward+backward passes.
        bounds_ms: for each timed call, the time of its forwards and backwards at the model's own
            speed, measured next to it (empty when no bound was measured).
        warmup_ms: wall time of the warm-up.
        loops_ms: wall time of the bound loops timed beside the calls.
    """

    times_ms: list[float]
    forwards: int = 0
    backwards: int = 0
    noted_forwards: float = 0.0
    noted_backwards: float = 0.0
    bounds_ms: list[float] = field(default_factory=list)
    warmup_ms: float = 0.0
    loops_ms: float = 0.0

    @property
    def median_ms(self) -> float:  # noqa: D102
        return statistics.median(self.times_ms)

    @property
    def best_ms(self) -> float:  # noqa: D102
        return min(self.times_ms)

    @property
    def total_ms(self) -> float:
        """Wall time of all timed calls."""
        return sum(self.times_ms)

    @property
    def iqr_ms(self) -> float:  # noqa: D102
        if len(self.times_ms) < 2:
            return 0.0
        q = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q[2] - q[0]

    @property
    def bound_ratio(self) -> float | None:
        """The best ratio of a call's time to its own bound (interference only ever adds time)."""
        # No bounds at all when the call was timed without a model speed.
        ratios = [t / b for t, b in zip(self.times_ms, self.bounds_ms, strict=False) if b > 0]
        return min(ratios) if ratios else None

    @property
    def bound_ms(self) -> float | None:
        """The smallest bound measured next to the calls."""
        positive = [b for b in self.bounds_ms if b > 0]
        return min(positive) if positive else None


def _kinds(counter: ForwardCounter) -> set[str]:
    seen = (counter.forwards + counter.noted_forwards, counter.backwards + counter.noted_backwards)
    return {k for k, n in zip(KINDS, seen, strict=True) if n > 0}


class _Bounds:
    """The loops of the model's own passes that bracket the repeats of one call (see `measure`), and
    the bound they give each repeat: its forwards and backwards at the faster of the two loops around
    its stretch of calls.
    """

    def __init__(self, speed: ModelSpeed | None, timing: Timing, kinds: set[str]) -> None:
        self.speed, self.timing, self.kinds = speed, timing, kinds
        self.loops: list[dict[str, float]] = []
        self.stretch = 0  # calls since the last loop
        self.last = time.perf_counter()

    def loop(self, max_age_s: float = 0.0) -> None:
        """A loop of each kind now (or the last one, when younger than `max_age_s`); it closes the
        stretch of calls since the loop before it.
        """
        assert self.speed is not None
        t = time.perf_counter()
        self.loops.append(self.speed.now(sorted(self.kinds), max_age_s))
        self.last = time.perf_counter()
        self.timing.loops_ms += (self.last - t) * 1e3
        if len(self.loops) > 1:
            pair = self.loops[-2:]
            per_image = {k: min(loop[k] for loop in pair if k in loop) for k in self.kinds}
            tm = self.timing
            bound = (tm.forwards + tm.noted_forwards) * per_image.get("forward", 0.0)
            bound += (tm.backwards + tm.noted_backwards) * per_image.get("forward_backward", 0.0)
            self.timing.bounds_ms += [bound] * self.stretch
            self.stretch = 0

    def due(self, budget_s: float) -> bool:
        """Whether `budget_s` has passed since the last loop (when there is one)."""
        return bool(self.kinds and self.loops) and time.perf_counter() - self.last >= budget_s

    def finish(self) -> None:
        """Close the last stretch (both loops after the calls when the warm-up saw no kind)."""
        if self.kinds and self.stretch:
            if not self.loops:
                self.loop()
            self.loop()


def _warm_up(
    warm: Callable[[], Any], model: nn.Module | None, device: torch.device
) -> tuple[float, ForwardCounter]:
    """Run the warm-up; its wall time in ms and the passes it made through `model`."""
    t0 = time.perf_counter()
    if model is None:
        warm()
        seen = ForwardCounter()
    else:
        with count_forwards(model) as seen:
            warm()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3, seen


def _call(
    fn: Callable[[], Any], device: torch.device, model: nn.Module | None
) -> tuple[Any, float, ForwardCounter | None]:
    """One timed call: its output, its time in ms, and the passes it made through `model`."""
    if model is None:
        return *timed(fn, device), None
    with count_forwards(model) as counter:
        out, ms = timed(fn, device)
    return out, ms, counter


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    model: nn.Module | None = None,
    speed: ModelSpeed | None = None,
    warmup: Callable[[], Any] | None = None,
    min_repeats: int = 1,
    max_repeats: int = 5,
    budget_s: float = 2.0,
    once_above_s: float = float("inf"),
) -> tuple[Any, Timing]:
    """Time `fn` after a warm-up, repeating while the time budget lasts.

    A call that takes longer than the budget is timed `min_repeats` times; a cheap call up to
    `max_repeats` times. Returns the output of the last call and the timing.

    With `speed`, loops of the model's own passes (one of each kind that the calls use) bracket the
    calls: one before the first call, one after the last, and one between two calls whenever
    `budget_s` has passed since the last loop. Each call's bound is its forwards and backwards at
    the speed of the faster of the loops just before and just after its stretch of calls (other work
    on the machine only ever adds time, to loops as to calls), so a call is always compared with the
    model timed within about `budget_s` of it, and cheap calls repeated back to back share two loops
    instead of paying two each. The loop before the first call is the last loop of the previous call
    when that ended less than `budget_s` ago.

    Args:
        fn: the call to time; it must give the same output each time (seed inside it if random).
        device: where the work runs; CUDA is timed with events.
        model: if given, the images forwarded through it are counted (per call).
        speed: if given (with `model`), the calls get their bound, as above.
        warmup: call made once before timing (default: `fn` itself); `first_passes` of `fn` warms the
            same shapes at a fraction of the cost.
        min_repeats: timed calls at least.
        max_repeats: timed calls at most.
        budget_s: stop repeating once this much time has been spent on timed calls.
        once_above_s: a first timed call longer than this is not repeated, whatever min_repeats.
    """
    timing = Timing([])
    timing.warmup_ms, seen = _warm_up(warmup or fn, model, device)
    bounded = model is not None and speed is not None
    bounds = _Bounds(speed, timing, _kinds(seen) if bounded else set())
    if bounds.kinds:
        bounds.loop(max_age_s=budget_s)  # the loop after the previous call, when it is that recent
    out: Any = None
    while len(timing.times_ms) < max_repeats and (
        len(timing.times_ms) < min_repeats or timing.total_ms < budget_s * 1e3
    ):
        out, ms, counter = _call(fn, device, model)
        if counter is not None:
            timing.forwards, timing.backwards = counter.forwards, counter.backwards
            timing.noted_forwards, timing.noted_backwards = counter.noted_forwards, counter.noted_backwards
            if bounded:
                bounds.kinds |= _kinds(counter)  # a kind the warm-up did not reach: timed after the calls
        timing.times_ms.append(ms)
        bounds.stretch += 1
        if ms > once_above_s * 1e3:
            break
        if bounds.due(budget_s):
            bounds.loop()
    bounds.finish()
    return out, timing
