"""AttnLRP (methods.attn_lrp) against lxt, the library that defines it, on torchvision's ViT-B/16 with
random weights: lxt's recipe for that model (its `vit_torch` patches with zennit's gamma rule, as its
ViT example runs them) on the plain model, ours on the same model and on the harness's build with its
attention shown. Plus batch and chunk invariance, and the passes it notes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torchvision
from torch import nn

import methods
from harness.models.attention import show_attention
from harness.runtime.passes import count_forwards
from harness.versus import methods as versus


@pytest.fixture
def lxt_patched() -> Iterator[None]:
    """The patches lxt makes, undone after the test (`harness.versus.methods.lxt_patched`)."""
    pytest.importorskip("lxt")
    with versus.lxt_patched():
        yield


def _lxt_relevance(
    model: nn.Module, x: torch.Tensor, t: list[int], conv_gamma: float, linear_gamma: float
) -> torch.Tensor:
    """The relevance lxt gives, image by image as its example runs it."""
    return torch.cat(
        [
            versus.lxt_relevance(model, x[i : i + 1], torch.tensor([c]), conv_gamma, linear_gamma)
            for i, c in enumerate(t)
        ]
    )


def test_attn_lrp_equals_lxts_on_torchvisions_vit_b_16(lxt_patched):  # noqa: ARG001
    torch.manual_seed(0)
    plain = torchvision.models.vit_b_16(weights=None, image_size=64).eval()  # 12 blocks, 16 patches
    nn.init.normal_(plain.heads.head.weight, std=0.02)  # torchvision starts it at zero
    for p in plain.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    t = [281, 7]
    expected = _lxt_relevance(plain, x, t, conv_gamma=0.25, linear_gamma=0.05)
    scale = float(expected.abs().max())
    assert scale > 0
    got = methods.attn_lrp(plain, x, torch.tensor(t), conv_gamma=0.25, linear_gamma=0.05)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * scale)
    shown = copy.deepcopy(plain)
    show_attention(shown)  # the harness's build: the same function, step by step
    got = methods.attn_lrp(shown, x, torch.tensor(t), conv_gamma=0.25, linear_gamma=0.05)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * scale)


def _small_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    nn.init.normal_(model.heads.head.weight, std=0.1)
    return model


def test_attn_lrp_equals_lxts_for_other_gammas_on_a_small_vit(lxt_patched):  # noqa: ARG001
    model = _small_vit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = [0, 3, 4]
    for conv_gamma, linear_gamma in ((0.1, 0.0), (100.0, 1.0)):
        expected = _lxt_relevance(model, x, t, conv_gamma, linear_gamma)
        got = methods.attn_lrp(model, x, torch.tensor(t), conv_gamma=conv_gamma, linear_gamma=linear_gamma)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_batch_and_chunk_do_not_change_attn_lrp():
    model = _small_vit()
    show_attention(model)
    x, t = (
        torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2)),
        torch.tensor([0, 1, 2, 3, 4]),
    )
    whole = methods.attn_lrp(model, x, t, chunk_size=8)
    for chunk in (1, 2, 3):
        torch.testing.assert_close(methods.attn_lrp(model, x, t, chunk_size=chunk), whole, rtol=0, atol=1e-6)
    one = methods.attn_lrp(model, x[3:4], t[3:4])
    torch.testing.assert_close(one, whole[3:4], rtol=0, atol=1e-6)


def test_attn_lrp_notes_its_gamma_passes_against_the_whole_models_work():
    """The gamma rule runs each of its layers four times forward and four times transposed; the noted
    share of the model is those layers' multiply-adds over the model's (counted here from the shapes).
    """
    model = _small_vit()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with count_forwards(model) as counter:
        methods.attn_lrp(model, x, t)
    tokens, dim, mlp, heads_out = 17, 32, 64, 5
    patch = 16 * dim * 3 * 8 * 8  # the patch embedding: 16 patches, each a 3x8x8 window
    ruled = patch + 2 * (2 * tokens * dim * mlp) + dim * heads_out  # + the MLPs and the head
    attention = 2 * (4 * tokens * dim * dim + 2 * tokens * tokens * dim)  # projections and products
    share = ruled / (ruled + attention)
    # four forwards and four transposed passes a layer: 4 - 3 forwards and 3 backwards beyond one each
    assert counter.noted_forwards == pytest.approx(2 * share * (4 - 3), rel=1e-6)
    assert counter.noted_backwards == pytest.approx(2 * share * 3, rel=1e-6)


def test_a_model_without_attention_is_refused_naming_what_it_can_use():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="Sequential has no attention layer") as e:
        methods.traits_of(methods.attn_lrp).check_model(model, torch.randn(1, 3, 8, 8))
    usable = str(e.value).split("methods for it: ")[1].split(", ")
    assert "lrp" in usable and "saliency" in usable and "attn_lrp" not in usable
