"""Clocks: device synchronisation, one timed call (CUDA events on a GPU, `perf_counter` on a CPU),
a stopwatch of where a job's time goes, peak memory, and the machine's name.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


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
