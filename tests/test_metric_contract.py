"""Every metric config, whatever its family, keeps the contract the job relies on: it returns the value
keys it declares, one finite value per image, the same answer twice, and the same answer whether the
images come together or in two batches, in chunks of one or of three.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hydra.utils import instantiate

import methods
from harness.data.generated import generate
from metrics import Result, traits_of
from tests.test_configs import cfg_with, options

MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def shapes():
    """Four generated 32x32 images, normalised as the small CNN expects, with their ground truth."""
    pixels, _, truth = generate(4, size=32, seed=3)
    return (pixels - 0.5) / 0.5, truth


def score(fn: Any, model: torch.nn.Module, x: torch.Tensor, truth: Any, chunk_size: int) -> Result:
    """The metric on saliency maps of the model's top-1 class, given what it declares it needs."""

    def explain(m: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return methods.saliency(m, inputs, target, chunk_size=4)

    with torch.no_grad():
        target = model(x).argmax(dim=1)
    maps = explain(model, x, target)
    given = {
        "explain": lambda inputs, t: explain(model, inputs, t),
        "explain_with": explain,
        "trained": model,
        "ground_truth": truth,
    }
    needs = traits_of(fn).needs
    extra = {k: v for k, v in given.items() if k in needs}
    if "normalization" in needs:
        extra |= {"mean": MEAN, "std": STD}
    torch.manual_seed(0)  # as the job seeds every call
    return fn(model, x, maps, target, chunk_size=chunk_size, **extra)


@pytest.mark.parametrize("name", options("metric"))
def test_every_metric_keeps_the_contract(name, small_cnn, shapes):
    fn = instantiate(cfg_with(f"metric=[{name}]").metric[name])
    x, truth = shapes
    model = small_cnn.module
    result = score(fn, model, x, truth, chunk_size=3)
    assert isinstance(result, Result) and result.values, name
    assert set(result.values) <= set(traits_of(fn).better), name
    for key, v in result.values.items():
        assert v.shape == (len(x),) and bool(torch.isfinite(v).all()), (name, key)
    again = score(fn, model, x, truth, chunk_size=3)
    halves = [score(fn, model, x[rows], truth[rows], chunk_size=3) for rows in (slice(0, 2), slice(2, 4))]
    one = score(fn, model, x, truth, chunk_size=1)
    for key, v in result.values.items():
        torch.testing.assert_close(again.values[key], v, msg=f"{name}: {key} differs from call to call")
        joined = torch.cat([h.values[key] for h in halves])
        torch.testing.assert_close(joined, v, rtol=1e-4, atol=1e-5, msg=f"{name}: {key} depends on the batch")
        torch.testing.assert_close(
            one.values[key], v, rtol=1e-4, atol=1e-5, msg=f"{name}: {key} depends on the chunk"
        )
