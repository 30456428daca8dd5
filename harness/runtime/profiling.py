"""Where a call's time goes: `torch.profiler` kernel (CUDA) or op (CPU) times, by pass.

`profile_call` runs a call once under the profiler and sums the kernel time inside and outside
autograd's backward pass. The harness profiles only the first model passes of each measured call
(`harness.job.measured`), a small share of it, and scales the figures to the whole call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from harness.runtime.clock import synchronize

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


def quiet_kineto() -> None:
    """Keep Kineto (the profiler's tracing library) from printing to stderr on a machine with no GPU.

    There its `profiler_start` / `profiler_stop` lines and a `gpuGetDeviceCount failed` ERROR line
    come with every profiled call of a CUDA build of torch, and say nothing. With a GPU, its
    messages may matter (CUPTI errors leave kernel times empty) and are kept. Kineto reads the
    level once, when the first profile starts; a level set by the user wins.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def profile_call(fn: Callable[[], Any], device: torch.device) -> KernelProfile:
    """Run `fn` once under `torch.profiler` and sum its kernel (CUDA) or op (CPU) times.

    Call it after a warm-up: the first call's one-off costs are not what this measures.
    """
    from torch.profiler import ProfilerActivity, profile

    quiet_kineto()
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
