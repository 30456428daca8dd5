"""LRP for vision transformers as `lxt` computes it (Achtibat et al. 2024, "AttnLRP: attention-aware
layer-wise relevance propagation for transformers", arXiv:2402.05602), the library that defines it
and this method's test's oracle: its recipe for torchvision's ViT (`lxt.efficient.models.vit_torch`
with zennit's gamma rule, as lxt's ViT example runs it), here on any transformer's forward.

lxt writes LRP in gradient-times-input form: a modified backward carries a gradient `g`, and the
relevance of a tensor `t` is `t * g`. The rules, each on the functions the model calls, in one torch
function mode around one forward:

- inside the attention, the probabilities are held constant (CP-LRP, Ali et al. 2022,
  arXiv:2202.07304, lxt's choice for ViTs): no relevance flows through the softmax, only through the
  values; the attention layer's own projections pass their gradient (lxt leaves them so, torchvision's
  attention computing them inside one function);
- LayerNorm: the identity rule, the normaliser's gradient stopped (AttnLRP, eq. 9);
- an element-wise activation (GELU): the identity rule, `g_in = f(x) / x * g_out` (AttnLRP, eq. 9);
- every other convolution and linear layer: zennit's gamma rule (`methods.lrp.Rule`), with
  `conv_gamma` on convolutions and `linear_gamma` on linear layers (lxt's example searches a grid;
  the defaults here are zennit's gamma for convolutions and the middle of that grid for linear ones);
- anything else (residual sums, the class token, position embeddings) passes its gradient.

The map is `x * g` of the target logit's seed `1`, `[B, C, H, W]`. The gamma passes (the layers
again with other weights) are noted as the model's work, by their multiply-adds against the whole
model's, so that the row's bound counts them.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge
from torch import nn
from torch.nn import functional as F

from methods.common import Count, chunked, method
from methods.follow import Following
from methods.lrp import ACTIVATIONS, CONVS, Layer, Relevant, Rule, Tally, call_rest, out_of_place
from methods.transformer import check_transformer, is_attention_layer

_T = torch.Tensor
_SOFTMAXES = frozenset({F.softmax, torch.softmax, _T.softmax})
_PRODUCTS = frozenset({torch.matmul, _T.matmul, _T.__matmul__, torch.bmm, _T.bmm})


def _gamma_layers(model: nn.Module, conv: Rule, linear: Rule, tally: Tally) -> dict[int, Layer]:
    """The gamma rule's layers, by the id of their weight: every convolution and linear module outside
    the attention layers (whose projections pass their gradient).
    """
    inside = {id(p) for m in model.modules() if is_attention_layer(m) for p in m.parameters()}
    layers = {}
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear) and id(m.weight) not in inside:
            rule = linear if isinstance(m, nn.Linear) else conv
            bias = None if m.bias is None else m.bias.detach()
            layers[id(m.weight)] = Layer(m.weight.detach(), bias, rule, tally, as_gradient=True)
    return layers


class _Identity(torch.autograd.Function):
    """An element-wise activation under the identity rule: `g_in = f(x) / (x + 1e-10) * g_out`, so
    that the relevance `x * g_in` is the output's `f(x) * g_out` (lxt's `identity_rule_implicit`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, call: Any) -> torch.Tensor:  # noqa: D102
        y = call()
        ctx.save_for_backward(y / (x + 1e-10))
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        (ratio,) = ctx.saved_tensors
        return ratio * g, None


def _layer_norm(
    x: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, eps: float = 1e-5,
) -> torch.Tensor:  # fmt: skip
    """LayerNorm with its standard deviation's gradient stopped: the identity rule."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = x.mean(dims, keepdim=True)
    std = (((x - mean) ** 2).mean(dims, keepdim=True) + eps).sqrt()
    y = (x - mean) / std.detach()
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class _AttnRules(Following):
    """Gives each call that depends on the input its AttnLRP rule (the module's docstring), and counts
    the multiply-adds of the calls without one, for the rule passes' share of the model's work.
    """

    def __init__(self, start: torch.Tensor, layers: dict[int, Layer], tally: Tally) -> None:
        super().__init__(start)
        self.layers, self.tally = layers, tally

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        n = self.dependent(args, kwargs)
        if n == 0:
            return func(*args, **kwargs)
        first = args[0] if args else None
        if func in _SOFTMAXES:  # the attention held constant (CP-LRP)
            return func(*args, **kwargs).detach()
        if func is F.multi_head_attention_forward or func is F.scaled_dot_product_attention:
            # queries and keys only reach the output through the probabilities: held constant too
            args = (args[0].detach(), args[1].detach(), *args[2:])
        out = self._ruled(func, n, first, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
            self._count(func, args, kwargs, out)
        self.follow(out)
        return out

    def _ruled(self, func: Any, n: int, first: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if not self.depends(first):
            return None
        if func in CONVS or func is F.linear:
            layer = self.layers.get(id(args[1] if len(args) > 1 else kwargs.get("weight")))
            if layer is None:
                return None
            return Relevant.apply(first, layer, func, call_rest(func, args, kwargs), None, False)
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        if func in ACTIVATIONS and n == 1:
            func, args, kwargs = out_of_place(func, args, kwargs)
            return _Identity.apply(first, lambda: func(*args, **kwargs))
        return None

    def _count(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Add the multiply-adds of a linear map without a rule (an attention projection, the
        attention's products) to the tally's `others`.
        """
        if not isinstance(out, torch.Tensor):
            if func is F.multi_head_attention_forward and isinstance(out, tuple):
                q, embed = args[0], int(args[0].shape[-1])
                tokens = q.numel() // embed
                self.tally.others += tokens * embed * embed * 4 + 2 * tokens * int(q.shape[0]) * embed
            return
        if func is F.linear:
            self.tally.others += out.numel() * int(args[1].shape[-1])
        elif func in CONVS:
            self.tally.others += out.numel() * args[1][0].numel()
        elif func in _PRODUCTS and len(args) == 2 and isinstance(args[0], torch.Tensor):
            self.tally.others += out.numel() * int(args[0].shape[-1])
        elif func is F.scaled_dot_product_attention:
            self.tally.others += 2 * out.numel() * int(args[1].shape[-2])


@method(attention=True, eager_only=True, check_model=check_transformer)
def attn_lrp(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *,
    conv_gamma: Annotated[float, Ge(0)] = 0.25, linear_gamma: Annotated[float, Ge(0)] = 0.05,
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """AttnLRP of the target logit as lxt runs it on vision transformers (the module's docstring):
    the relevance of each input value, `[B, C, H, W]`.

    Args:
        model: a transformer (`nn.MultiheadAttention`, timm's or shapes_vit's attention).
        inputs: `[B, C, H, W]` images.
        target: `[B]` classes.
        conv_gamma: the gamma rule's weight on positive contributions in convolutions (the patch
            embedding).
        linear_gamma: the same in linear layers outside the attention (the MLPs, the head).
        chunk_size: images per forward and backward.
    """
    check_transformer(model, inputs[:1])
    tally = Tally()
    layers = _gamma_layers(model, Rule("gamma", gamma=conv_gamma), Rule("gamma", gamma=linear_gamma), tally)

    def relevance(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            with _AttnRules(x, layers, tally):
                logits = model(x)
            seed = torch.zeros_like(logits).scatter_(1, t[:, None], 1.0)
            (g,) = torch.autograd.grad(logits, x, grad_outputs=seed)
        tally.note(x.shape[0])
        return x.detach() * g

    return chunked(relevance, inputs, target, chunk_size)
