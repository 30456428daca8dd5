"""Deletion and insertion against naive per-image, per-step loops and against RISE's protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch.nn import functional as F

from metrics import deletion, insertion
from metrics.faithfulness import blur, make_substrate, pixel_rank
from tests.conftest import Linear, PatchDetector


def naive_curve(model, image, attribution, target, steps, substrate, mode, score):
    """The obvious loop: one image, one step at a time, pixels sorted in Python."""
    c, h, w = image.shape
    saliency = attribution.sum(dim=0).flatten().tolist()
    order = sorted(range(h * w), key=lambda p: (-saliency[p], p))  # descending, ties by index
    per_step = -(-h * w // steps)
    current = (image if mode == "deletion" else substrate).clone()
    finish = substrate if mode == "deletion" else image
    scores, fractions = [], []
    for i in range(steps + 1):
        with torch.no_grad():
            logits = model(current[None])[0]
        out = logits.softmax(0) if score == "softmax" else logits
        scores.append(float(out[target]))
        fractions.append(min(i * per_step, h * w) / (h * w))
        for p in order[i * per_step : (i + 1) * per_step]:
            current[:, p // w, p % w] = finish[:, p // w, p % w]
    auc = sum((fractions[i + 1] - fractions[i]) * (scores[i] + scores[i + 1]) / 2 for i in range(steps))
    return fractions, scores, auc


@pytest.mark.parametrize("metric", [deletion, insertion])
@pytest.mark.parametrize(
    "substrate,score,steps", [("zero", "softmax", 7), ("blur", "logit", 10), ("mean", "softmax", 13)]
)
def test_curve_equals_naive_loop(small_cnn, images, metric, substrate, score, steps):
    model = small_cnn.module
    attributions = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    attributions[0, :, :8] = 0.0  # ties: kept in pixel order
    target = torch.tensor([0, 1, 2, 3, 4])
    result = metric(model, images, attributions, target, steps=steps, substrate=substrate, score=score)
    curve = result.curves[""]
    torch.testing.assert_close(result.values["auc"], curve.auc)
    sub = make_substrate(images, substrate)
    for b in range(5):
        fr, sc, auc = naive_curve(
            model, images[b], attributions[b], int(target[b]), steps, sub[b], metric.__name__, score
        )
        torch.testing.assert_close(curve.fractions, torch.tensor(fr))
        torch.testing.assert_close(curve.scores[b], torch.tensor(sc), rtol=1e-5, atol=1e-6)
        assert abs(float(curve.auc[b]) - auc) < 1e-5


@pytest.mark.parametrize("metric", [deletion, insertion])
def test_curve_invariant_to_chunk_and_batch(small_cnn, images, metric):
    a = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([4, 3, 2, 1, 0])
    ref = metric(small_cnn.module, images, a, t, steps=9, chunk_size=1).curves[""]
    for chunk in (4, 7, 64):
        other = metric(small_cnn.module, images, a, t, steps=9, chunk_size=chunk).curves[""]
        torch.testing.assert_close(other.scores, ref.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.auc, ref.auc, rtol=0, atol=1e-6)
    alone = metric(small_cnn.module, images[2:3], a[2:3], t[2:3], steps=9).curves[""]
    torch.testing.assert_close(alone.scores[0], ref.scores[2], rtol=1e-5, atol=1e-6)


def test_endpoints_are_image_and_substrate(small_cnn, images):
    a, t = torch.rand(5, 1, 32, 32), torch.zeros(5, dtype=torch.long)
    probs = small_cnn.module(images).softmax(1)[:, 0].detach()
    zero = small_cnn.module(torch.zeros_like(images)).softmax(1)[:, 0].detach()
    d = deletion(small_cnn.module, images, a, t, steps=5).curves[""]
    torch.testing.assert_close(d.scores[:, 0], probs)
    torch.testing.assert_close(d.scores[:, -1], zero)
    i = insertion(small_cnn.module, images, a, t, steps=5).curves[""]
    torch.testing.assert_close(i.scores[:, -1], probs)


def test_auc_of_linear_scores_is_exact():
    # A model whose logit is the number of kept pixels: the deletion curve of any map falls on a line.
    class Count(torch.nn.Module):
        def forward(self, x):
            kept = (x != 0).float().flatten(1).mean(1)
            return torch.stack([kept, torch.zeros_like(kept)], 1)

    x = torch.ones(2, 1, 8, 8)
    d = deletion(
        Count(), x, torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), steps=8, score="logit"
    ).curves[""]
    torch.testing.assert_close(d.scores, (1 - d.fractions).expand(2, -1))
    torch.testing.assert_close(d.auc, torch.full((2,), 0.5))


def test_oracle_beats_random():
    rows, cols = slice(4, 12), slice(20, 28)
    model = PatchDetector(rows, cols, offset=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    x[:, :, rows, cols] = 3.0  # the planted patch is the only evidence for class 1
    target = torch.ones(6, dtype=torch.long)
    oracle = torch.zeros(6, 1, 32, 32)
    oracle[:, :, rows, cols] = 1.0
    random = torch.rand(6, 1, 32, 32, generator=g)
    for substrate in ("zero", "blur", "mean"):
        d_oracle = deletion(model, x, oracle, target, steps=16, substrate=substrate).values["auc"]
        d_random = deletion(model, x, random, target, steps=16, substrate=substrate).values["auc"]
        i_oracle = insertion(model, x, oracle, target, steps=16, substrate=substrate).values["auc"]
        i_random = insertion(model, x, random, target, steps=16, substrate=substrate).values["auc"]
        # A blurred patch keeps much of its evidence, so blur separates less (about 0.03 here).
        margin = 0.01 if substrate == "blur" else 0.1
        assert (d_oracle < d_random - margin).all(), substrate
        assert (i_oracle > i_random + margin).all(), substrate


def test_blur_is_rise_kernel_with_zero_padding():
    x = torch.randn(2, 3, 20, 24, generator=torch.Generator().manual_seed(4))
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    k = torch.from_numpy(gaussian_filter(delta, 5)).float()
    ref = torch.stack([F.conv2d(x[:, c : c + 1], k[None, None], padding=5)[:, 0] for c in range(3)], 1)
    torch.testing.assert_close(blur(x), ref)
    assert abs(float(k.sum()) - 1) < 1e-6


def test_pixel_rank_is_stable_descending():
    a = torch.tensor([[[[0.5, 1.0], [0.5, 2.0]]]])
    assert pixel_rank(a).tolist() == [[2, 1, 3, 0]]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"steps": 0}, "steps=0"),
        ({"substrate": "grey"}, "substrate='grey'"),
        ({"score": "prob"}, "score='prob'"),
    ],
)
def test_bad_settings_name_the_value(small_cnn, images, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        deletion(
            small_cnn.module, images, torch.rand(5, 1, 32, 32), torch.zeros(5, dtype=torch.long), **kwargs
        )


def test_bad_attributions_are_refused(small_cnn, images):
    t = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"shape \(5, 1, 16, 16\)"):
        deletion(small_cnn.module, images, torch.rand(5, 1, 16, 16), t)
    nan = torch.rand(5, 1, 32, 32)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        insertion(small_cnn.module, images, nan, t)


def test_linear_model_deletion_is_exact():
    # A linear model and zero substrate: after k single-pixel steps ranked by the contribution w*x,
    # the logit is f(x) minus the k largest contributions.
    model = Linear((1, 6, 6), classes=2)
    x = torch.rand(3, 1, 6, 6)
    contribution = (model.weight[1] * x).detach()
    t = torch.ones(3, dtype=torch.long)
    d = deletion(model, x, contribution, t, steps=36, score="logit").curves[""]
    top = contribution.flatten(1).sort(dim=1, descending=True).values
    removed = torch.cat([torch.zeros(3, 1), top.cumsum(dim=1)], dim=1)
    expected = model(x).detach()[:, 1:2] - removed
    torch.testing.assert_close(d.scores, expected, rtol=1e-5, atol=1e-5)


def rise_protocol(model, images, maps, mode, pixels_per_step):
    """RISE's evaluation protocol as its paper's code describes it, in NumPy: softmax of the clean
    top-1 class; pixels in reversed ascending argsort order; ceil(HW / step) steps with in-place
    assignment from the substrate (zeros for deletion; for insertion the start is the image blurred
    by scipy's gaussian_filter of an 11x11 delta with sigma 5, zero padded); AUC by the trapezoid
    rule over step / n_steps."""
    n, c, h, w = images.shape
    with torch.no_grad():
        top = model(images).argmax(1).numpy()
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    kernel = torch.zeros(3, 3, 11, 11)
    for ch in range(3):
        kernel[ch, ch] = torch.from_numpy(gaussian_filter(delta, 5)).float()
    blurred = F.conv2d(images, kernel, padding=5).numpy()
    image = images.numpy().reshape(n, c, h * w)
    start = (image if mode == "deletion" else blurred.reshape(n, c, h * w)).copy()
    finish = np.zeros_like(image) if mode == "deletion" else image
    order = np.flip(np.argsort(maps.reshape(n, h * w), axis=1), axis=-1)
    n_steps = (h * w + pixels_per_step - 1) // pixels_per_step
    scores = np.empty((n_steps + 1, n))
    for i in range(n_steps + 1):
        with torch.no_grad():
            probs = model(torch.from_numpy(start.reshape(n, c, h, w))).softmax(1).numpy()
        scores[i] = probs[np.arange(n), top]
        for b in range(n):
            coords = order[b, pixels_per_step * i : pixels_per_step * (i + 1)]
            start[b][:, coords] = finish[b][:, coords]
    return (scores.sum(0) - scores[0] / 2 - scores[-1] / 2) / n_steps


def test_rise_settings_reproduce_rise_protocol_on_pretrained_model():
    from harness.data import photos
    from harness.models import efficientnet_lite0
    from methods import grad_cam, saliency

    clf = efficientnet_lite0()
    x = photos(224, clf.mean, clf.std, num_images=2).images
    with torch.no_grad():
        target = clf.module(x).argmax(1)
    for maps in (saliency(clf.module, x, target), grad_cam(clf.module, x, target, layer="head")):
        d = deletion(clf.module, x, maps, target, steps=28, substrate="zero", score="softmax").curves[""]
        i = insertion(clf.module, x, maps, target, steps=28, substrate="blur", score="softmax").curves[""]
        flat = maps.sum(1).numpy()
        ref_d = rise_protocol(clf.module, x, flat, "deletion", 224 * 8)
        ref_i = rise_protocol(clf.module, x, flat, "insertion", 224 * 8)
        # Only the order of tied pixels differs (RISE reverses it), hence 1e-3 and not float precision.
        np.testing.assert_allclose(d.auc.numpy(), ref_d, atol=1e-3)
        np.testing.assert_allclose(i.auc.numpy(), ref_i, atol=1e-3)
