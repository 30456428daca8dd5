"""Timing: forward counting, repeats, bounds; the bootstrap interval."""

from __future__ import annotations

import numpy as np
import torch

from harness.results import bootstrap_ci
from harness.timing import ForwardCost, Timing, count_forwards, forward_cost, measure


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


def test_bound_counts_forwards_and_backwards():
    cost = ForwardCost(batch_size=4, forward_ms=2.0, forward_backward_ms=5.0, per_batch_ms={4: 2.0})
    assert cost.bound_ms(Timing([1.0], forwards=10, backwards=3)) == 35.0


def test_forward_cost_picks_a_tried_batch_size():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    cost = forward_cost(model, torch.randn(3, 3, 2, 2), torch.device("cpu"), batch_sizes=(1, 2, 4))
    assert cost.batch_size in (1, 2, 4) and set(cost.per_batch_ms) == {1, 2, 4}
    assert cost.forward_ms == min(cost.per_batch_ms.values()) and cost.forward_backward_ms > 0


def test_bootstrap_matches_naive_resampling():
    v = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.4, 0.3])
    lo, hi = bootstrap_ci(v, resamples=4000, seed=1)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(6, (4000, 6), generator=g).numpy()
    means = v.double().numpy()[idx].mean(axis=1)
    assert np.isclose(lo, np.quantile(means, 0.025)) and np.isclose(hi, np.quantile(means, 0.975))
    assert np.allclose(bootstrap_ci(torch.full((5,), 0.3)), (0.3, 0.3))
