"""Perturbation methods on the patch grid (methods.patches): occlusion equal to Captum's with the
window and stride a patch, RISE equal to its definition written as a naive loop over masks and images,
LIME equal to methods.lime on the same grid; batch and chunk invariance; bad grids refused.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from captum.attr import Occlusion
from torch import nn

import methods
from harness.models.attention import show_attention


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    nn.init.normal_(model.heads.head.weight, std=0.3)
    show_attention(model)
    return model


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("score", ["softmax", "logit"])
def test_patch_occlusion_equals_captums_occlusion_with_a_patch_for_window_and_stride(score):
    model, x, t = _vit(), _images(3), torch.tensor([0, 2, 4])
    scorer = nn.Sequential(model, nn.Softmax(dim=1)) if score == "softmax" else model
    expected = Occlusion(scorer).attribute(
        x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8), baselines=0.5, target=t
    )[:, :1]
    got = methods.patch_occlusion(model, x, t, grid=(4, 4), baseline=0.5, score=score, chunk_size=5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_patch_rise_equals_its_definition_as_a_naive_loop():
    """Each mask keeps every patch with probability p_keep (drawn as the method draws them); the map
    is the mean over masks of the mask times the target's softmax on the masked image, over p_keep.
    """
    model, x, t, n, p_keep = _vit(), _images(2), torch.tensor([1, 3]), 12, 0.4
    torch.manual_seed(7)
    got = methods.patch_rise(model, x, t, grid=(4, 4), n_masks=n, p_keep=p_keep, chunk_size=3)
    torch.manual_seed(7)
    kept = torch.rand(n, 16) < p_keep
    expected = torch.zeros(2, 1, 32, 32)
    for m in range(n):
        mask = torch.zeros(32, 32)
        for patch in range(16):
            row, col = divmod(patch, 4)
            mask[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = float(kept[m, patch])
        for i in range(2):
            with torch.no_grad():
                p = model((x[i] * mask)[None]).softmax(dim=1)[0, t[i]]
            expected[i, 0] += p * mask
    expected /= n * p_keep
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_patch_lime_is_lime_with_the_patches_for_regions():
    model, x, t = _vit(), _images(2), torch.tensor([1, 3])
    torch.manual_seed(3)
    got = methods.patch_lime(model, x, t, grid=(4, 4), n_samples=40, chunk_size=16)
    torch.manual_seed(3)
    expected = methods.lime(model, x, t, segments="grid", grid=4, n_samples=40, chunk_size=16)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    patches = got[:, 0].reshape(2, 4, 8, 4, 8)  # constant on each patch
    assert (patches == patches[:, :, :1, :, :1]).all()


@pytest.mark.parametrize("name", ["patch_occlusion", "patch_rise", "patch_lime"])
def test_batch_and_chunk_do_not_change_the_patch_methods(name):
    fn, model, x, t = getattr(methods, name), _vit(), _images(5), torch.tensor([0, 1, 2, 3, 4])
    settings = {"patch_rise": {"n_masks": 10}, "patch_lime": {"n_samples": 20}}.get(name, {})

    def run(inputs: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
        torch.manual_seed(0)
        return fn(model, inputs, target, grid=(4, 4), chunk_size=chunk, **settings)

    whole = run(x, t, 8)
    for chunk in (1, 3):
        torch.testing.assert_close(run(x, t, chunk), whole, rtol=0, atol=1e-6)
    if name != "patch_lime":  # LIME draws each image's samples in turn: the first image's are the same
        torch.testing.assert_close(run(x[2:4], t[2:4], 8), whole[2:4], rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(run(x[:2], t[:2], 8), whole[:2], rtol=0, atol=1e-6)


def test_a_grid_that_splits_no_patch_whole_is_refused_in_one_line():
    model, x, t = _vit(), _images(1), torch.tensor([0])
    with pytest.raises(ValueError, match=r"patch_occlusion: grid=\[5, 4\] does not split 32x32 images"):
        methods.patch_occlusion(model, x, t, grid=(5, 4))
    with pytest.raises(ValueError, match="patch_rise: the model declares no patch grid"):
        methods.patch_rise(model, x, t)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="has no attention layer"):
        methods.traits_of(methods.patch_lime).check_model(cnn, x)
