"""Complexity (sparseness, complexity) and robustness (max-sensitivity, infidelity) metrics: known answers,
naive loops of the definitions, invariance to batch and chunk size, and parameter checks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Linear

import methods
from metrics.complexity import complexity, sparseness
from metrics.contract import traits_of
from metrics.robustness import infidelity, max_sensitivity

SEED = 7


@pytest.fixture
def cnn(small_cnn):
    """The small CNN in float64, so that batch composition changes its outputs by ~1e-16 only."""
    return small_cnn.module.double()


@pytest.fixture
def images64(images):
    return images[:4].double()


def targets(model, x):
    with torch.no_grad():
        return model(x).argmax(dim=1)


def saliency_of(model):
    return lambda x, t: methods.saliency(model, x, t, chunk_size=4)


def call(fn, model, x, a, t, **params):
    """One metric call as the job makes it: the global generator seeded first."""
    torch.manual_seed(SEED)
    return fn(model, x, a, t, **params).values[""]


# --- sparseness and complexity ---------------------------------------------------------------------


def naive_gini(m: torch.Tensor) -> float:
    v = sorted(abs(float(s)) for s in m.double().sum(0).flatten())
    n, total = len(v), sum(v)
    return sum((2 * k - n - 1) * vk for k, vk in enumerate(v, 1)) / (n * total) if total else 0.0


def naive_entropy(m: torch.Tensor) -> float:
    v = [abs(float(s)) for s in m.double().sum(0).flatten()]
    total = sum(v)
    if not total:
        return math.log(len(v))
    return -sum(p * math.log(p) for p in (vi / total for vi in v) if p > 0)


def known_maps(h=8, w=8):
    """One-hot, constant, all-zero, and one-hot after the channel sum (channels 0 and 1 cancel)."""
    a = torch.zeros(4, 3, h, w)
    a[0, 1, 2, 5] = 3.0
    a[1] = 0.25
    a[3, 0], a[3, 1] = 1.0, -1.0
    a[3, 2, 0, 0] = 5.0
    return a


def test_sparseness_known_values():
    a = known_maps()
    n = 64
    got = call(sparseness, None, torch.zeros(4, 3, 8, 8), a, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(got, torch.tensor([(n - 1) / n, 0.0, 0.0, (n - 1) / n]))


def test_complexity_known_values():
    a = known_maps()
    n = 64
    got = call(complexity, None, torch.zeros(4, 3, 8, 8), a, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(got, torch.tensor([0.0, math.log(n), math.log(n), 0.0]))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("fn", "naive"), [(sparseness, naive_gini), (complexity, naive_entropy)])
def test_complexity_metrics_equal_naive_loop(fn, naive, channels):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, channels, 12, 16, generator=g) ** 3  # heavy tails: far from constant
    a[2] = a[2].abs() * (torch.rand(1, 12, 16, generator=g) < 0.1)  # mostly zeros
    x = torch.zeros(5, 3, 12, 16)
    got = call(fn, None, x, a, torch.zeros(5, dtype=torch.long))
    want = torch.tensor([naive(m) for m in a], dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- max-sensitivity --------------------------------------------------------------------------------


def test_max_sensitivity_of_linear_saliency_is_zero():
    model = Linear((3, 8, 8))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 2, 1])
    explain = saliency_of(model)
    got = call(max_sensitivity, model, x, explain(x, t), t, explain=explain, radius=0.5, n_samples=4)
    assert torch.equal(got, torch.zeros(3))


@pytest.mark.parametrize("norm", ["fro", "inf"])
def test_max_sensitivity_equals_naive_loop(cnn, images64, norm):
    x, n, radius = images64[:3], 5, 0.3
    t = targets(cnn, x)
    explain = saliency_of(cnn)
    got = call(
        max_sensitivity, cnn, x, explain(x, t), t, explain=explain, radius=radius, n_samples=n, norm=norm
    )

    torch.manual_seed(SEED)
    noise = ((torch.rand((n, *x.shape[1:])) * 2 - 1) * radius).double()
    p = 2 if norm == "fro" else math.inf
    want = []
    for i in range(len(x)):
        e0 = explain(x[i : i + 1], t[i : i + 1]).flatten()
        ratios = [
            torch.linalg.vector_norm(explain(x[i : i + 1] + noise[k], t[i : i + 1]).flatten() - e0, ord=p)
            / torch.linalg.vector_norm(e0, ord=p)
            for k in range(n)
        ]
        want.append(max(ratios))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-9, atol=1e-12)
    assert (got > 0).all()


# --- infidelity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_of_linear_gradient_is_zero(normalize):
    """f(x) - f(x - I) = I . W[target] exactly for f = W x + b, so infidelity is 0 (and beta is 1)."""
    model = Linear((3, 8, 8)).double()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    phi = model.weight.detach()[t]
    got = call(infidelity, model, x, phi, t, std=0.5, n_samples=6, normalize=normalize)
    # (f(x) - f(x - I))^2 is about 50 here; Captum's normalised form C - B^2 / A cancels to ~1e-14.
    torch.testing.assert_close(got, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_infidelity_expands_one_channel_maps():
    """A model with one weight per pixel (the same on every channel): its one-channel gradient map,
    expanded to the channels, is exact; divided by C it would not be."""
    model = Linear((3, 8, 8)).double()
    with torch.no_grad():
        model.weight.copy_(model.weight[:, :1].expand_as(model.weight))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    phi = model.weight.detach()[t][:, :1]
    got = call(infidelity, model, x, phi, t, std=0.5, n_samples=6, normalize=False)
    torch.testing.assert_close(got, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-20)
    assert (call(infidelity, model, x, phi / 3, t, std=0.5, n_samples=6, normalize=False) > 1e-3).all()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_equals_naive_loop(cnn, images64, normalize, channels):
    x, n, std = images64[:3], 6, 0.5
    t = targets(cnn, x)
    phi = methods.input_x_gradient(cnn, x, t)
    phi = phi.sum(dim=1, keepdim=True) if channels == 1 else phi
    got = call(infidelity, cnn, x, phi, t, std=std, n_samples=n, normalize=normalize)

    torch.manual_seed(SEED)
    noise = (torch.randn((n, *x.shape[1:])) * std).double()
    want = []
    with torch.no_grad():
        for i in range(len(x)):
            f_x = cnn(x[i : i + 1])[0, t[i]]
            a = torch.stack([(noise[k] * phi[i].expand_as(noise[k])).sum() for k in range(n)])
            b = torch.stack([f_x - cnn(x[i : i + 1] - noise[k])[0, t[i]] for k in range(n)])
            beta = (a * b).mean() / (a * a).mean() if normalize else 1.0
            want.append(((beta * a - b) ** 2).mean())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-9, atol=1e-15)
    assert (got > 0).all()


# --- all four: invariance, traits, parameter checks ------------------------------------------------


def params_for(fn, model):
    if fn is max_sensitivity:
        return {"explain": saliency_of(model), "radius": 0.3, "n_samples": 5}
    if fn is infidelity:
        return {"std": 0.5, "n_samples": 5}
    return {}


@pytest.mark.parametrize("fn", [sparseness, complexity, max_sensitivity, infidelity])
def test_invariant_to_batch_and_chunk_size(cnn, images64, fn):
    x = images64
    t = targets(cnn, x)
    a = methods.saliency(cnn, x, t)
    params = params_for(fn, cnn)
    whole = call(fn, cnn, x, a, t, chunk_size=16, **params)
    pairs = torch.cat([call(fn, cnn, x[i : i + 2], a[i : i + 2], t[i : i + 2], **params) for i in (0, 2)])
    torch.testing.assert_close(pairs, whole, rtol=1e-6, atol=0)
    for chunk_size in (1, 3, 7):
        got = call(fn, cnn, x, a, t, chunk_size=chunk_size, **params)
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=0)
    assert whole.shape == (4,) and torch.isfinite(whole).all()


def test_traits():
    assert traits_of(sparseness).better == {"": "higher"}
    assert traits_of(complexity).better == {"": "lower"}
    assert traits_of(max_sensitivity).better == {"": "lower"}
    assert traits_of(infidelity).better == {"": "lower"}
    assert traits_of(max_sensitivity).needs == {"explain"}
    assert not traits_of(infidelity).needs and not traits_of(sparseness).needs


BAD = [
    (max_sensitivity, {"n_samples": 0}, "n_samples=0"),
    (max_sensitivity, {"n_samples": 2.5}, "n_samples=2.5"),
    (max_sensitivity, {"radius": -1}, "radius=-1"),
    (max_sensitivity, {"radius": math.nan}, "radius=nan"),
    (max_sensitivity, {"norm": "l7"}, "norm='l7'"),
    (max_sensitivity, {"norm": 0.5}, "norm=0.5"),
    (max_sensitivity, {"norm": "nuc"}, "norm='nuc'"),
    (max_sensitivity, {"chunk_size": 0}, "chunk_size=0"),
    (infidelity, {"std": 0}, "std=0"),
    (infidelity, {"std": math.inf}, "std=inf"),
    (infidelity, {"n_samples": 0}, "n_samples=0"),
    (infidelity, {"normalize": "yes"}, "normalize='yes'"),
    (infidelity, {"chunk_size": 0}, "chunk_size=0"),
    (sparseness, {"chunk_size": 0}, "chunk_size=0"),
    (complexity, {"chunk_size": True}, "chunk_size=True"),
]


@pytest.mark.parametrize(("fn", "bad", "named"), BAD, ids=[f"{fn.__name__}-{named}" for fn, _, named in BAD])
def test_bad_parameters_raise_naming_the_value(fn, bad, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")) as err:
        traits_of(fn).check(**bad)
    assert "expected" in str(err.value)

    def explain(x, t):
        raise AssertionError("no work before the check")

    x = torch.zeros(2, 3, 8, 8)
    extra = {"explain": explain} if fn is max_sensitivity else {}
    with pytest.raises(ValueError, match=named):
        fn(None, x, torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), **extra, **bad)


def test_good_parameters_pass():
    traits_of(max_sensitivity).check(radius=0.1, n_samples=1, norm=2, chunk_size=1)
    traits_of(max_sensitivity).check(norm=math.inf)
    traits_of(max_sensitivity).check(norm="inf")
    traits_of(infidelity).check(std=1, n_samples=3, normalize=False, chunk_size=100)
