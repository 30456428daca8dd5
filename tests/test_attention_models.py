"""Torchvision's and timm's ViTs with their attention shown (harness.models.attention): the same
logits and state as the fused layers, every block's probabilities captured, and every attention method
run on the harness's builds (random weights, small inputs).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torchvision
from torch import nn

import methods
from harness.models import torchvision_classifier
from harness.models.attention import ShownMultiheadAttention, show_attention, token_layout
from methods.transformer import captured, check_attention

ATTENTION_METHODS = [
    name
    for name in methods.__all__
    if hasattr(getattr(methods, name), "traits") and methods.traits_of(getattr(methods, name)).attention
]


def _explain(name: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, tokens: tuple) -> torch.Tensor:
    """The method's map, the token layout bound where it takes one (as the job binds it)."""
    fn = getattr(methods, name)
    layout = {"prefix_tokens": tokens[0], "grid": tokens[1:], "n_masks": 8, "n_samples": 8}  # few draws
    return fn(model, x, t, **{k: v for k, v in layout.items() if k in inspect.signature(fn).parameters})


def _small_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()


def test_shown_attention_keeps_torchvisions_logits_and_state():
    fused = _small_vit()
    shown = copy.deepcopy(fused)
    assert show_attention(shown) == 2 and show_attention(shown) == 2  # idempotent
    assert all(type(b.self_attention) is ShownMultiheadAttention for b in shown.encoder.layers)
    assert list(shown.state_dict()) == list(fused.state_dict())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), captured(shown) as seen:
        got = shown(x)
        expected = fused(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert [p.shape for p in seen] == [(3, 4, 17, 17)] * 2
    assert token_layout(shown) == (1, 4, 4)


def test_shown_attention_refuses_what_it_does_not_compute():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    show_attention(mha)
    q = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="self-attention"):
        mha(q, torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="unmasked"):
        mha(q, q, q, attn_mask=torch.zeros(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("name", ATTENTION_METHODS)
def test_every_attention_method_runs_on_torchvisions_vit_b_16(name):
    clf = torchvision_classifier("vit_b_16", input_size=32, num_classes=10)
    assert clf.tokens == (1, 2, 2)
    nn.init.normal_(clf.module.heads.head.weight)  # torchvision starts it at zero: no logit would move
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    maps = _explain(name, clf.module, x, t, clf.tokens)
    assert maps.shape[2:] == (32, 32) and torch.isfinite(maps).all() and maps.abs().sum() > 0


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_every_attention_method_runs_on_timms_vit_and_deit(arch):
    pytest.importorskip("timm")
    from harness.models import timm_classifier

    clf = timm_classifier(arch, input_size=32, num_classes=10)
    prefix = 2 if "distilled" in arch else 1  # DeiT's distillation token comes after the class token
    assert clf.tokens == (prefix, 2, 2)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    with torch.no_grad(), captured(clf.module) as seen:
        clf.module(x)
    assert len(seen) == 12 and seen[0].shape == (2, 3, 4 + prefix, 4 + prefix)
    for name in ATTENTION_METHODS:
        maps = _explain(name, clf.module, x, t, clf.tokens)
        assert maps.shape[2:] == (32, 32) and torch.isfinite(maps).all() and maps.abs().sum() > 0, name


def test_on_torchvisions_swin_attn_lrp_runs_and_the_class_token_methods_say_what_it_can_use():
    """A Swin's attention is within windows, with no class token: attn_lrp and the patch methods (on
    its 4-pixel patches) run on it; rollout, Chefer's method and LeGrad, defined on a class token's
    row, refuse it in one line.
    """
    clf = torchvision_classifier("swin_t", input_size=64, num_classes=10)
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    token_free = {
        n
        for n in ATTENTION_METHODS
        if methods.traits_of(getattr(methods, n)).check_model is not check_attention
    }
    assert token_free == {"attn_lrp", "patch_lime", "patch_occlusion", "patch_rise"}
    for name in sorted(token_free):
        maps = _explain(name, clf.module, x, t, (0, 16, 16))
        assert maps.shape[2:] == (64, 64) and torch.isfinite(maps).all() and maps.abs().sum() > 0, name
    for name in set(ATTENTION_METHODS) - token_free:
        with pytest.raises(ValueError, match="SwinTransformer shows no attention over a class token") as e:
            methods.traits_of(getattr(methods, name)).check_model(clf.module, x[:1])
        usable = str(e.value).split("methods for it: ")[1].split(", ")
        assert "attn_lrp" in usable and "grad_cam" in usable and name not in usable


def test_timms_shown_attention_keeps_its_logits():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    fused = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5).eval()
    shown = copy.deepcopy(fused)
    assert show_attention(shown) == 12
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(shown(x), fused(x), rtol=0, atol=1e-5)


def test_legrad_equals_torchcams_on_torchvisions_vit_b_16():
    from torchcam.methods import LeGrad

    torch.manual_seed(0)
    plain = torchvision.models.vit_b_16(weights=None, image_size=32, num_classes=10).eval()
    nn.init.normal_(plain.heads.head.weight, std=0.02)  # torchvision starts it at zero
    shown = copy.deepcopy(plain)
    show_attention(shown)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)), [4, 9]
    with LeGrad(plain, list(plain.encoder.layers)) as extractor:
        scores = plain(x)
        expected = extractor(t, scores, normalized=False)[0]  # [B, 2, 2]
    got = methods.legrad(shown, x, torch.tensor(t), prefix_tokens=1, grid=(2, 2))
    on_image = nn.functional.interpolate(expected[:, None], size=(32, 32), mode="bilinear")
    torch.testing.assert_close(got, on_image, rtol=0, atol=1e-5 * float(on_image.abs().max()))
    # The last 4 blocks only, as torchcam's example takes them.
    with LeGrad(plain, list(plain.encoder.layers)[-4:]) as extractor:
        expected = extractor(t, plain(x), normalized=False)[0]
    got = methods.legrad(shown, x, torch.tensor(t), layers=4, prefix_tokens=1, grid=(2, 2))
    on_image = nn.functional.interpolate(expected[:, None], size=(32, 32), mode="bilinear")
    torch.testing.assert_close(got, on_image, rtol=0, atol=1e-5 * float(on_image.abs().max()))


def test_guided_grad_cam_on_tokens_is_captums_product_of_grad_cam_and_guided_backprop():
    """Captum's GuidedGradCam is Grad-CAM upsampled times guided backprop: on a CNN the product of
    the harness's grad_cam and Captum's GuidedBackprop equals it; on a ViT's tokens, where Captum's
    takes no layer, guided_grad_cam is that product.
    """
    from captum.attr import GuidedBackprop

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()  # fmt: skip
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 2, 3])
    captums = methods.guided_grad_cam(cnn, x, t, layer="2")
    product = GuidedBackprop(cnn).attribute(x, target=t) * methods.grad_cam(cnn, x, t, layer="2")
    torch.testing.assert_close(product, captums, rtol=1e-5, atol=1e-6 * float(captums.abs().max()))
    clf = torchvision_classifier("vit_b_16", input_size=32, num_classes=10)
    nn.init.normal_(clf.module.heads.head.weight)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    got = methods.guided_grad_cam(clf.module, x, t, layer=clf.cam_layer, layout="tokens")
    cam = methods.grad_cam(clf.module, x, t, layer=clf.cam_layer, layout="tokens")
    expected = GuidedBackprop(clf.module).attribute(x, target=t) * cam
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert got.shape == (2, 3, 32, 32) and got.abs().sum() > 0
