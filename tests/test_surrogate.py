"""LIME and KernelSHAP against Captum's `Lime` and `KernelShap` on the same regions and samples, on a linear
model whose Shapley values are known, and their regression against scikit-learn's. The contract,
determinism and chunk tests of every method (tests/test_methods.py) pick them up from conf/method.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import KernelShap, Lime
from captum.attr._core.lime import get_exp_kernel_similarity_function
from sklearn.linear_model import LinearRegression, Ridge

import methods
from methods import surrogate
from methods.common import extras_of
from tests.conftest import Linear


@pytest.fixture
def blocks() -> torch.Tensor:
    """Five images of 4 x 4 cells of one colour each, a little noise on top: SLIC finds 13 to 15
    superpixels in each (on the plain noise of `images` it finds one)."""
    g = torch.Generator().manual_seed(2)
    cells = torch.rand(5, 3, 4, 4, generator=g) * 4 - 2
    return cells.repeat_interleave(8, 2).repeat_interleave(8, 3) + 0.05 * torch.randn(
        5, 3, 32, 32, generator=g
    )


def recording(monkeypatch, name: str) -> list[torch.Tensor]:
    """Every image's samples `[S, F]` that `surrogate.<name>` draws, in order."""
    draws: list[torch.Tensor] = []
    draw = getattr(surrogate, name)

    def record(samples, features):
        draws.append(draw(samples, features))
        return draws[-1]

    monkeypatch.setattr(surrogate, name, record)
    return draws


def feeding(rows: torch.Tensor):
    """A Captum perturbation generator that yields `rows` `[S, F]`, one `[1, F]` sample at a time."""

    def generate(_inputs, **_kwargs):
        for row in rows:
            yield row[None].long()

    return generate


@pytest.mark.parametrize("segments", ["grid", "slic"])
def test_lime_equals_captums_on_the_same_regions_and_samples(small_cnn, blocks, monkeypatch, segments):
    images = blocks
    model, t, samples = small_cnn.module, torch.tensor([0, 1, 2, 3, 4]), 40
    draws = recording(monkeypatch, "lime_samples")
    settings = {"segments": segments, "n_segments": 12, "grid": 4, "kernel_width": 0.7, "ridge": 1.0}
    ours = methods.lime(model, images, t, n_samples=samples, chunk_size=16, **settings)
    masks = surrogate.regions(images, segments, 12, 10.0, 4)
    assert len(draws) == len(images) and all(int(m.max()) >= 12 for m in masks)
    for i in range(len(images)):
        lime = Lime(
            model,
            interpretable_model=SkLearnRidge(alpha=1.0),
            similarity_func=get_exp_kernel_similarity_function("cosine", 0.7),
            perturb_func=feeding(draws[i]),
        )
        ref = lime.attribute(
            images[i : i + 1], target=int(t[i]), feature_mask=masks[i][None, None], n_samples=samples,
            perturbations_per_eval=16, baselines=0.0,
        )  # fmt: skip
        for c in range(3):
            torch.testing.assert_close(ours[i, 0], ref[0, c], rtol=0, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("segments", ["grid", "slic"])
def test_kernel_shap_equals_captums_on_the_same_regions_and_samples(small_cnn, blocks, monkeypatch, segments):
    images = blocks
    model, t, samples = small_cnn.module, torch.tensor([4, 3, 2, 1, 0]), 60
    draws = recording(monkeypatch, "kernel_shap_samples")
    ours = methods.kernel_shap(
        model, images, t, n_samples=samples, segments=segments, n_segments=12, grid=4, chunk_size=7
    )
    masks = surrogate.regions(images, segments, 12, 10.0, 4)
    for i in range(len(images)):
        assert torch.equal(draws[i][0], torch.ones(draws[i].shape[1])) and not draws[i][1].any()
        shap = KernelShap(model)
        shap.perturb_func = feeding(draws[i])
        ref = shap.attribute(
            images[i : i + 1], target=int(t[i]), feature_mask=masks[i][None, None], n_samples=samples,
            perturbations_per_eval=16, baselines=0.0,
        )  # fmt: skip
        torch.testing.assert_close(ours[i, 0], ref[0, 0], rtol=0, atol=1e-4 * float(ref.abs().max()))


def test_kernel_shap_of_a_linear_model_is_each_regions_share_and_sums_to_the_logit_difference():
    """f(x with regions z kept) is linear in z: the fit is exact, each region's value is w . x over the
    region, and they sum to f(x) - f(0)."""
    model = Linear((3, 8, 8), classes=4)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 3])
    torch.manual_seed(0)
    maps = methods.kernel_shap(model, x, t, n_samples=30, segments="grid", grid=4, chunk_size=8)
    cells = surrogate.regions(x, "grid", 0, 1.0, 4)
    with torch.no_grad():
        gap = model(x) - model(torch.zeros_like(x))
    for i in range(2):
        contribution = (model.weight[t[i]] * x[i]).sum(dim=0).detach()  # [H, W]
        for r in range(16):
            inside = cells[i] == r
            value = maps[i, 0][inside]
            assert torch.allclose(value, value[0].expand_as(value))
            torch.testing.assert_close(value[0], contribution[inside].sum(), rtol=1e-4, atol=1e-4)
        per_region = torch.stack([maps[i, 0][cells[i] == r][0] for r in range(16)])
        torch.testing.assert_close(per_region.sum(), gap[i, t[i]], rtol=1e-4, atol=1e-4)
    # The region map and the fit go with the maps: the cells, and an exact fit.
    extras = extras_of(maps)
    assert torch.equal(extras["regions"], cells.to(torch.int32))
    torch.testing.assert_close(extras["fit_r2"], torch.ones(2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("ridge", [0.0, 1.0, 3.5])
def test_the_weighted_fit_is_scikit_learns(ridge):
    g = np.random.default_rng(0)
    z = (g.random((40, 9)) < 0.5).astype(np.float64)
    z[:, 4] = 1.0  # a region every sample keeps: least squares leaves it open (least norm: 0)
    y, w = g.normal(size=40), g.random(40) + 0.1
    ours = surrogate.linear_fit(torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(w), ridge).numpy()
    ref = (Ridge(alpha=ridge) if ridge else LinearRegression()).fit(z, y, sample_weight=w).coef_
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("ridge", [0.0, 1.0])
def test_the_fit_is_scikit_learns_weighted_r2(ridge):
    g = np.random.default_rng(1)
    z = (g.random((50, 7)) < 0.5).astype(np.float64)
    y, w = z @ g.normal(size=7) + 0.3 * g.normal(size=50), g.random(50) + 0.1
    zt, yt, wt = (torch.from_numpy(a) for a in (z, y, w))
    ours = surrogate.fit_r2(zt, yt, wt, surrogate.linear_fit(zt, yt, wt, ridge))
    fit = (Ridge(alpha=ridge) if ridge else LinearRegression()).fit(z, y, sample_weight=w)
    assert 0 < ours < 1
    assert ours == pytest.approx(fit.score(z, y, sample_weight=w), abs=1e-9)


def test_lime_gives_each_image_its_region_map_and_fit(blocks):
    model = Linear((3, 32, 32), classes=3)
    torch.manual_seed(0)
    maps = methods.lime(
        model, blocks, torch.tensor([0, 1, 2, 0, 1]), n_samples=40, segments="slic", n_segments=12
    )
    extras = extras_of(maps)
    assert torch.equal(extras["regions"], surrogate.regions(blocks, "slic", 12, 10.0, 8).to(torch.int32))
    assert extras["fit_r2"].shape == (5,) and bool(((extras["fit_r2"] > 0) & (extras["fit_r2"] <= 1)).all())
    for i in range(5):  # the map is constant on each region
        for r in extras["regions"][i].unique():
            values = maps[i, 0][extras["regions"][i] == r]
            assert torch.equal(values, values[:1].expand_as(values))


def test_regions_are_numbered_from_zero_on_the_inputs_device(blocks):
    images = blocks
    grid = surrogate.regions(images, "grid", 0, 1.0, 4)
    assert grid.shape == (5, 32, 32) and grid.dtype == torch.int64
    assert grid[0, 0, 0] == 0 and grid[0, 0, 31] == 3 and grid[0, 31, 0] == 12 and grid[0, 31, 31] == 15
    for segments in ("slic", "quickshift"):
        labels = surrogate.regions(images, segments, 12, 10.0, 4)
        assert labels.shape == (5, 32, 32) and labels.device == images.device
        for image in labels:
            assert torch.equal(image.unique(), torch.arange(int(image.max()) + 1))


def test_a_lime_job_records_the_region_maps_and_fits_with_the_attributions(tmp_path):
    from hydra import compose, initialize_config_dir

    from harness.job import run_job
    from tests.conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            ["model=small_cnn", "device=cpu", "data.num_images=2", "metric=[deletion]", "method=lime",
             "method.n_samples=20", "method.segments=grid", "method.grid=4", "timing.max_repeats=1"],
        )  # fmt: skip
    row = run_job(cfg, tmp_path)
    saved = np.load(tmp_path / "attributions.npz")
    regions, fits = saved["method_regions"], saved["method_fit_r2"]
    assert regions.shape == (2, *saved["maps"].shape[2:]) and regions.max() == 15
    assert fits.shape == (2,) and row["method_fit_r2"] == pytest.approx(float(fits.mean()))
