"""Guided IG and Blur IG against PAIR's `saliency` 0.2.1 (its framework-free core) on the same model,
inputs and targets, one image at a time as it runs; the blur against scipy's. The contract,
determinism and chunk tests of every method (tests/test_methods.py) pick them up from conf/method.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from saliency.core import BlurIG, GuidedIG
from saliency.core.base import INPUT_OUTPUT_GRADIENTS
from scipy import ndimage

import methods
from methods import path_ig
from methods.path_ig import blur_matrices, blurred, kth_smallest


def pair_model(model: torch.nn.Module, target: int, channels_last: bool = True):
    """PAIR's `call_model_function`: `[N, H, W, C]` arrays in (`[N, C, H, W]` without `channels_last`),
    the target logit's gradients out in the same layout."""

    def call(batch, call_model_args=None, expected_keys=None):
        x = torch.from_numpy(np.asarray(batch, dtype=np.float32))
        x = (x.permute(0, 3, 1, 2) if channels_last else x).requires_grad_(True)
        (g,) = torch.autograd.grad(model(x)[:, target].sum(), x)
        return {INPUT_OUTPUT_GRADIENTS: (g.permute(0, 2, 3, 1) if channels_last else g).numpy()}

    return call


@pytest.fixture
def pair_on_numpy_2(monkeypatch):
    """saliency 0.2.1 calls `np.quantile(..., interpolation=)`, a keyword NumPy 2 renamed `method`."""
    import saliency.core.guided_ig as module

    def quantile(a, q, interpolation="linear", **kw):
        return np.quantile(a, q, method=interpolation, **kw)

    shim = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    shim.quantile = quantile
    monkeypatch.setattr(module, "np", shim)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(("fraction", "max_dist"), [(0.25, 0.02), (0.1, 0.2)])
def test_guided_ig_equals_pairs(
    small_cnn, images, fraction, max_dist, compiled, pair_on_numpy_2, monkeypatch
):
    """PAIR's Guided IG takes any array; it is given `[C, H, W]`. (Given image 0 as the `[H, W, C]`
    view `x.permute(1, 2, 0).numpy()`, its map at (0.1, 0.2) differed from its own `[C, H, W]` map by 8%
    of the largest value, and the `[C, H, W]` one matches ours to 1e-10: its path is sensitive to the
    order of its sums. Not traced further.)
    """
    monkeypatch.setattr(path_ig, "COMPILED_ON_CPU", compiled)  # the CPU's kernel, or torch's ops as on a GPU
    model, t = small_cnn.module, torch.tensor([0, 1, 2, 3, 4])
    x = images[:3]
    ours = methods.guided_ig(model, x, t[:3], steps=16, fraction=fraction, max_dist=max_dist, chunk_size=2)
    for i in range(3):
        ref = GuidedIG().GetMask(
            x[i].numpy(), pair_model(model, int(t[i]), channels_last=False), x_steps=16, fraction=fraction,
            max_dist=max_dist,
        )  # fmt: skip
        ref = torch.from_numpy(ref).float()
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("sqrt", [False, True])
def test_blur_ig_equals_pairs(small_cnn, images, sqrt):
    model, t = small_cnn.module, torch.tensor([4, 3, 2])
    x = images[:3]
    ours = methods.blur_ig(model, x, t, max_sigma=6.0, steps=10, grad_step=0.05, sqrt=sqrt, chunk_size=4)
    for i in range(3):
        ref = BlurIG().GetMask(
            x[i].permute(1, 2, 0).numpy(), pair_model(model, int(t[i])), max_sigma=6.0, steps=10,
            grad_step=0.05, sqrt=sqrt, batch_size=1,
        )  # fmt: skip
        ref = torch.from_numpy(ref).permute(2, 0, 1).float()
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("sigma", [0.0, 0.3, 1.7, 9.0])
def test_the_blur_is_scipys_gaussian_filter_with_zeros_outside(sigma):
    x = torch.randn(3, 20, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = blurred(x, blur_matrices(20, 13, [sigma], x))[0]
    ref = ndimage.gaussian_filter(x.numpy(), sigma=[0, sigma, sigma], mode="constant")
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12)


def test_guided_ig_with_no_deviation_allowed_sums_to_the_logit_difference_on_a_linear_model():
    """With max_dist 0 the path is the straight line: on a linear model the map is (x - 0) * w, exactly."""
    from tests.conftest import Linear

    model = Linear((3, 6, 6), classes=2)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, 0])
    maps = methods.guided_ig(model, x, t, steps=8, max_dist=0.0)
    torch.testing.assert_close(maps, x * model.weight[t].detach(), rtol=1e-5, atol=1e-6)


def test_the_radix_select_is_kthvalue():
    """Zeros, ties, +inf, values over many orders of magnitude, and every k of a short row."""
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(4, 3000, generator=g) * 10.0 ** torch.randint(-8, 8, (4, 3000), generator=g)).abs()
    rows[0, :500] = 0.0
    rows[1, ::3] = 0.125
    rows[2, :1000] = float("inf")
    for k in (1, 2, 750, 1500, 2999, 3000):
        torch.testing.assert_close(kth_smallest(rows, k), rows.kthvalue(k, dim=1).values, rtol=0, atol=0)
    short = torch.tensor([[3.0, 1.0, 2.0, float("inf")]])
    assert [float(kth_smallest(short, k)[0]) for k in range(1, 5)] == [1.0, 2.0, 3.0, float("inf")]
