"""Timing: forward counting, repeats, bounds, calls stopped after their first passes, choosing batch
sizes from loops, the stopwatch; the bootstrap interval.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.job import bootstrap_ci
from harness.runtime import (
    ModelSpeed,
    StopEarly,
    Stopwatch,
    Timing,
    count_forwards,
    fastest,
    first_passes,
    forward_backward_step,
    forward_step,
    measure,
    profile_call,
)


def test_count_forwards_splits_autograd_from_inference():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    with count_forwards(model) as c:
        model(torch.randn(3, 3, 2, 2))
        with torch.no_grad():
            model(torch.randn(5, 3, 2, 2))
            model(torch.randn(2, 3, 2, 2))
    assert (c.forwards, c.backwards) == (7, 3)
    assert not model._forward_pre_hooks  # hook removed


def test_count_forwards_sees_deeplifts_inputs_and_baselines(small_cnn, images):
    import methods

    target = torch.zeros(5, dtype=torch.long)
    with count_forwards(small_cnn.module) as c:
        methods.deeplift(small_cnn.module, images, target, implementation="captum")
    assert (c.forwards, c.backwards) == (0, 10)  # Captum's: 5 images + 5 baselines, in one batch
    with count_forwards(small_cnn.module) as c:
        methods.deeplift(small_cnn.module, images, target)
    assert (c.forwards, c.backwards) == (1, 5)  # the rescale pass: the baseline alone, then the images


def test_measure_warms_up_repeats_and_counts():
    model, calls = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), []

    def fn():
        calls.append(1)
        with torch.no_grad():
            return model(torch.randn(6, 3, 2, 2))

    out, t = measure(fn, torch.device("cpu"), model=model, min_repeats=3, max_repeats=3)
    assert len(calls) == 4 and len(t.times_ms) == 3  # one warm-up, three timed
    assert out.shape == (6, 2) and (t.forwards, t.backwards) == (6, 0)  # per call


def test_expensive_call_is_timed_once_after_warmup():
    import time

    calls = []
    _, t = measure(lambda: (calls.append(1), time.sleep(0.05)), torch.device("cpu"), budget_s=0.01)
    assert len(calls) == 2 and len(t.times_ms) == 1 and t.times_ms[0] >= 50


def test_timing_statistics():
    t = Timing([4.0, 1.0, 3.0, 2.0, 5.0])
    assert t.median_ms == 3.0 and t.best_ms == 1.0 and t.iqr_ms == 2.0


def test_bound_ratio_is_the_best_paired_ratio():
    t = Timing([30.0, 20.0, 40.0], bounds_ms=[10.0, 16.0, 20.0])
    assert t.bound_ratio == 1.25 and t.bound_ms == 10.0
    assert Timing([1.0]).bound_ratio is None


def tiny_model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))


def test_model_speed_calibrates_every_size_and_chooses_from_them():
    model = tiny_model()
    speed = ModelSpeed(model, torch.randn(3, 3, 8, 8), torch.device("cpu"), min_images=4)
    tables = speed.calibrate({"forward": (1, 2, 4), "forward_backward": (1, 2)}, rounds=2)
    assert set(tables["forward"]) == {1, 2, 4} and set(tables["forward_backward"]) == {1, 2}
    assert speed.batch_size == fastest(
        tables["forward"], largest=False
    )  # on a CPU, the smallest near the best
    assert speed.grad_batch_size == fastest(tables["forward_backward"], largest=False)
    assert speed.forward_ms == tables["forward"][speed.batch_size] > 0
    f = speed.now(["forward"])
    assert set(f) == {"forward"} and f["forward"] > 0 and speed.forward_ms <= f["forward"]


def fake_speed(times: dict[int, list[float]]) -> tuple[ModelSpeed, list[int]]:
    """A ModelSpeed whose forward loops at size b take times[b][i] ms per image on the i-th loop."""
    speed = ModelSpeed(tiny_model(), torch.randn(2, 3, 8, 8), torch.device("cpu"))
    calls: list[int] = []

    def loop_ms(kind, bs):
        calls.append(bs)
        return times[bs][calls.count(bs) - 1]

    speed.loop_ms = loop_ms  # type: ignore[method-assign]
    return speed, calls


def test_calibration_goes_round_all_sizes_so_a_noisy_start_does_not_choose():
    """A noisy first stretch (the first three loops ten times slower) hits sizes 1, 2 and 4 in the
    first round only; the best of three rounds gives each size its real speed, and 8 is chosen.
    """
    real = {1: 3.0, 2: 2.0, 4: 1.5, 8: 1.0}
    noisy = {b: [ms * (10 if i == 0 and b < 8 else 1) for i in range(3)] for b, ms in real.items()}
    speed, calls = fake_speed(noisy)
    tables = speed.calibrate({"forward": (1, 2, 4, 8)}, rounds=3)
    assert calls == [1, 2, 4, 8] * 3  # round robin, not size by size
    assert tables["forward"] == real and speed.batch_size == 8


def test_a_recent_loop_is_reused_as_the_next_calls_first_loop():
    speed, calls = fake_speed({1: [2.0, 3.0, 4.0]})
    speed.adopt({"forward": {1: 1.0}})
    assert speed.now(["forward"]) == {"forward": 2.0}
    assert speed.now(["forward"], max_age_s=60) == {"forward": 2.0} and calls == [1]  # reused
    assert speed.now(["forward"], max_age_s=0) == {"forward": 3.0} and calls == [1, 1]


def test_cheap_repeats_share_two_bound_loops_and_long_calls_get_one_between_each():
    import time

    model = tiny_model()
    x = torch.randn(4, 3, 8, 8)
    model(x)
    speed, calls = fake_speed({1: [1.0] * 20})
    speed.model = model
    speed.adopt({"forward": {1: 1.0}})

    def cheap():
        with torch.no_grad():
            return model(x)

    _, t = measure(cheap, torch.device("cpu"), model=model, speed=speed, min_repeats=5, max_repeats=5)
    assert len(t.times_ms) == 5 and len(calls) == 2 and t.bounds_ms == [4.0] * 5  # 4 images at 1 ms
    assert t.loops_ms > 0 and t.warmup_ms > 0

    def slow():
        time.sleep(0.02)
        return cheap()

    calls.clear()
    _, t = measure(slow, torch.device("cpu"), model=model, speed=speed, min_repeats=3, budget_s=0.01)
    assert len(t.times_ms) == 3 and len(calls) == 4  # before, between each two, after
    assert len(t.bounds_ms) == 3 and t.bound_ratio is not None


def test_passes_a_method_notes_are_added_to_its_bound():
    """A call that forwards 4 images and notes 2.5 images' worth of forwards (as LRP notes its rule
    passes) is bounded by 6.5 images at the loop's 1 ms per image.
    """
    from methods.common import note_passes

    model = tiny_model()
    x = torch.randn(4, 3, 8, 8)
    model(x)
    speed, _ = fake_speed({1: [1.0] * 20})
    speed.model = model
    speed.adopt({"forward": {1: 1.0}})

    def noting():
        with torch.no_grad():
            out = model(x)
        note_passes(forwards=2.5)
        return out

    _, t = measure(noting, torch.device("cpu"), model=model, speed=speed, min_repeats=2, max_repeats=2)
    assert t.forwards == 4 and t.noted_forwards == 2.5 and t.bounds_ms == [6.5, 6.5]
    note_passes(forwards=1.0)  # outside a count: nothing to add it to, and no error


def test_each_timed_call_gets_a_bound_measured_beside_it():
    model = tiny_model()
    x = torch.randn(6, 3, 8, 8)
    speed = ModelSpeed(model, x, torch.device("cpu"), min_images=4)
    speed.calibrate({"forward": (2,), "forward_backward": (2,)}, rounds=1)

    def call():
        with torch.no_grad():
            model(x)
        return model(x[:2]).sum()  # 6 images without autograd, 2 with

    _, t = measure(call, torch.device("cpu"), model=model, speed=speed, min_repeats=2, max_repeats=2)
    assert (t.forwards, t.backwards) == (6, 2) and len(t.bounds_ms) == 2
    assert all(b > 0 for b in t.bounds_ms) and t.bound_ratio is not None


def test_first_passes_stops_a_call_after_its_first_model_passes():
    model = torch.nn.Linear(3, 1)
    done = []

    def call():
        try:
            for _ in range(5):
                try:
                    model(torch.ones(2, 3, 1, 1).flatten(1))
                except Exception:  # a method's own error handling must not swallow the stop
                    pass
            done.append(True)
        finally:
            done.append("finally")

    part = first_passes(call, model, passes=2)
    assert not part.completed and part.counter.calls == 2 and done == ["finally"]
    assert not model._forward_pre_hooks  # our hook removed
    assert first_passes(call, model, passes=10).completed
    part = first_passes(call, model, seconds=0.0)
    assert not part.completed and part.counter.calls == 1  # at least one pass, even with no time
    assert issubclass(StopEarly, BaseException) and not issubclass(StopEarly, Exception)


def test_first_passes_refuses_a_call_that_leaves_hooks_when_stopped():
    model = torch.nn.Sequential(torch.nn.Linear(3, 1))

    def leaky():
        model[0].register_forward_hook(lambda *a: None)  # never removed
        for _ in range(3):
            model(torch.ones(1, 3))

    with pytest.raises(RuntimeError, match="left 1 hooks on the model"):
        first_passes(leaky, model, passes=1)


def test_stopwatch_adds_up_named_parts():
    import time

    clock = Stopwatch()
    with clock("a"):
        time.sleep(0.01)
    clock.add("a", 0.5)
    clock.add("b", 0.25)
    assert clock.spent["a"] >= 0.51 and clock.spent["b"] == 0.25 and clock.elapsed() >= 0.01


def test_bootstrap_matches_naive_resampling():
    v = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.4, 0.3])
    lo, hi = bootstrap_ci(v, resamples=4000, seed=1)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(6, (4000, 6), generator=g).numpy()
    means = v.double().numpy()[idx].mean(axis=1)
    assert np.isclose(lo, np.quantile(means, 0.025)) and np.isclose(hi, np.quantile(means, 0.975))
    assert np.allclose(bootstrap_ci(torch.full((5,), 0.3)), (0.3, 0.3))


def test_long_call_is_not_repeated_even_with_min_repeats():
    import time

    _, t = measure(lambda: time.sleep(0.03), torch.device("cpu"), min_repeats=3, once_above_s=0.01)
    assert len(t.times_ms) == 1


def test_fastest_is_the_largest_size_near_the_best_time():
    assert fastest({1: 3.0, 8: 1.0, 16: 1.04, 32: 1.2}) == 16
    assert fastest({1: 3.0, 8: 1.0, 16: 1.04, 32: 1.2}, tolerance=0.0) == 8
    assert fastest({1: 3.0, 4: 1.03, 8: 1.0, 16: 1.04, 32: 1.2}, largest=False) == 4  # on a CPU


def test_profile_splits_forward_and_backward_op_time():
    model = tiny_model()
    x = torch.randn(4, 3, 8, 8)
    model(x)  # materialise the lazy layer
    p = profile_call(lambda: forward_step(model, x), torch.device("cpu"))
    assert p.kind == "cpu_ops" and p.total_ms > 0 and p.backward_ms == 0
    assert {r["pass"] for r in p.table} == {"forward"} and p.total_ms <= p.wall_ms
    p = profile_call(lambda: forward_backward_step(model, x), torch.device("cpu"))
    assert p.forward_ms > 0 and p.backward_ms > 0
    assert abs(p.forward_ms + p.backward_ms - p.total_ms) < 1e-9 and p.total_ms <= p.wall_ms
    names = {(r["name"], r["pass"]) for r in p.table}
    assert ("aten::convolution_backward", "backward") in names
    assert any(n.startswith("aten::") and "conv" in n and q == "forward" for n, q in names)
    assert p.table == sorted(p.table, key=lambda r: -r["ms"])
