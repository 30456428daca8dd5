"""A method or metric call of a job: warmed up, timed against its bound and profiled, at a bounded cost.

Every call of a job goes through `measure_call`:

1. warm-up: the first `warmup_passes` model passes (`harness.runtime.first_passes`) of the call on the first
   image, however expensive the whole call is (RISE forwards 1000 masked images per image);
2. timed calls, repeated while `budget_s` lasts (at most `max_repeats`), bracketed by loops of the
   model's own passes at the chunk sizes, which give each call its bound (`harness.runtime.measure`) and
   warm those shapes before the first timed call;
3. a profile (`harness.runtime.profile_call`) of the call's first passes, until `profile_s` has
   passed (at least one pass, the whole call when it is shorter), scaled to the whole call by the
   share of its model images that it covered.

A call that runs out of memory is retried with half the chunk (`harness.runtime.halving_on_oom`). The time
each part took goes to the job's `Stopwatch`, for the row's breakdown of where a job's time goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from harness.config import TimingSettings
from harness.runtime import (
    KernelProfile,
    ModelSpeed,
    Progress,
    Stopwatch,
    Timing,
    first_passes,
    halving_on_oom,
    measure,
    profile_call,
)

# Kernels (or CPU ops) per method and metric in kernels.csv.
TOP_KERNELS = 15


@dataclass
class Measured:
    """A timed and profiled call.

    Attributes:
        out: what the last timed call returned.
        timing: the timed calls, their bound, and what warming up and the bound loops cost.
        chunk_size: the chunk that ran (after halvings on out-of-memory), or None.
        oom_retries: halvings on out-of-memory.
        profile: the profile of the call's first passes, or None when profiling is off.
        profiled_share: the share of the call's model images that the profile covered (1: all).
        n: images the call explained or scored.
    """

    out: Any
    timing: Timing
    chunk_size: int | None
    oom_retries: int
    profile: KernelProfile | None
    profiled_share: float
    n: int

    def per_image(self, profiled_ms: float) -> float:
        """Profiled time scaled to the whole call, per image."""
        return profiled_ms / (self.profiled_share * self.n)

    def fields(self, prefix: str) -> dict[str, Any]:
        """The row's fields of this call, named `<prefix>_...`."""
        t, p, n = self.timing, self.profile, self.n
        bound = t.bound_ms
        fields = {
            f"{prefix}_ms_per_image": t.median_ms / n,
            f"{prefix}_ms_iqr": t.iqr_ms / n,
            f"{prefix}_ms_best": t.best_ms / n,
            f"{prefix}_repeats": len(t.times_ms),
            f"{prefix}_forwards_per_image": t.forwards / n,
            f"{prefix}_backwards_per_image": t.backwards / n,
            f"{prefix}_noted_forwards_per_image": t.noted_forwards / n,
            f"{prefix}_noted_backwards_per_image": t.noted_backwards / n,
            f"{prefix}_bound_ms_per_image": None if bound is None else bound / n,
            f"{prefix}_bound_ratio": t.bound_ratio,
            f"{prefix}_chunk_size": self.chunk_size,
            f"{prefix}_oom_retries": self.oom_retries,
            f"{prefix}_s": t.total_ms / 1e3,
        }
        if p is None:
            return fields
        kernel = self.per_image(p.total_ms)
        return fields | {
            f"{prefix}_kernel_ms_per_image": kernel,
            f"{prefix}_kernel_forward_ms_per_image": self.per_image(p.forward_ms),
            f"{prefix}_kernel_backward_ms_per_image": self.per_image(p.backward_ms),
            # Kernel (CPU: op) time over the wall time of the timed calls, per image.
            f"{prefix}_busy": kernel / (t.median_ms / n) if t.median_ms > 0 else None,
            f"{prefix}_top_kernel": p.table[0]["name"] if p.table else None,
            f"{prefix}_profiled_share": self.profiled_share,
        }


def measure_call(
    call: Callable[[slice, int | None], Any],
    *,
    model: torch.nn.Module,
    device: torch.device,
    speed: ModelSpeed,
    chunk: int | None,
    n: int,
    what: str,
    settings: TimingSettings,
    clock: Stopwatch,
    progress: Progress,
) -> Measured:
    """Warm up, time and profile `call(rows, chunk_size)` on all `n` images, as the module says.

    Args:
        call: the method or metric on a slice of the job's images, with a chunk size.
        model: the model the call runs (its passes are counted, bounded and stopped early).
        device: where it runs.
        speed: the model's speed, for the bound loops.
        chunk: the chunk size to ask for (halved on out-of-memory), or None for calls without one.
        n: the job's images.
        what: `method <name>` or `metric <name>`, for the progress bar and messages.
        settings: the timing settings.
        clock: the job's stopwatch; gets `warmup`, `bound_loops` and `profile` time.
        progress: the job's progress bar.
    """

    def tracked(rows: slice, c: int | None) -> Any:
        with progress.call(what, model, len(range(n)[rows])):
            return call(rows, c)

    def attempt(c: int | None) -> tuple[Any, Timing]:
        return measure(
            lambda: tracked(slice(None), c),
            device,
            model=model,
            speed=speed,
            warmup=lambda: first_passes(
                lambda: tracked(slice(0, 1), c), model, passes=settings.warmup_passes
            ),
            max_repeats=settings.max_repeats,
            budget_s=settings.budget_s,
        )

    if chunk is None:
        (out, timing), retries = attempt(None), 0
    else:
        (out, timing), chunk, retries = halving_on_oom(attempt, chunk, device, what)
    clock.add("warmup", timing.warmup_ms / 1e3)
    clock.add("bound_loops", timing.loops_ms / 1e3)
    profile, share = None, 1.0
    if settings.profile:
        with clock("profile"):
            profile, share = _profiled(lambda: tracked(slice(None), chunk), model, device, settings, timing)
    return Measured(out, timing, chunk, retries, profile, share, n)


def _profiled(
    call: Callable[[], Any],
    model: torch.nn.Module,
    device: torch.device,
    settings: TimingSettings,
    timing: Timing,
) -> tuple[KernelProfile, float]:
    """The profile of the call's first passes (until `profile_s` has passed), and the share of the
    whole call's model images that it covered (1 when it ran to its end).
    """
    part: list[Any] = []
    profile = profile_call(lambda: part.append(first_passes(call, model, seconds=settings.profile_s)), device)
    called = timing.forwards + timing.backwards
    share = part[0].counter.images / called if not part[0].completed and called else 1.0
    return profile, share


def kernels_table(measured: dict[str, Measured]) -> pd.DataFrame:
    """The top kernels (CPU: ops) of the method and of each metric, time per image and share."""
    rows = []
    for phase, m in measured.items():
        if m.profile is None:
            continue
        total = m.profile.total_ms
        for r in m.profile.table[:TOP_KERNELS]:
            share = r["ms"] / total if total > 0 else None
            rows.append({"phase": phase, **r, "ms_per_image": m.per_image(r["ms"]), "share": share})
    columns = ["phase", "name", "pass", "calls", "ms_per_image", "share"]
    return pd.DataFrame(rows, columns=columns)
