"""Showing a transformer's attention: torchvision's and timm's attention layers compute their
probabilities inside a fused kernel that returns none; `show_attention` makes them compute the same
function step by step, passing the probabilities through a `methods.transformer.AttentionProbs`
module where the attention methods read them. Weights and state dict are unchanged; the logits equal
the fused ones to float rounding (tests/test_attention_models.py checks 1e-5).

- `nn.MultiheadAttention` used as self-attention with `batch_first=True` (torchvision's ViT
  encoder blocks, and any model built from it) becomes `ShownMultiheadAttention`;
- timm's `Attention` (ViT, DeiT) stops using its fused path (`fused_attn = False`), and its dropout
  of the probabilities, the identity in eval mode, becomes the `AttentionProbs` module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from methods.transformer import AttentionProbs


class ShownMultiheadAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` for self-attention, its probabilities through `probs`: the same
    parameters, the same function (no masks, no dropout: eval mode).
    """

    probs: AttentionProbs

    def forward(  # noqa: D102
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Any = None,
        need_weights: bool = True, attn_mask: Any = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        if key_padding_mask is not None or attn_mask is not None or is_causal or not self.batch_first:
            raise ValueError("the shown attention covers unmasked, batch-first self-attention only")
        if not (query is key is value) or self.in_proj_weight is None:
            raise ValueError("the shown attention covers self-attention with one input projection only")
        b, n, c = query.shape
        heads = self.num_heads
        q, k, v = (
            F.linear(query, self.in_proj_weight, self.in_proj_bias)
            .reshape(b, n, 3, heads, c // heads)
            .permute(2, 0, 3, 1, 4)
        )
        probs = self.probs((q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(dim=-1))
        out = self.out_proj((probs @ v).transpose(1, 2).reshape(b, n, c))
        if not need_weights:
            return out, None
        return out, probs.mean(dim=1) if average_attn_weights else probs


def show_attention(module: nn.Module) -> int:
    """Make every attention layer of `module` that the harness knows pass its probabilities through
    an `AttentionProbs` module (see the module's docstring); returns how many. Idempotent.
    """
    shown = 0
    for m in module.modules():
        if isinstance(m, ShownMultiheadAttention):
            shown += 1
        elif type(m) is nn.MultiheadAttention and m.batch_first and m._qkv_same_embed_dim:
            m.__class__ = ShownMultiheadAttention
            m.probs = AttentionProbs()
            shown += 1
        elif _is_timm_attention(m):
            setattr(m, "fused_attn", False)  # noqa: B010 (timm's attribute, untyped here)
            if not isinstance(m.attn_drop, AttentionProbs):
                m.attn_drop = AttentionProbs()
            shown += 1
    return shown


def _is_timm_attention(m: nn.Module) -> bool:
    kind = type(m)
    return (
        kind.__module__.startswith("timm.")
        and kind.__name__ == "Attention"
        and hasattr(m, "fused_attn")
        and isinstance(getattr(m, "attn_drop", None), nn.Module)
    )


def token_layout(module: nn.Module) -> tuple[int, int, int] | None:
    """A transformer's tokens as `(prefix, rows, columns)`: the tokens before the patches and the
    patch grid, for torchvision's and timm's ViTs (and DeiT); None for a model it does not know.
    """
    from torchvision.models import VisionTransformer

    if isinstance(module, VisionTransformer):
        side = module.image_size // module.patch_size
        return 1, side, side
    grid = getattr(getattr(module, "patch_embed", None), "grid_size", None)
    prefix = getattr(module, "num_prefix_tokens", None)
    if grid is not None and prefix is not None:
        return int(prefix), int(grid[0]), int(grid[1])
    return None
