"""The attention methods (methods.transformer) against rollout worked out by hand, against their
authors' algorithms written as naive loops, and on a transformer whose class token sees one patch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import methods
from harness.models.shapes_vit import ShapesViT
from methods.transformer import AttentionProbs, attention_rollout, captured, generic_attention


def _vit(seed: int = 0, size: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return ShapesViT(4, input_size=size, dim=32, depth=3, heads=4).eval()


def _images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class _Fixed(nn.Module):
    """Two blocks whose attention is given (`[heads, N, N]` each, rows summing to one), over the class
    token and a 2x2 grid of patch tokens; the logits read the class token.
    """

    def __init__(self, attention: list[torch.Tensor]) -> None:
        super().__init__()
        self.attention = attention
        self.probs = nn.ModuleList(AttentionProbs() for _ in attention)
        self.embed = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        patches = x.flatten(2).transpose(1, 2)  # [B, 4, 3]: a 2x2 image, one token per pixel
        tokens = torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)
        h = self.embed(tokens)  # [B, 5, 1]
        for a, probs in zip(self.attention, self.probs, strict=True):
            p = probs(a.expand(len(x), *a.shape))
            h = h + (p @ h.unsqueeze(1)).mean(1)
        return torch.cat([h[:, 0], -h[:, 0]], dim=1)


def _row_stochastic(*shape: int, seed: int) -> torch.Tensor:
    a = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) + 0.05
    return a / a.sum(-1, keepdim=True)


def test_rollout_of_two_blocks_is_the_product_of_their_residual_mixed_attention_worked_out_by_hand():
    a1, a2 = _row_stochastic(2, 5, 5, seed=3), _row_stochastic(2, 5, 5, seed=4)
    n = 5
    mixed = []
    for a in (a1, a2):  # the heads' mean, half the identity added, each row renormalised
        m = [
            [(float(a[0, i, j]) + float(a[1, i, j])) / 2 * 0.5 + (0.5 if i == j else 0.0) for j in range(n)]
            for i in range(n)
        ]
        mixed.append([[v / sum(row) for v in row] for row in m])
    # R = A2 A1: the class token's row, over the four patches.
    row = [sum(mixed[1][0][k] * mixed[0][k][j] for k in range(n)) for j in range(n)]
    got = attention_rollout(_Fixed([a1, a2]), torch.randn(1, 3, 2, 2), torch.tensor([0]))
    assert got.shape == (1, 1, 2, 2)
    torch.testing.assert_close(got.flatten(), torch.tensor(row[1:]), rtol=0, atol=1e-6)


def _attention_and_gradients(model: nn.Module, x: torch.Tensor, t: int) -> tuple[list, list]:
    """Each block's attention and the target logit's gradient with respect to it, by tensor hooks."""
    probs, grads = [], []

    def keep(_m, _a, out):
        probs.append(out.detach()[0])
        out.register_hook(lambda g: grads.append(g[0]))

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, AttentionProbs)]
    x = x[None].clone().requires_grad_(True)
    model(x)[0, t].backward()
    for h in hooks:
        h.remove()
    return probs, grads[::-1]  # the hooks fire from the last block back


def _matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    n = len(a)
    return [[sum(a[i][k] * b[k][j] for k in range(n)) for j in range(n)] for i in range(n)]


def _naive_rollout(probs: list[torch.Tensor]) -> list[float]:
    """Abnar and Zuidema's rollout, as their code computes it, in loops."""
    heads, n, _ = probs[0].shape
    r = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    for p in probs:
        a = [[sum(float(p[h, i, j]) for h in range(heads)) / heads for j in range(n)] for i in range(n)]
        a = [[(a[i][j] + (1.0 if i == j else 0.0)) / 2 for j in range(n)] for i in range(n)]
        a = [[v / sum(row) for v in row] for row in a]
        r = _matmul(a, r)
    return r[0][1:]


def _naive_chefer(probs: list[torch.Tensor], grads: list[torch.Tensor]) -> list[float]:
    """Chefer et al.'s rule 5-6 for self-attention, as their code computes it, in loops."""
    heads, n, _ = probs[0].shape
    r = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    for p, g in zip(probs, grads, strict=True):
        a = [
            [
                sum(max(float(g[h, i, j]) * float(p[h, i, j]), 0.0) for h in range(heads)) / heads
                for j in range(n)
            ]
            for i in range(n)
        ]
        ar = _matmul(a, r)
        r = [[r[i][j] + ar[i][j] for j in range(n)] for i in range(n)]
    return r[0][1:]


def test_rollout_and_chefers_method_equal_their_algorithms_as_naive_loops_on_shapes_vit():
    model, x, t = _vit(size=24), _images(2, size=24), torch.tensor([1, 3])
    rollout = attention_rollout(model, x, t)
    chefer = generic_attention(model, x, t)
    assert rollout.shape == chefer.shape == (2, 1, 24, 24)
    for b in range(2):
        probs, grads = _attention_and_gradients(model, x[b], int(t[b]))
        # The grid is 3x3 (the class token and 9 patches), upsampled to the image as the methods do.
        for got, expected in ((rollout, _naive_rollout(probs)), (chefer, _naive_chefer(probs, grads))):
            on_grid = nn.functional.interpolate(
                torch.tensor(expected).view(1, 1, 3, 3), size=(24, 24), mode="bilinear"
            )
            torch.testing.assert_close(got[b : b + 1], on_grid, rtol=0, atol=1e-5)


def test_capturing_the_attention_leaves_the_logits_as_they_were():
    model, x = _vit(), _images(3)
    with torch.no_grad():
        plain = model(x)
        with captured(model) as seen:
            again = model(x)
    assert len(seen) == 3 and seen[0].shape == (3, 4, 17, 17)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(3, 4, 17), rtol=0, atol=1e-6)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("fn", [attention_rollout, generic_attention])
def test_batch_and_chunk_do_not_change_the_maps(fn):
    model, x, t = _vit(), _images(5), torch.tensor([0, 1, 2, 3, 0])
    whole = fn(model, x, t, chunk_size=8)
    for chunk in (1, 2, 3):
        torch.testing.assert_close(fn(model, x, t, chunk_size=chunk), whole, rtol=0, atol=1e-6)


class _OnePatch(nn.Module):
    """A transformer whose class token attends to one patch only (every other score masked), each
    patch's token its pixel's brightness: the logit is that patch's, and nothing else reaches it.
    """

    def __init__(self, patch: int, grid: int = 4) -> None:
        super().__init__()
        self.patch, self.grid = patch, grid
        self.probs = AttentionProbs()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n = len(x), 1 + self.grid * self.grid
        patches = nn.functional.avg_pool2d(x.mean(1, keepdim=True), x.shape[-1] // self.grid).flatten(1)
        tokens = torch.cat([torch.zeros(b, 1), patches], dim=1)[..., None] * self.weight  # [B, N, 1]
        scores = torch.zeros(b, 1, n, n)
        scores[:, :, 0, :] = -1e9
        scores[:, :, 0, 1 + self.patch] = 0.0  # the class token sees one patch; the others see all
        h = tokens + (self.probs(scores.softmax(-1)) @ tokens[:, None]).squeeze(1)
        return torch.cat([h[:, 0], -h[:, 0]], dim=1)


@pytest.mark.parametrize("name", ["attention_rollout", "generic_attention", "attn_lrp"])
def test_every_attention_method_puts_its_maximum_on_the_one_patch_the_class_token_sees(name):
    """LeGrad is the exception by design (test_legrad_ranks_the_patches_by_their_tokens...)."""
    x, fn = _images(2, size=16).abs() + 0.5, getattr(methods, name)
    for patch in (0, 6, 13):
        grid = {} if name == "attn_lrp" else {"grid": (4, 4)}
        maps = fn(_OnePatch(patch), x, torch.tensor([0, 0]), **grid).sum(1, keepdim=True)
        on_grid = nn.functional.adaptive_avg_pool2d(maps, 4).flatten(1)
        assert (on_grid.argmax(1) == patch).all(), fn.__name__


def test_a_model_without_attention_gets_one_line_naming_the_methods_it_can_use():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="shows no attention") as e:
        methods.traits_of(attention_rollout).check_model(model, torch.randn(1, 3, 8, 8))
    assert "saliency" in str(e.value) and "attention_rollout" not in str(e.value).split("methods for it:")[1]


def test_discarding_zeroes_the_smallest_entries_but_the_class_tokens_own():
    model, x, t = _vit(), _images(2), torch.tensor([0, 1])
    kept = attention_rollout(model, x, t)
    dropped = attention_rollout(model, x, t, discard_ratio=0.9)
    assert not torch.allclose(kept, dropped)
    from methods.transformer import _discarded

    a = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])
    torch.testing.assert_close(_discarded(a, 0.5), torch.tensor([[[0.1, 0.0], [0.0, 0.4]]]))
    torch.testing.assert_close(
        _discarded(torch.tensor([[[0.0, 0.5], [0.2, 0.3]]]), 0.5), torch.tensor([[[0.0, 0.5], [0.0, 0.0]]])
    )


class _Look(nn.Module):
    """One block in which the class token attends to one patch only (every other score masked), each
    patch's token its mean brightness; the logits read the class token through `norm` and `head`.
    """

    def __init__(self, patch: int, grid: int = 4) -> None:
        super().__init__()
        self.patch, self.grid = patch, grid
        self.blocks = nn.Sequential(_LookBlock(patch, grid))
        self.norm, self.head = nn.Identity(), nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        patches = nn.functional.avg_pool2d(x.mean(1, keepdim=True), x.shape[-1] // self.grid).flatten(1)
        tokens = torch.cat([torch.zeros(len(x), 1), patches], dim=1)[..., None]  # [B, N, 1]
        return self.head(self.norm(self.blocks(tokens)[:, 0]))


class _LookBlock(nn.Module):
    def __init__(self, patch: int, grid: int) -> None:
        super().__init__()
        self.attn = _LookAttention(patch, grid)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return tokens + self.attn(tokens)


class _LookAttention(nn.Module):
    def __init__(self, patch: int, grid: int) -> None:
        super().__init__()
        self.patch, self.n = patch, 1 + grid * grid
        self.probs = AttentionProbs()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        scores = torch.zeros(len(tokens), 1, self.n, self.n)
        scores[:, :, 0, :] = -1e9
        scores[:, :, 0, 1 + self.patch] = 0.0  # the class token sees one patch; the others see all
        return (self.probs(scores.softmax(-1)) @ tokens[:, None]).squeeze(1)


def test_legrad_ranks_the_patches_by_their_tokens_not_by_where_the_class_token_looks():
    """Rollout and Chefer's method follow the class token's attention to patch 12; LeGrad, which does
    not multiply the attention in, ranks the patches by how their tokens would move the score: the
    brightest, patch 3, wherever the class token looks.
    """
    x = torch.full((1, 3, 16, 16), 0.5)
    x[..., 0:4, 12:16] = 2.0  # patch 3 (row 0, column 3) the brightest
    model, t = _Look(12), torch.tensor([0])
    for fn, peak in ((attention_rollout, 12), (generic_attention, 12), (methods.legrad, 3)):
        maps = fn(model, x, t, grid=(4, 4))
        assert int(nn.functional.adaptive_avg_pool2d(maps, 4).flatten(1).argmax(1)) == peak, fn.__name__
    for pool in ("mean", "cls"):
        maps = methods.legrad(model, x, t, grid=(4, 4), pool=pool)
        assert int(nn.functional.adaptive_avg_pool2d(maps, 4).flatten(1).argmax(1)) == 3


@pytest.mark.parametrize(
    ("small", "size"), [((8, 8), (64, 64)), ((14, 14), (224, 224)), ((4, 7), (33, 50)), ((3, 3), (2, 2))]
)
def test_the_maps_upsampling_is_torchs_bilinear_interpolation(small, size):
    from methods.transformer import bilinear

    maps = torch.randn(3, 2, *small, generator=torch.Generator().manual_seed(0))
    expected = nn.functional.interpolate(maps, size, mode="bilinear")
    torch.testing.assert_close(
        bilinear(maps, size), expected, rtol=0, atol=1e-6 * float(expected.abs().max())
    )
