"""Sanity checks (model-parameter randomisation, random logit): known answers, references from SciPy and
scikit-image, which blocks are re-initialised, invariance to batch size, bad settings."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Linear
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

import methods
from metrics.contract import traits_of
from metrics.sanity import model_randomisation, random_logit, similarity, spearman, ssim

SMALL_BLOCKS = ["features.0", "features.3", "classifier"]


def saliency_with(model, x, t):
    return methods.saliency(model, x, t, chunk_size=8)


def input_only(model, x, t):
    """A 'method' that ignores the model: the image's own energy."""
    return x.square().sum(1, keepdim=True)


def test_spearman_equals_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 60), generator=g).float()  # many ties
    b = a + torch.randint(0, 3, (4, 60), generator=g).float()
    for i in range(4):
        assert spearman(a, b)[i].item() == pytest.approx(spearmanr(a[i], b[i]).statistic, abs=1e-6)
    assert spearman(a, torch.ones_like(a)).tolist() == [0.0] * 4  # a constant map ranks nothing


def test_ssim_equals_scikit_image():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 40, 33, generator=g)
    b = (a + 0.3 * torch.rand(3, 40, 33, generator=g)).clamp(0, 1)
    for i in range(3):
        ref = structural_similarity(
            a[i].double().numpy(), b[i].double().numpy(),
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        )  # fmt: skip
        assert ssim(a, b)[i].item() == pytest.approx(ref, abs=1e-6)


def test_a_map_is_similar_to_itself():
    maps = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    for key, v in similarity(maps, maps).items():
        torch.testing.assert_close(v, torch.ones(4), msg=key)


@pytest.mark.parametrize("order", ["cascading", "independent"])
def test_a_map_that_ignores_the_model_keeps_similarity_one(small_cnn, images, order):
    x, model = images, small_cnn.module
    t = torch.zeros(len(x), dtype=torch.long)
    r = model_randomisation(
        model, x, input_only(model, x, t), t, explain_with=input_only, trained=model, blocks=SMALL_BLOCKS,
        order=order,
    )  # fmt: skip
    for key, curve in r.curves.items():
        torch.testing.assert_close(curve.scores, torch.ones(len(x), len(SMALL_BLOCKS) + 1), msg=key)
        torch.testing.assert_close(r.values[key], torch.ones(len(x)))


def test_orders_reinitialise_exactly_the_blocks_they_name_and_never_the_trained_model(small_cnn, images):
    model = small_cnn.module
    before = copy.deepcopy(model.state_dict())
    t = torch.zeros(len(images), dtype=torch.long)
    seen: dict[str, list[dict[str, torch.Tensor]]] = {}
    for order in ("cascading", "independent"):
        seen[order] = []

        def record(m, x, t, order=order):
            seen[order].append({k: v.clone() for k, v in m.state_dict().items()})
            return saliency_with(m, x, t)

        model_randomisation(
            model, images, saliency_with(model, images, t), t, explain_with=record, trained=model,
            blocks=SMALL_BLOCKS, order=order, seed=4,
        )  # fmt: skip
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"the trained model changed: {k}"
        assert len(seen[order]) == len(SMALL_BLOCKS)
        for step, state in enumerate(seen[order]):  # step 0 re-initialises the last block
            last = len(SMALL_BLOCKS) - 1 - step
            done = SMALL_BLOCKS[last:] if order == "cascading" else [SMALL_BLOCKS[last]]
            for k, v in state.items():
                changed = not torch.equal(v, before[k])
                assert changed == any(k.startswith(b + ".") for b in done), (order, step, k)
    # A block draws the same weights in both orders.
    for step, block in enumerate(reversed(SMALL_BLOCKS)):
        for k in before:
            if k.startswith(block + "."):
                assert torch.equal(seen["cascading"][step][k], seen["independent"][step][k]), k


def test_saliency_falls_when_the_logits_of_a_trained_model_are_reinitialised():
    from harness.data import photos
    from harness.models import efficientnet_lite0

    clf = efficientnet_lite0()
    x = photos(224, clf.mean, clf.std, num_images=2).images
    with torch.no_grad():
        t = clf.module(x).argmax(1)
    maps = saliency_with(clf.module, x, t)
    r = model_randomisation(
        clf.module, x, maps, t, explain_with=saliency_with, trained=clf.module, blocks=["head", "fc"]
    )
    after_fc = r.curves["spearman_abs"].scores[:, 1]
    assert (after_fc < 0.6).all(), after_fc  # trained: 1


def test_random_logit_of_a_linear_model_compares_the_rows_of_its_weights():
    model = Linear((1, 12, 12), classes=4, seed=3)
    x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2, 3, 0])
    explain = lambda inputs, target: saliency_with(model, inputs, target)  # noqa: E731
    r = random_logit(model, x, explain(x, t), t, explain=explain, seed=9)
    shift = torch.randint(1, 4, (4,), generator=torch.Generator().manual_seed(9))
    other = (t + shift[t]) % 4
    w = model.weight.detach()
    for i in range(5):
        ref = spearmanr(w[t[i]].abs().flatten(), w[other[i]].abs().flatten()).statistic
        assert r.values["spearman_abs"][i].item() == pytest.approx(ref, abs=1e-5)
    ignore = lambda inputs, target: inputs.abs()  # noqa: E731
    same = random_logit(model, x, ignore(x, t), t, explain=ignore, seed=9)
    torch.testing.assert_close(same.values["ssim"], torch.ones(5))


@pytest.mark.parametrize("fn", ["model_randomisation", "random_logit"])
def test_invariant_to_batch_size(small_cnn, images, fn):
    model = small_cnn.module.double()
    x = images.double()
    with torch.no_grad():
        t = model(x).argmax(1)
    maps = saliency_with(model, x, t)

    def run(rows):
        if fn == "random_logit":
            return random_logit(
                model, x[rows], maps[rows], t[rows], explain=lambda a, b: saliency_with(model, a, b)
            )
        return model_randomisation(
            model,
            x[rows],
            maps[rows],
            t[rows],
            explain_with=saliency_with,
            trained=model,
            blocks=SMALL_BLOCKS,
        )

    whole = run(slice(None))
    parts = [run(slice(i, i + 2)) for i in range(0, len(x), 2)]
    for key, v in whole.values.items():
        torch.testing.assert_close(v, torch.cat([p.values[key] for p in parts]), atol=1e-5, rtol=0)


def test_traits():
    assert traits_of(model_randomisation).needs == {"explain_with", "trained"}
    assert traits_of(random_logit).needs == {"explain"}
    assert set(traits_of(model_randomisation).better.values()) == {"lower"}


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"blocks": []}, "blocks=[]"),
        ({"order": "random"}, "order='random'"),
        ({"blocks": ["a", ""]}, "blocks="),
    ],
)
def test_bad_settings_name_the_value(bad, named):
    with pytest.raises(ValueError, match="expected") as e:
        traits_of(model_randomisation).check(**({"blocks": ["fc"], "order": "cascading"} | bad))
    assert str(e.value).startswith(named)


def test_an_unknown_block_names_the_models_modules(small_cnn, images):
    t = torch.zeros(len(images), dtype=torch.long)
    with pytest.raises(
        ValueError,
        match=r"block 'layer9' is not a module of the model; its top-level modules: features, classifier",
    ):
        model_randomisation(
            small_cnn.module, images, images, t, explain_with=saliency_with, trained=small_cnn.module,
            blocks=["features.0", "layer9"],
        )  # fmt: skip
