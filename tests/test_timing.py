"""Timing: forward counting, repeats, bounds; the bootstrap interval."""

from __future__ import annotations

import numpy as np
import torch

from harness.results import bootstrap_ci
from harness.timing import (
    ModelSpeed,
    Timing,
    count_forwards,
    fastest,
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


def test_count_forwards_sees_captum_deeplift_inputs_and_baselines(small_cnn, images):
    import methods

    with count_forwards(small_cnn.module) as c:
        methods.deeplift(small_cnn.module, images, torch.zeros(5, dtype=torch.long))
    assert (c.forwards, c.backwards) == (0, 10)  # 5 images + 5 baselines


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


def test_model_speed_picks_tried_batch_sizes():
    model = tiny_model()
    speed = ModelSpeed(model, torch.randn(3, 3, 8, 8), torch.device("cpu"), min_images=4)
    bs, grad_bs = speed.choose((1, 2, 4), (1, 2))
    assert bs in (1, 2, 4) and set(speed.per_batch_ms) == {1, 2, 4}
    assert grad_bs in (1, 2) and set(speed.per_batch_backward_ms) == {1, 2}
    assert speed.forward_ms == speed.per_batch_ms[bs] <= 1.05 * min(speed.per_batch_ms.values())
    assert speed.forward_backward_ms == speed.per_batch_backward_ms[grad_bs] > 0
    f, b = speed.now(forward=True, backward=False)
    assert f > 0 and b != b  # nan: not asked for
    assert speed.forward_ms <= f


def test_each_timed_call_gets_a_bound_measured_beside_it():
    model = tiny_model()
    x = torch.randn(6, 3, 8, 8)
    speed = ModelSpeed(model, x, torch.device("cpu"), min_images=4)
    speed.choose((2,), (2,))

    def call():
        with torch.no_grad():
            model(x)
        return model(x[:2]).sum()  # 6 images without autograd, 2 with

    _, t = measure(call, torch.device("cpu"), model=model, speed=speed, min_repeats=2, max_repeats=2)
    assert (t.forwards, t.backwards) == (6, 2) and len(t.bounds_ms) == 2
    assert all(b > 0 for b in t.bounds_ms) and t.bound_ratio is not None


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
