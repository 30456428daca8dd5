"""Honest timing, the same for every method and metric.

Warm-up first, then repeated timed calls; the median and the interquartile range are reported. On CUDA
the calls are timed with CUDA events after a synchronisation; on CPU with `perf_counter`. Every timed
call counts the images that went through the model, with and without autograd, and carries its own
bound: what those images cost in plain forward (and forward+backward) loops of the model at its best
batch size, timed right before and right after the call. Comparing a call with loops timed next to
it, rather than minutes earlier, keeps the ratio honest on a machine that other work slows down and
speeds up from one minute to the next.
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
        bounds_ms: for each timed call, the time of its forwards and backwards at the model's own
            speed, measured next to it (empty when no bound was measured).
    """

    times_ms: list[float]
    forwards: int = 0
    backwards: int = 0
    bounds_ms: list[float] = field(default_factory=list)

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

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook: add the batch sizes of the image tensors in the call's arguments."""
        n = image_rows(args)
        if torch.is_grad_enabled():
            self.backwards += n
        else:
            self.forwards += n


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


def tile_images(
    sample: torch.Tensor, n: int, device: torch.device, memory_format: torch.memory_format
) -> torch.Tensor:
    """`n` images on `device`: the sample's images repeated in order."""
    x = sample.repeat((-(-n // len(sample)), 1, 1, 1))[:n]
    return x.to(device).contiguous(memory_format=memory_format)


def forward_step(model: nn.Module, x: torch.Tensor) -> None:
    """One plain forward pass, no autograd: what perturbation methods and the curves pay per image."""
    with torch.no_grad():
        model(x)


def forward_backward_step(model: nn.Module, x: torch.Tensor) -> None:
    """One forward+backward pass to the input only, as attribution methods take gradients."""
    xg = x.detach().requires_grad_()
    torch.autograd.grad(model(xg).float().logsumexp(dim=1).sum(), xg)


def fastest(per_image_ms: dict[int, float], tolerance: float = 0.05) -> int:
    """The largest batch size whose time per image is within `tolerance` of the best one's."""
    best = min(per_image_ms.values())
    return max(b for b, ms in per_image_ms.items() if ms <= best * (1 + tolerance))


class ModelSpeed:
    """The model's own cost per image on a device: the unit of every bound.

    Times loops of plain forward passes (no autograd) and of forward+backward passes (gradient to
    the input only, as attribution methods take it) on real inputs, each loop covering at least
    `min_images` images: a single short call runs faster than a sustained loop on a busy CPU.

    Attributes:
        batch_size: images per plain forward in the loops: the largest candidate at the best speed.
        grad_batch_size: images per forward+backward, chosen the same way.
        per_batch_ms: forward time per image for each batch size tried.
        per_batch_backward_ms: forward+backward time per image for each batch size tried.
        forward_ms: the best forward time per image seen so far (at `batch_size`).
        forward_backward_ms: the best forward+backward time per image seen so far.
    """

    def __init__(
        self,
        model: nn.Module,
        sample: torch.Tensor,
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
        min_images: int = 16,
    ) -> None:
        self.model, self.sample, self.device = model, sample, device
        self.memory_format, self.min_images = memory_format, min_images
        self.batch_size: int = 1
        self.grad_batch_size: int | None = 1
        self.per_batch_ms: dict[int, float] = {}
        self.per_batch_backward_ms: dict[int, float] = {}
        self.forward_ms = float("inf")
        self.forward_backward_ms: float | None = float("inf")
        self._tiled: dict[int, torch.Tensor] = {}

    def _inputs(self, bs: int) -> torch.Tensor:
        """The sample tiled to `bs` images on the device, built once per batch size."""
        if bs not in self._tiled:
            self._tiled[bs] = tile_images(self.sample, bs, self.device, self.memory_format)
        return self._tiled[bs]

    def _loop_ms(self, grad: bool, bs: int, repeats: int, warm: bool = False) -> float:
        """Best time per image of `repeats` loops, after one warm-up call unless `warm`."""
        x, calls = self._inputs(bs), -(-self.min_images // bs)
        step = forward_backward_step if grad else forward_step

        def loop() -> None:
            for _ in range(calls):
                step(self.model, x)

        def warmup() -> None:
            if not warm:
                step(self.model, x)

        _, t = measure(loop, self.device, warmup=warmup, min_repeats=repeats, max_repeats=repeats)
        return t.best_ms / (calls * bs)

    def choose(
        self, forward_sizes: Sequence[int], backward_sizes: Sequence[int], repeats: int = 3
    ) -> tuple[int, int | None]:
        """Time loops at each candidate size and keep, for each kind of pass, the largest size that
        runs within 5% of the best time per image (on a GPU, the largest that fits). No backward
        sizes (a job that only runs forwards): no forward+backward loops, and `grad_batch_size`
        stays None.
        """
        self.per_batch_ms = {bs: self._loop_ms(False, bs, repeats) for bs in sorted(forward_sizes)}
        self.per_batch_backward_ms = {bs: self._loop_ms(True, bs, repeats) for bs in sorted(backward_sizes)}
        self.batch_size = fastest(self.per_batch_ms)
        self.forward_ms = self.per_batch_ms[self.batch_size]
        if self.per_batch_backward_ms:
            self.grad_batch_size = fastest(self.per_batch_backward_ms)
            self.forward_backward_ms = self.per_batch_backward_ms[self.grad_batch_size]
        else:
            self.grad_batch_size, self.forward_backward_ms = None, None
        return self.batch_size, self.grad_batch_size

    def now(self, forward: bool = True, backward: bool = True) -> tuple[float, float]:
        """Time one loop of each kind asked for (per image, ms), and keep the best seen.

        The shapes were warmed up by `choose`, so no warm-up call is spent here.
        """
        f = b = float("nan")
        if forward:
            f = self._loop_ms(False, self.batch_size, 1, warm=True)
            self.forward_ms = min(self.forward_ms, f)
        if backward:
            if self.grad_batch_size is None or self.forward_backward_ms is None:
                raise RuntimeError("a call backpropagated in a job that chose no forward+backward size")
            b = self._loop_ms(True, self.grad_batch_size, 1, warm=True)
            self.forward_backward_ms = min(self.forward_backward_ms, b)
        return f, b


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

    Args:
        fn: the call to time; it must give the same output each time (seed inside it if random).
        device: where the work runs; CUDA is timed with events.
        model: if given, the images forwarded through it are counted (per call).
        speed: if given (with `model`), each timed call gets its bound: its forwards and backwards
            at the model's speed, timed in loops just before and just after the call.
        warmup: call made once before timing (default: `fn` itself); a cheaper call on a slice of
            the input warms the same code paths at a fraction of the cost.
        min_repeats: timed calls at least.
        max_repeats: timed calls at most.
        budget_s: stop repeating once this much time has been spent on timed calls.
        once_above_s: a first timed call longer than this is not repeated, whatever min_repeats.
    """
    if model is None:
        (warmup or fn)()
    else:
        with count_forwards(model) as seen:
            (warmup or fn)()
    synchronize(device)
    timing = Timing([])
    out: Any = None
    while len(timing.times_ms) < max_repeats and (
        len(timing.times_ms) < min_repeats or sum(timing.times_ms) < budget_s * 1e3
    ):
        if model is None:
            out, ms = _timed(fn, device)
        else:
            kinds = (seen.forwards > 0, seen.backwards > 0)
            before = speed.now(*kinds) if speed and any(kinds) else None
            with count_forwards(model) as counter:
                out, ms = _timed(fn, device)
            timing.forwards, timing.backwards = counter.forwards, counter.backwards
            if before is not None and speed is not None:
                after = speed.now(*kinds)
                per_image = [(a + b) / 2 for a, b in zip(before, after, strict=True)]
                timing.bounds_ms.append(
                    (timing.forwards * per_image[0] if kinds[0] else 0.0)
                    + (timing.backwards * per_image[1] if kinds[1] else 0.0)
                )
        timing.times_ms.append(ms)
        if ms > once_above_s * 1e3:
            break
    return out, timing


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


BACKWARD_SCOPE = "autograd::engine::evaluate_function"


@dataclass
class KernelProfile:
    """Where one profiled call's time goes, from `torch.profiler`.

    On CUDA the times are GPU kernel times; on CPU they are the self times of the ATen ops (the CPU
    has no kernels apart from its ops). Backward means run inside autograd's backward pass.

    Attributes:
        kind: `cuda_kernels` or `cpu_ops`.
        total_ms: kernel (or op) time of the call.
        forward_ms: of which outside the backward pass.
        backward_ms: of which inside it.
        wall_ms: wall time of the profiled call (the profiler's overhead included).
        table: one row per kernel name and pass: `name`, `pass`, `calls`, `ms`, sorted by time.
    """

    kind: str
    total_ms: float
    forward_ms: float
    backward_ms: float
    wall_ms: float
    table: list[dict[str, Any]]


def _in_backward(event: Any) -> bool:
    while event is not None:
        if event.name.startswith(BACKWARD_SCOPE):
            return True
        event = event.cpu_parent
    return False


def profile_call(fn: Callable[[], Any], device: torch.device) -> KernelProfile:
    """Run `fn` once under `torch.profiler` and sum its kernel (CUDA) or op (CPU) times.

    Call it after a warm-up: the first call's one-off costs are not what this measures.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    totals: dict[tuple[str, str], list[float]] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # CUDA kernels are read from the CPU event that launched them
        kernels = (
            [(k.name, k.duration) for k in event.kernels]
            if cuda
            else [(event.name, event.self_cpu_time_total)]
        )
        if not kernels:
            continue
        phase = "backward" if _in_backward(event) else "forward"
        for name, us in kernels:
            entry = totals.setdefault((name, phase), [0, 0.0])
            entry[0] += 1
            entry[1] += us / 1e3
    table = [
        {"name": name, "pass": phase, "calls": int(calls), "ms": ms}
        for (name, phase), (calls, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])
    ]
    by_pass = {p: sum(ms for (_, q), (_, ms) in totals.items() if q == p) for p in ("forward", "backward")}
    return KernelProfile(
        "cuda_kernels" if cuda else "cpu_ops",
        by_pass["forward"] + by_pass["backward"],
        by_pass["forward"],
        by_pass["backward"],
        wall_ms,
        table,
    )
