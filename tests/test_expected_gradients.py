"""Expected Gradients against Captum's GradientShap given the same draws, on a linear model whose answer
is known, and the reference images held out of each data source. The contract, determinism and chunk
tests of every method (tests/test_methods.py) pick it up from conf/method.
"""

from __future__ import annotations

import importlib
import types

import captum._utils.common
import captum.attr._core.gradient_shap
import numpy as np
import pytest
import torch
from captum.attr import GradientShap
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import methods
from harness.config import HarnessError
from harness.data import held_out, photo_sources, reference_photo_sources
from tests.conftest import Linear

# The module (the package exports its function under the same name).
eg_module = importlib.import_module("methods.expected_gradients")


def recording(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (reference indices, path points) draw the method makes, one per image, in order."""
    draws: list[tuple[torch.Tensor, torch.Tensor]] = []
    draw = eg_module.draw

    def record(samples, references, device):
        draws.append(draw(samples, references, device))
        return draws[-1]

    monkeypatch.setattr(eg_module, "draw", record)
    return draws


def captum_given(monkeypatch, index: torch.Tensor, alpha: torch.Tensor) -> None:
    """Captum's two NumPy draws (the baselines' indices, then the points on the path: image-major, as
    it repeats the inputs) replaced by `index` and `alpha`."""

    class Random:
        @staticmethod
        def choice(n, size):
            assert size == len(index) and n > int(index.max())
            return index.numpy()

        @staticmethod
        def uniform(low, high, size):
            assert size == len(alpha)
            return alpha.double().numpy()

    shim = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    shim.random = Random()
    monkeypatch.setattr(captum._utils.common, "np", shim)
    monkeypatch.setattr(captum.attr._core.gradient_shap, "np", shim)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_equals_captums_gradient_shap_given_the_same_draws(small_cnn, images, monkeypatch, chunk):
    model, t, samples = small_cnn.module, torch.tensor([0, 1, 2, 3, 4]), 6
    refs = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    draws = recording(monkeypatch)
    torch.manual_seed(0)
    ours = methods.expected_gradients(
        model, images, t, references=refs, n_samples=samples, n_references=9, chunk_size=chunk
    )
    assert len(draws) == len(images)
    index, alpha = torch.cat([i for i, _ in draws]), torch.cat([a for _, a in draws])
    captum_given(monkeypatch, index, alpha)
    ref = GradientShap(model).attribute(images, refs, target=t, n_samples=samples, stdevs=0.0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_on_a_linear_model_each_map_sums_to_the_logit_less_the_mean_logit_of_its_references(monkeypatch):
    """(x - x') . w is f(x) - f(x') for every draw: the map sums to f(x) less the mean of f over the
    references drawn for it; only the first `n_references` are ever drawn."""
    model = Linear((3, 8, 8), classes=4)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    refs = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([2, 0, 3])
    draws = recording(monkeypatch)
    maps = methods.expected_gradients(model, x, t, references=refs, n_samples=5, n_references=4, chunk_size=4)
    with torch.no_grad():
        logits, ref_logits = model(x), model(refs)
    for image, (index, _) in enumerate(draws):
        assert int(index.max()) < 4
        expected = logits[image, t[image]] - ref_logits[index, t[image]].mean()
        torch.testing.assert_close(maps[image].sum(), expected, rtol=1e-5, atol=1e-5)


def test_the_photos_hold_out_other_sample_photos():
    node = OmegaConf.create({"_target_": "harness.data.photos", "num_images": None})
    refs = held_out(node, 14, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), [])
    assert refs.images.shape == (14, 3, 32, 32) and torch.isfinite(refs.images).all()
    assert not set(refs.ids) & {name for name, _, _ in photo_sources()}
    assert len(set(refs.ids)) == 14 == len(reference_photo_sources())
    with pytest.raises(HarnessError, match="method.n_references=15 but the photos hold out 14"):
        held_out(node, 15, 32, (0.5,) * 3, (0.25,) * 3, [])


def test_the_shapes_hold_out_another_split():
    node = OmegaConf.create({"_target_": "harness.data.shapes", "num_images": 4, "seed": 0, "split": "test"})
    explained = instantiate(node, size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    refs = held_out(node, 6, 32, (0.5,) * 3, (0.25,) * 3, [])
    assert refs.images.shape == (6, 3, 32, 32) and all(i.startswith("val0_") for i in refs.ids)
    assert not any(torch.equal(r, e) for r in refs.images for e in explained.images)
    val = OmegaConf.merge(node, {"split": "val"})
    assert all(i.startswith("train0_") for i in held_out(val, 2, 32, (0.5,) * 3, (0.25,) * 3, []).ids)


def test_an_image_folder_holds_out_the_images_after_the_explained_ones(tmp_path):
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (99, 99, 99)]):
        (tmp_path / "0").mkdir(exist_ok=True)
        Image.new("RGB", (12, 12), colour).save(tmp_path / "0" / f"{k}.png")
    node = OmegaConf.create({"_target_": "harness.data.image_folder", "root": str(tmp_path), "num_images": 2})
    refs = held_out(node, 3, 16, (0.0,) * 3, (1.0,) * 3, ["a"])
    assert refs.ids == ["0/2.png", "0/3.png", "0/4.png"]
    torch.testing.assert_close(refs.images[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(HarnessError, match="after the first data.num_images=2: 4 images after the first 2"):
        held_out(node, 4, 16, (0.0,) * 3, (1.0,) * 3, ["a"])
    with pytest.raises(HarnessError, match="data.num_images=null explains every image"):
        held_out(OmegaConf.merge(node, {"num_images": None}), 1, 16, (0.0,) * 3, (1.0,) * 3, ["a"])
