"""A job's measured call: a warm-up of its first pass on one image, timed calls, a profile of its first
passes scaled to the whole call; and the row's breakdown of where a job's time goes.
"""

from __future__ import annotations

import pytest
import torch

from harness.config import TimingSettings
from harness.job import measure_call
from harness.runtime import ModelSpeed, Progress, Stopwatch

CPU = torch.device("cpu")
PASSES = 10


def setup(n: int = 3):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(n, 3, 8, 8)
    speed = ModelSpeed(model, x, CPU, min_images=2)
    speed.calibrate({"forward": (2,)}, rounds=1)
    passes: list[int] = []

    def call(rows: slice, chunk: int | None):
        """Ten model passes over the images: an expensive call, in miniature."""
        out = None
        for _ in range(PASSES):
            with torch.no_grad():
                out = model(x[rows])
            passes.append(len(out))
        return out

    return model, speed, call, passes


def measured(settings: TimingSettings, n: int = 3):
    model, speed, call, passes = setup(n)
    clock = Stopwatch()
    m = measure_call(
        call, model=model, device=CPU, speed=speed, chunk=None, n=n, what="metric x", settings=settings,
        clock=clock, progress=Progress("job", enabled=False),
    )  # fmt: skip
    return m, passes, clock


def test_the_warm_up_runs_the_first_pass_on_one_image_and_the_profile_a_share_of_the_call():
    m, passes, clock = measured(TimingSettings(max_repeats=2, profile_s=0.0))
    repeats = len(m.timing.times_ms)
    # warm-up: one pass of one image; timed: PASSES passes of 3 images each; profile: one pass of 3
    assert passes == [1] + [3] * (PASSES * repeats) + [3]
    assert m.profiled_share == pytest.approx(1 / PASSES)
    fields = m.fields("x")
    assert fields["x_kernel_ms_per_image"] == pytest.approx(m.profile.total_ms / (3 / PASSES))
    assert fields["x_profiled_share"] == pytest.approx(0.1) and fields["x_s"] == m.timing.total_ms / 1e3
    assert set(clock.spent) == {"warmup", "bound_loops", "profile"}


def test_a_cheap_call_is_profiled_whole_and_profiling_can_be_switched_off():
    m, passes, _ = measured(TimingSettings(max_repeats=1, profile_s=60.0))
    assert passes[-PASSES:] == [3] * PASSES and m.profiled_share == 1.0
    m, passes, clock = measured(TimingSettings(max_repeats=1, profile=False))
    assert passes == [1] + [3] * PASSES and m.profile is None and "profile" not in clock.spent
    assert "x_kernel_ms_per_image" not in m.fields("x")
