"""ROAD and its imputations against direct sparse solves and naive per-image loops written here."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
from conftest import PatchDetector
from torch.nn import functional as F

from metrics.contract import traits_of
from metrics.imputation import (
    ImputationWarning,
    channel_mean_impute,
    linear_fill,
    noisy_linear_impute,
)
from metrics.road import check_road, road

# The stated stencil: 1/6 for the 4 edge neighbours, 1/12 for the 4 diagonals.
WEIGHTS = {(dy, dx): (1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
del WEIGHTS[(0, 0)]


def direct_fill(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Solve d_i x_i - sum_{removed j} w_ij x_j = sum_{kept j} w_ij v_j with a sparse direct solver.

    `image` is `[C, H, W]` float64, `removed` `[H, W]` bool; neighbours outside the image are dropped.
    """
    c, h, w = image.shape
    ys, xs = np.nonzero(removed)
    index = {(y, x): i for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist(), strict=True))}
    mat = scipy.sparse.lil_matrix((len(index), len(index)))
    rhs = np.zeros((len(index), c))
    for (y, x), i in index.items():
        for (dy, dx), wt in WEIGHTS.items():
            ny, nx = y + dy, x + dx
            if not (0 <= ny < h and 0 <= nx < w):
                continue
            mat[i, i] += wt
            if removed[ny, nx]:
                mat[i, index[(ny, nx)]] -= wt
            else:
                rhs[i] += wt * image[:, ny, nx]
    out = image.copy()
    if index:
        solution = scipy.sparse.linalg.spsolve(mat.tocsc(), rhs).reshape(len(index), c)
        out[:, ys, xs] = solution.T
    return out


def photo_like(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """[0, 1] images with smooth shading, edges and texture."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(b, 3, 4, 4, generator=g), size=(h, w), mode="bilinear")
    edges = (torch.rand(b, 3, 1, w, generator=g) > 0.5).float().expand(b, 3, h, w) * 0.3
    return (0.6 * smooth + edges + 0.1 * torch.rand(b, 3, h, w, generator=g)).clamp(0, 1)


def blob_mask(b: int, h: int, w: int, fraction: float, seed: int) -> torch.Tensor:
    """Big connected holes: the top `fraction` of a bilinearly upsampled 3x3 random grid."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(b, 1, 3, 3, generator=g), size=(h, w), mode="bilinear")[:, 0]
    cut = smooth.flatten(1).quantile(1 - fraction, dim=1)[:, None, None]
    return smooth > cut


def mask_cases():
    g = torch.Generator().manual_seed(0)
    border = torch.zeros(3, 20, 24, dtype=torch.bool)
    border[0, 0, :] = True  # the whole top row, corners included
    border[1, :, -1] = True
    border[1, -1, :5] = True
    border[2, [0, 0, -1, -1], [0, -1, 0, -1]] = True  # the four corners alone
    border[2, 1:4, 1:4] = True
    one_kept = torch.ones(2, 33, 35, dtype=torch.bool)
    one_kept[0, 17, 9] = False
    one_kept[1, 0, 34] = False  # in a corner
    return {
        "border_and_corners": border,
        "single_kept_pixel": one_kept,
        "scattered": torch.rand(3, 37, 29, generator=g) < 0.5,
        "scattered_dense": torch.rand(2, 40, 40, generator=g) < 0.9,
        "big_blobs": blob_mask(3, 48, 40, 0.7, seed=1),
        "blobs_odd_size": blob_mask(2, 45, 51, 0.4, seed=2),
        "tiny_image": torch.rand(2, 7, 9, generator=g) < 0.6,
        "one_row": torch.rand(2, 1, 70, generator=g) < 0.5,
    }


CASES = mask_cases()


SOLVERS = ("compiled", "torch")


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_linear_fill_equals_direct_solve(name, solver):
    removed = CASES[name]
    b, h, w = removed.shape
    images = photo_like(b, h, w, seed=3)
    out = linear_fill(images, removed, solver=solver)
    for i in range(b):
        expected = direct_fill(images[i].double().numpy(), removed[i].numpy())
        assert np.abs(out[i].double().numpy() - expected).max() <= 1e-4
    kept = ~removed[:, None].expand_as(images)
    assert torch.equal(out[kept], images[kept])  # bit-exact


@pytest.mark.parametrize("solver", SOLVERS)
def test_single_kept_pixel_fills_its_value(solver):
    removed = CASES["single_kept_pixel"]
    images = photo_like(2, 33, 35, seed=4)
    out = linear_fill(images, removed, solver=solver)
    torch.testing.assert_close(out[0], images[0, :, 17, 9, None, None].expand(3, 33, 35), atol=1e-4, rtol=0)


def test_nothing_removed_returns_the_image():
    images = photo_like(2, 16, 16, seed=5)
    removed = torch.zeros(2, 16, 16, dtype=torch.bool)
    for out in (noisy_linear_impute(images, removed), channel_mean_impute(images, removed)):
        assert torch.equal(out, images)


def test_noise_touches_only_removed_pixels_with_its_std():
    images = photo_like(4, 64, 64, seed=6)
    removed = torch.rand(4, 64, 64, generator=torch.Generator().manual_seed(7)) < 0.5
    clean = noisy_linear_impute(images, removed, noise_std=0.0)
    gen = torch.Generator().manual_seed(8)
    noisy = noisy_linear_impute(images, removed, noise_std=0.05, generator=gen)
    diff = noisy - clean
    kept = ~removed[:, None].expand_as(images)
    assert torch.equal(noisy[kept], images[kept])
    assert abs(float(diff[~kept].std()) - 0.05) < 0.005  # ~25k samples: the std is within 1%
    assert abs(float(diff[~kept].mean())) < 0.002
    again = noisy_linear_impute(images, removed, noise_std=0.05, generator=torch.Generator().manual_seed(8))
    assert torch.equal(again, noisy)


def test_channel_mean_fill():
    images = photo_like(3, 12, 14, seed=9)
    removed = torch.rand(3, 12, 14, generator=torch.Generator().manual_seed(10)) < 0.6
    out = channel_mean_impute(images, removed, noise_std=0.0)
    for i in range(3):
        for c in range(3):
            mean = images[i, c][~removed[i]].mean()
            torch.testing.assert_close(out[i, c][removed[i]], mean.expand(int(removed[i].sum())))
            assert torch.equal(out[i, c][~removed[i]], images[i, c][~removed[i]])
    noisy = channel_mean_impute(images, removed, noise_std=0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(
        noisy[~removed[:, None].expand_as(images)], images[~removed[:, None].expand_as(images)]
    )


@pytest.mark.parametrize("solver", SOLVERS)
def test_imputation_is_invariant_to_the_batch(solver):
    images = photo_like(5, 40, 36, seed=11)
    removed = torch.cat([blob_mask(3, 40, 36, 0.6, seed=12), torch.rand(2, 40, 36) < 0.8])
    together = linear_fill(images, removed, solver=solver)
    for i in range(5):
        alone = linear_fill(images[i : i + 1], removed[i : i + 1], solver=solver)
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=1e-6)
    pairs = torch.cat(
        [linear_fill(images[i : i + 2], removed[i : i + 2], solver=solver) for i in range(0, 5, 2)]
    )
    torch.testing.assert_close(pairs, together, rtol=0, atol=1e-6)


def test_compiled_solver_is_invariant_to_threads_bit_for_bit():
    images = photo_like(3, 40, 36, seed=17)
    removed = torch.cat([blob_mask(2, 40, 36, 0.7, seed=18), torch.rand(1, 40, 36) < 0.6])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_fill(images, removed, solver="compiled")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, linear_fill(images, removed, solver="compiled"))
    assert torch.equal(one[1:2], linear_fill(images[1:2], removed[1:2], solver="compiled"))


def test_solvers_agree_and_add_noise_only_where_removed():
    images = photo_like(3, 48, 40, seed=19)
    removed = torch.cat([blob_mask(2, 48, 40, 0.8, seed=20), torch.rand(1, 48, 40) < 0.5])
    noise = torch.randn(3, 48, 40, generator=torch.Generator().manual_seed(21)) * 0.01
    out = {s: linear_fill(images, removed, solver=s, noise=noise) for s in SOLVERS}
    # each is within about tol of the exact fill, so within a few tol of each other
    torch.testing.assert_close(out["compiled"], out["torch"], rtol=0, atol=1e-4)
    plain = linear_fill(images, removed, solver="compiled")
    mask = removed[:, None].expand_as(images)
    assert torch.equal(out["compiled"][~mask], images[~mask])
    assert torch.equal(out["compiled"][mask], (plain + noise)[mask])


def test_bad_solver_is_an_error():
    images = photo_like(1, 8, 8, seed=22)
    with pytest.raises(
        ValueError, match=re.escape("solver='fast'; expected one of ('auto', 'compiled', 'torch')")
    ):
        linear_fill(images, torch.rand(1, 8, 8) < 0.5, solver="fast")


def test_every_pixel_removed_is_an_error():
    images = photo_like(2, 8, 8, seed=13)
    removed = torch.zeros(2, 8, 8, dtype=torch.bool)
    removed[1] = True
    for fill in (noisy_linear_impute, channel_mean_impute):
        with pytest.raises(
            ValueError, match=r"images \[1\] have every pixel removed: nothing to impute from"
        ):
            fill(images, removed)


def test_bad_imputation_arguments():
    images = photo_like(1, 8, 8, seed=14)
    removed = torch.zeros(1, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="removed of shape"):
        noisy_linear_impute(images, removed[0])
    with pytest.raises(ValueError, match=re.escape("noise_std=-1")):
        noisy_linear_impute(images, removed, noise_std=-1)
    with pytest.raises(ValueError, match=re.escape("tol=0")):
        noisy_linear_impute(images, removed, tol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_hitting_max_iter_warns(solver):
    images = photo_like(2, 48, 48, seed=15)
    removed = blob_mask(2, 48, 48, 0.8, seed=16)
    with pytest.warns(ImputationWarning, match="did not reach tol=1e-12 in max_iter=2"):
        linear_fill(images, removed, tol=1e-12, max_iter=2, solver=solver)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_fill(images, removed, solver=solver)


# -- ROAD ---------------------------------------------------------------------------------------------------


def naive_road(model, inputs, attributions, target, mean, std, percentages, score, seed):
    """The obvious loop: one image, one order, one percentage at a time, direct sparse imputation."""
    b, c, h, w = inputs.shape
    torch.manual_seed(seed)
    perm = torch.randperm(h * w).tolist()  # ROAD's first draw: the tie-break order
    position_in_perm = {p: i for i, p in enumerate(perm)}
    m = torch.tensor(mean).view(c, 1, 1)
    s = torch.tensor(std).view(c, 1, 1)
    out = {"morf": torch.zeros(b, len(percentages)), "lerf": torch.zeros(b, len(percentages))}
    for i in range(b):
        saliency = attributions[i].sum(dim=0).flatten().tolist()
        ranking = sorted(range(h * w), key=lambda p: (-saliency[p], position_in_perm[p]))
        pixels = (inputs[i] * s + m).double().numpy()
        for order in ("morf", "lerf"):
            for j, pct in enumerate(percentages):
                k = round(pct / 100 * h * w)
                chosen = ranking[:k] if order == "morf" else ranking[h * w - k :]
                removed = np.zeros((h, w), dtype=bool)
                for p in chosen:
                    removed[p // w, p % w] = True
                filled = torch.from_numpy(direct_fill(pixels, removed)).float()
                with torch.no_grad():
                    logits = model(((filled - m) / s)[None])[0]
                if score == "softmax":
                    out[order][i, j] = logits.softmax(0)[target[i]]
                else:
                    out[order][i, j] = float(logits.argmax() == target[i])
    return out


@pytest.mark.parametrize("score", ["softmax", "accuracy"])
def test_road_equals_naive_loop(small_cnn, score):
    model = small_cnn.module
    g = torch.Generator().manual_seed(20)
    inputs = torch.randn(3, 3, 32, 32, generator=g).clamp(-1, 1)
    attributions = torch.randint(0, 4, (3, 1, 32, 32), generator=g).float()  # many ties
    with torch.no_grad():
        target = model(inputs).argmax(1)
    pct = (10, 35, 60, 90)
    torch.manual_seed(21)
    result = road(
        model, inputs, attributions, target, mean=(0.5,) * 3, std=(0.5,) * 3, percentages=pct,
        noise_std=0.0, score=score, tol=1e-6,
    )  # fmt: skip
    naive = naive_road(model, inputs, attributions, target, (0.5,) * 3, (0.5,) * 3, pct, score, seed=21)
    fractions = torch.tensor(pct) / 100
    for order in ("morf", "lerf"):
        curve = result.curves[order]
        torch.testing.assert_close(curve.fractions, fractions)
        torch.testing.assert_close(curve.scores, naive[order], rtol=0, atol=1e-4)
        auc = torch.trapezoid(naive[order], fractions, dim=1) / (fractions[-1] - fractions[0])
        torch.testing.assert_close(result.values[f"{order}_auc"], auc, rtol=0, atol=1e-4)
    combined = (result.values["lerf_auc"] - result.values["morf_auc"]) / 2
    torch.testing.assert_close(result.values["combined"], combined)


def test_oracle_beats_random_in_both_orders():
    rows, cols = slice(10, 18), slice(12, 20)
    model = PatchDetector(rows, cols, gain=3.0)
    mean, std = (0.5,) * 3, (0.25,) * 3
    g = torch.Generator().manual_seed(30)
    pixels = 0.2 + 0.1 * torch.rand(4, 3, 32, 32, generator=g)
    pixels[:, :, rows, cols] = 0.9  # the evidence for class 1
    inputs = (pixels - 0.5) / 0.25
    target = torch.ones(4, dtype=torch.long)
    oracle = torch.zeros(4, 1, 32, 32)
    oracle[:, :, rows, cols] = 1.0
    random = torch.rand(4, 1, 32, 32, generator=g)
    torch.manual_seed(31)
    good = road(model, inputs, oracle, target, mean=mean, std=std).values
    torch.manual_seed(31)
    bad = road(model, inputs, random, target, mean=mean, std=std).values
    assert (good["morf_auc"] < bad["morf_auc"]).all()
    assert (good["lerf_auc"] > bad["lerf_auc"]).all()
    assert (good["combined"] > bad["combined"]).all()


def test_road_is_invariant_to_batch_and_chunk_size(small_cnn):
    model = small_cnn.module
    g = torch.Generator().manual_seed(40)
    inputs = torch.randn(5, 3, 32, 32, generator=g).clamp(-1, 1)
    attributions = torch.rand(5, 1, 32, 32, generator=g)
    target = torch.tensor([0, 1, 2, 3, 4])
    kw = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "percentages": (20, 50, 80)}

    def run(x, a, t, **extra):
        torch.manual_seed(41)
        return road(model, x, a, t, **kw, **extra)

    ref = run(inputs, attributions, target, chunk_size=16)
    for chunk in (1, 3):
        other = run(inputs, attributions, target, chunk_size=chunk)
        for order in ("morf", "lerf"):
            torch.testing.assert_close(
                other.curves[order].scores, ref.curves[order].scores, rtol=0, atol=1e-6
            )
    pairs = [run(inputs[i : i + 2], attributions[i : i + 2], target[i : i + 2]) for i in range(0, 5, 2)]
    for order in ("morf", "lerf"):
        scores = torch.cat([p.curves[order].scores for p in pairs])
        torch.testing.assert_close(scores, ref.curves[order].scores, rtol=0, atol=1e-6)


def test_road_mean_imputation_one_order_one_percentage(small_cnn):
    model = small_cnn.module
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(50)).clamp(-1, 1)
    a = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(51))
    result = road(
        model, inputs, a, torch.tensor([1, 2]), mean=(0.5,) * 3, std=(0.5,) * 3, percentages=(40,),
        orders=("lerf",), imputation="mean", score="logit",
    )  # fmt: skip
    assert set(result.values) == {"lerf_auc"} and set(result.curves) == {"lerf"}
    torch.testing.assert_close(result.values["lerf_auc"], result.curves["lerf"].scores[:, 0])


def test_traits():
    traits = traits_of(road)
    assert traits.better == {"morf_auc": "lower", "lerf_auc": "higher", "combined": "higher"}
    assert traits.needs == {"normalization"}
    assert traits.check is check_road


BAD = [
    ("percentages", (0, 50), "percentages=(0, 50)"),
    ("percentages", (50, 100), "percentages=(50, 100)"),
    ("percentages", (150,), "percentages=(150,)"),
    ("percentages", (-5, 10), "percentages=(-5, 10)"),
    ("percentages", (), "percentages=()"),
    ("percentages", (30, 20), "percentages=(30, 20)"),
    ("orders", ("middle",), "orders=('middle',)"),
    ("orders", ("morf", "morf"), "orders=('morf', 'morf')"),
    ("imputation", "gain", "imputation='gain'"),
    ("noise_std", -0.1, "noise_std=-0.1"),
    ("score", "top5", "score='top5'"),
    ("tol", 0.0, "tol=0.0"),
    ("chunk_size", 0, "chunk_size=0"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_parameters(small_cnn, key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_road(**{key: value})
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match=re.escape(message)):
        road(
            small_cnn.module,
            x,
            x,
            torch.zeros(1, dtype=torch.long),
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            **{key: value},
        )


def test_shapes_are_checked(small_cnn):
    x = torch.zeros(2, 3, 32, 32)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="attributions of shape"):
        road(small_cnn.module, x, torch.zeros(2, 1, 16, 16), t, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="target of shape"):
        road(small_cnn.module, x, x, t[:1], mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="mean and std have 1 channels"):
        road(small_cnn.module, x, x, t, mean=(0.5,), std=(0.5,))
