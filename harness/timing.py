"""Honest timing, the same for every method and metric.

Warm-up first, then repeated timed calls; the median and the interquartile range are reported. On CUDA
the calls are timed with CUDA events after a synchronisation; on CPU with `perf_counter`. Every timed
call counts the images that went through the model, with and without autograd, and carries its own
bound: what those images cost in plain forward (and forward+backward) loops of the model at its best
batch size, timed right before the first and right after the last of its repeats. Comparing a call
with loops timed next to it, rather than minutes earlier, keeps the ratio honest on a machine that
other work slows down and speeds up from one minute to the next.

What timing costs besides the calls is bounded: the warm-up of an expensive call runs only its first
model passes (`first_passes`), two bound loops bracket all repeats of a call, and the batch sizes
and loop speeds of a model are measured once per sweep (`harness.calibration`).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from harness.model_speed import ModelSpeed

# The two kinds of model pass: plain forwards (perturbations, curves) and forward+backward (gradients).
KINDS = ("forward", "forward_backward")


@dataclass
class Timing:
    """Times of repeated calls, in milliseconds, and what timing them cost besides.

    Attributes:
        times_ms: one entry per timed call.
        forwards: images forwarded without autograd, per call.
        backwards: images forwarded with autograd (assumed to be backpropagated), per call.
        bounds_ms: for each timed call, the time of its forwards and backwards at the model's own
            speed, measured next to it (empty when no bound was measured).
        warmup_ms: wall time of the warm-up.
        loops_ms: wall time of the bound loops timed beside the calls.
    """

    times_ms: list[float]
    forwards: int = 0
    backwards: int = 0
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


@dataclass
class ForwardCounter:
    """Counts the images that pass through a model's forward, split by whether autograd records."""

    forwards: int = 0
    backwards: int = 0
    calls: int = 0

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook: add the batch sizes of the image tensors in the call's arguments."""
        n = image_rows(args)
        self.calls += 1
        if torch.is_grad_enabled():
            self.backwards += n
        else:
            self.forwards += n

    @property
    def images(self) -> int:
        """Images forwarded, with and without autograd."""
        return self.forwards + self.backwards


def image_rows(args: Any) -> int:
    """The images (rows of `[B, C, H, W]` tensors) among a model call's arguments."""
    # Captum's DeepLift calls model((x,), (baseline,)) and joins them in a hook of its own.
    return sum(t.shape[0] for t in _tensors(args) if t.dim() == 4)


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
    handle = model.register_forward_pre_hook(counter.hook)
    try:
        yield counter
    finally:
        handle.remove()


class StopEarly(BaseException):
    """Ends a call at a model pass boundary (see `first_passes`). A BaseException, so that a method's
    own `except Exception` cannot swallow it; every `finally` on the way out still runs.
    """


@dataclass
class Partial:
    """What `first_passes` ran: the model passes and images, and whether the call ran to its end."""

    completed: bool
    counter: ForwardCounter


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )  # fmt: skip


def first_passes(
    fn: Callable[[], Any], model: nn.Module, passes: int | None = None, seconds: float | None = None
) -> Partial:
    """Run `fn` until it is about to call `model` for the `passes + 1`-th time, or for the first
    time after `seconds` have passed (at least one pass runs); then stop it there.

    This is how a warm-up or a profile covers the first passes of an expensive call (RISE forwards
    thousands of masked images per image) instead of a whole call on one image, and it warms the
    very shapes that the call uses. A method stopped this way must leave no hooks on the model: it
    is an error if it does (Captum removes its hooks in `finally` blocks).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> part = first_passes(lambda: [model(torch.ones(2, 3)) for _ in range(5)], model, passes=2)
        >>> part.completed, part.counter.calls
        (False, 2)
    """
    limit = float("inf") if passes is None else passes
    deadline = float("inf") if seconds is None else time.perf_counter() + seconds
    counter, hooks = ForwardCounter(), _hooks(model)

    def stop(module: nn.Module, args: tuple[Any, ...]) -> None:
        if counter.calls >= limit or (counter.calls and time.perf_counter() >= deadline):
            raise StopEarly
        counter.hook(module, args)

    handle = model.register_forward_pre_hook(stop)
    try:
        fn()
        completed = True
    except StopEarly:
        completed = False
    finally:
        handle.remove()
    if _hooks(model) != hooks:
        raise RuntimeError(
            f"a call stopped after {counter.calls} model passes left {_hooks(model) - hooks} hooks on the "
            "model; it must remove its hooks in a `finally` block"
        )
    return Partial(completed, counter)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a clock read means the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run `fn` once; its output and wall time in ms (CUDA: events, after a synchronisation)."""
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


def _kinds(counter: ForwardCounter) -> set[str]:
    return {k for k, n in zip(KINDS, (counter.forwards, counter.backwards), strict=True) if n > 0}


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
    timing, seen = Timing([]), ForwardCounter()
    t0 = time.perf_counter()
    if model is None:
        (warmup or fn)()
    else:
        with count_forwards(model) as seen:
            (warmup or fn)()
    synchronize(device)
    timing.warmup_ms = (time.perf_counter() - t0) * 1e3
    bounded = model is not None and speed is not None
    kinds = _kinds(seen) if bounded else set()
    loops: list[dict[str, float]] = []
    stretch: list[int] = []  # the calls since the last loop
    last_loop = time.perf_counter()

    def bound_loop(max_age_s: float = 0.0) -> None:
        nonlocal last_loop
        assert speed is not None
        t = time.perf_counter()
        loops.append(speed.now(sorted(kinds), max_age_s))
        last_loop = time.perf_counter()
        timing.loops_ms += (last_loop - t) * 1e3
        if len(loops) > 1:  # the bound of the calls between the last two loops
            pair = loops[-2:]
            per_image = {k: min(loop[k] for loop in pair if k in loop) for k in kinds}
            bound = timing.forwards * per_image.get("forward", 0.0)
            bound += timing.backwards * per_image.get("forward_backward", 0.0)
            timing.bounds_ms += [bound] * len(stretch)
            stretch.clear()

    if kinds:
        bound_loop(max_age_s=budget_s)  # the loop after the previous call, when it is that recent
    out: Any = None
    while len(timing.times_ms) < max_repeats and (
        len(timing.times_ms) < min_repeats or timing.total_ms < budget_s * 1e3
    ):
        if model is None:
            out, ms = timed(fn, device)
        else:
            with count_forwards(model) as counter:
                out, ms = timed(fn, device)
            timing.forwards, timing.backwards = counter.forwards, counter.backwards
            if bounded:
                kinds |= _kinds(counter)  # a kind the warm-up did not reach: timed after the calls
        timing.times_ms.append(ms)
        stretch.append(len(timing.times_ms) - 1)
        if ms > once_above_s * 1e3:
            break
        if kinds and loops and time.perf_counter() - last_loop >= budget_s:
            bound_loop()
    if kinds and stretch:
        if not loops:  # no kind seen in the warm-up: both loops come after the calls
            bound_loop()
        bound_loop()
    return out, timing


class Stopwatch:
    """Wall time since it was made, and the part of it spent in each named kind of work.

    Example:
        >>> clock = Stopwatch()
        >>> with clock("write"):
        ...     pass
        >>> list(clock.spent), clock.elapsed() >= clock.spent["write"]
        (['write'], True)
    """

    def __init__(self, start: float | None = None) -> None:
        self.start = time.perf_counter() if start is None else start
        self.spent: dict[str, float] = {}

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        """Add the block's wall time to `what`."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(what, time.perf_counter() - t)

    def add(self, what: str, seconds: float) -> None:
        """Add time spent elsewhere (measured by the caller) to `what`."""
        self.spent[what] = self.spent.get(what, 0.0) + seconds

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start


def machine_id() -> str:
    """A file-name-safe name of this machine for per-machine baselines: CPU model, core count and,
    where there is one, the GPU's name (e.g. `amd-epyc-2c` or `amd-epyc-16c-nvidia-h100-80gb-hbm3`).
    """
    import os
    import platform
    import re

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1] for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    parts = [cpu.strip(), f"{os.cpu_count()}c"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    return re.sub(r"[^a-z0-9]+", "-", " ".join(parts).lower()).strip("-")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA's allocator peak on GPU, else the process's resident high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
