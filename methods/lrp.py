"""Layer-wise relevance propagation (Bach et al. 2015, doi:10.1371/journal.pone.0130140; the rules
as Montavon et al. 2019, doi:10.1007/978-3-030-28954-6_10, name them) through zennit, the library
made for it (Anders et al. 2021, arXiv:2106.13200).

The relevance of the target logit, `R = f_t(x)`, flows back layer by layer, each layer type by the
rule of a zennit composite (`COMPOSITES`); what the model computes outside its modules is handled
here, at the level of the functions it calls (`_Branches`):

- the sum of two branches that both depend on the input (a residual connection, written `y + x` in
  the model's forward) splits the relevance in proportion to each branch's value, zennit's `Norm`
  rule for its `Sum` layer, which its ResNet canonizer puts where torchvision's blocks add (equal to
  it: tests/test_lrp.py); so any CNN with residual additions is handled, not only ResNets;
- a mean over some dimensions (a global pool written `x.mean((2, 3))`) gives each value its share,
  zennit's `Norm` rule for average pooling (its gradient would hand relevance to values of zero);
- BatchNorm after a convolution in an `nn.Sequential` is merged into it (zennit's canonizer; the
  harness also folds it before a job).

A model that multiplies two tensors that both depend on the input (attention, squeeze-and-excitation
gates) or normalises across features (LayerNorm, softmax inside) has no rule here: it is refused
with the call and the module that made it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt
from torch import nn
from torch.nn import functional as F
from zennit import composites, rules
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.core import Composite as Rules
from zennit.core import ParamMod
from zennit.types import Convolution, Linear

from methods.common import Count, chunked, method
from methods.follow import Following, call_name

Composite = Literal[
    "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1", "epsilon_plus", "epsilon"
]  # fmt: skip
# The rule for each layer type, by composite (first layer: the first convolution or linear layer).
COMPOSITES = {
    "epsilon_plus_flat": "flat first, z+ for convolutions, epsilon for linear layers (EpsilonPlusFlat)",
    "epsilon_gamma_box": "z-box first, gamma for convolutions, epsilon for linear layers (EpsilonGammaBox)",
    "epsilon_alpha2_beta1": "alpha2-beta1 for convolutions, epsilon for linear layers (EpsilonAlpha2Beta1)",
    "epsilon_plus": "z+ for convolutions, epsilon for linear layers (EpsilonPlus)",
    "epsilon": "epsilon for every convolution and linear layer (Captum's LRP default)",
}
STABILIZER = 1e-6  # zennit's, for every rule but epsilon's own

_T = torch.Tensor
_ADDITIONS = frozenset({
    torch.add, torch.sub, _T.add, _T.sub, _T.__add__, _T.__radd__, _T.__iadd__, _T.add_, _T.__sub__,
    _T.__rsub__, _T.__isub__, _T.sub_,
})  # fmt: skip
_PRODUCTS = frozenset({
    torch.mul, _T.mul, _T.__mul__, _T.__rmul__, _T.__imul__, _T.mul_, torch.matmul, _T.matmul,
    _T.__matmul__, torch.bmm, _T.bmm, torch.einsum, torch.div, _T.div, _T.__truediv__, F.linear, F.conv1d,
    F.conv2d, F.conv3d,
})  # fmt: skip
_NORMALISING = frozenset({
    F.softmax, torch.softmax, _T.softmax, F.log_softmax, F.layer_norm, F.group_norm,
    F.multi_head_attention_forward, F.scaled_dot_product_attention,
})  # fmt: skip
_MEANS = frozenset({torch.mean, _T.mean})


def _mean_dims(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple[int, ...], bool] | None:
    """A mean's input, its dimensions (non-negative) and `keepdim`; None for a mean of everything or
    with a dtype.
    """
    x, rest = args[0], dict(zip(("dim", "keepdim"), args[1:], strict=False), **kwargs)
    dims = rest.get("dim")
    if dims is None or rest.get("dtype") is not None or not isinstance(x, torch.Tensor):
        return None
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return x, tuple(sorted(d % x.dim() for d in dims)), bool(rest.get("keepdim", False))


class NotHandled(ValueError):
    """The model computes something LRP has no rule for here (named in the message)."""


def _composite(name: str, epsilon: float, gamma: float, pixel_range: Any, inputs: torch.Tensor) -> Rules:
    canonizers = [SequentialMergeBatchNorm()]
    kw = {"epsilon": epsilon, "stabilizer": STABILIZER, "canonizers": canonizers}
    z_plus = [(Convolution, _ZPlus(stabilizer=STABILIZER))]  # prepended: it takes the convolutions
    if name == "epsilon_plus_flat":
        return composites.EpsilonPlusFlat(layer_map=z_plus, **kw)
    if name == "epsilon_alpha2_beta1":
        return composites.EpsilonAlpha2Beta1(**kw)
    if name == "epsilon_plus":
        return composites.EpsilonPlus(layer_map=z_plus, **kw)
    if name == "epsilon_gamma_box":
        if pixel_range is None:
            raise ValueError(
                "lrp: composite=epsilon_gamma_box needs pixel_range, the (lowest, highest) value of each "
                "input channel (the job binds it from the model's normalisation)"
            )
        low, high = (
            torch.tensor(v, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1) for v in pixel_range
        )
        return composites.EpsilonGammaBox(low=low, high=high, gamma=gamma, **kw)
    if name == "epsilon":
        layer_map = composites.layer_map_base(STABILIZER) + [
            (Convolution, rules.Epsilon(epsilon=epsilon)),
            (Linear, rules.Epsilon(epsilon=epsilon)),
        ]
        return composites.LayerMapComposite(layer_map=layer_map, canonizers=canonizers)
    raise ValueError(f"lrp: unknown composite {name!r}; one of {', '.join(COMPOSITES)}")


class _ZPlus(rules.ZPlus):
    """Zennit's z+ rule, whose second pass (the input's negative part through the negative weights)
    is skipped where a layer's input has no negative value: there it adds exactly zero, and after a
    ReLU (most convolutions of a CNN) it is half of the rule's work.
    """

    def backward(self, module: nn.Module, grad_input: Any, grad_output: Any) -> Any:  # noqa: D102
        x = self.stored_tensors["input"][0]
        if bool((x < 0).any()):
            return super().backward(module, grad_input, grad_output)
        x = x.detach().requires_grad_(True)  # an alias: nothing writes to it
        with ParamMod.ensure(self.param_modifiers[0])(module) as positive, torch.enable_grad():
            out = positive.forward(x)
        (g,) = torch.autograd.grad(out, x, grad_outputs=self.gradient_mapper(grad_output[0], [out])[0])
        r = x.detach() * g
        return tuple(r if original.shape == r.shape else None for original in grad_input)


class _BranchSum(torch.autograd.Function):
    """`a + b` (or `a - b`, `sign=-1`) whose backward splits the relevance as zennit's `Norm` rule
    does for a `Sum` layer: each branch gets its share of the sum, `a * R / z` and `b * R / z`.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, sign: float) -> torch.Tensor:
        b = b if sign > 0 else -b
        z = a + b
        ctx.save_for_backward(a, b, z)
        ctx.flip = sign < 0
        return z

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        a, b, z = ctx.saved_tensors
        share = relevance / _stabilised(z)
        rb = b * share
        return _reduced(a * share, a), _reduced(-rb if ctx.flip else rb, b), None


class _NormMean(torch.autograd.Function):
    """`x.mean(dims)` whose backward gives each value its share of the mean, as zennit's `Norm` rule
    does for an average pooling layer: `x * R / (N * mean)`, not the gradient's even `R / N` (which
    would hand relevance to values of zero, where the rules below can only lose it).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
        z = x.mean(dims, keepdim=True)
        ctx.save_for_backward(x, z)
        ctx.dims, ctx.keepdim = dims, keepdim
        return z if keepdim else z.squeeze(dims)

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, z = ctx.saved_tensors
        r = relevance if ctx.keepdim else _unsqueezed(relevance, ctx.dims)
        n = x.numel() // z.numel()
        return x * (r / (n * _stabilised(z))), None, None


def _unsqueezed(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    for d in sorted(dims):
        t = t.unsqueeze(d)
    return t


def _stabilised(z: torch.Tensor) -> torch.Tensor:
    """Zennit's stabiliser: `z` moved away from zero by `STABILIZER`, on its own side (zero: up)."""
    return z + STABILIZER * (z >= 0).to(z.dtype).mul_(2).sub_(1)


def _reduced(r: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`r` summed over the dimensions along which `like` was broadcast."""
    if r.shape == like.shape:
        return r
    extra = r.dim() - like.dim()
    dims = [i for i in range(r.dim()) if i < extra or like.shape[i - extra] == 1 and r.shape[i] != 1]
    return r.sum(dims, keepdim=True).reshape(like.shape)


class _Branches(Following):
    """Follows what depends on the input through the forward; sends the sum of two such tensors
    through `_BranchSum` and a mean of one through `_NormMean` (unless `rewrite=False`: only checks),
    and raises `NotHandled` at a product of two, or a normalisation of one, naming it and `where()`
    it happened.
    """

    def __init__(
        self, start: torch.Tensor, rewrite: bool = True, where: Callable[[], str] = lambda: ""
    ) -> None:
        super().__init__(start)
        self.rewrite, self.where = rewrite, where

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        n = self.dependent(args, kwargs)
        if n == 0:
            return func(*args, **kwargs)
        if n > 1 and func in _PRODUCTS:
            raise NotHandled(
                f"a product of two tensors that depend on the input ({call_name(func)}{self.where()})"
            )
        if func in _NORMALISING:
            raise NotHandled(f"{call_name(func)}{self.where()}")
        mean = _mean_dims(args, kwargs) if self.rewrite and func in _MEANS else None
        if mean is not None:
            out = _NormMean.apply(*mean)
        elif self.rewrite and n > 1 and func in _ADDITIONS and len(args) == 2 and not kwargs:
            # In place (`out += x`) too: the sum is a new tensor, which the model's `out = out + x` names.
            name = call_name(func)
            a, b = (args[1], args[0]) if "rsub" in name else args
            out = _BranchSum.apply(a, b, -1.0 if "sub" in name else 1.0)
        else:
            out = func(*args, **kwargs)
        self.follow(out)
        return out


_WITH_RULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
_HANDLED: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def _check_handled(model: nn.Module, probe: torch.Tensor) -> None:
    """Raise `NotHandled` (once per model, then remembered) where the model computes what LRP has no
    rule for here: a product of two tensors that depend on the input, a normalisation, or a module
    with parameters that is neither a convolution, a linear layer nor BatchNorm.
    """
    if model not in _HANDLED:
        _HANDLED[model] = _why_not(model, probe)
    why = _HANDLED[model]
    if why is not None:
        raise NotHandled(
            f"lrp cannot propagate relevance through {type(model).__name__}: it computes {why}; LRP here "
            "covers CNNs of convolutions, linear layers, BatchNorm, element-wise activations, pooling and "
            "residual sums (VGG, ResNet, EfficientNet-Lite, the small and shapes CNNs)"
        )


def _why_not(model: nn.Module, probe: torch.Tensor) -> str | None:
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and not isinstance(module, _WITH_RULES):
            return f"{type(module).__name__} with parameters (module {name!r})"
    stack: list[str] = []  # the modules being called, innermost last

    def enter(name: str) -> Callable[..., None]:
        return lambda *_: stack.append(name)

    def leave(*_: Any) -> None:
        stack.pop()

    hooks = [m.register_forward_pre_hook(enter(n)) for n, m in model.named_modules()]
    hooks += [m.register_forward_hook(leave) for m in model.modules()]

    def where() -> str:
        return f" in module {stack[-1] or type(model).__name__!r}"

    try:
        with torch.no_grad(), _Branches(probe, rewrite=False, where=where):
            model(probe)
    except NotHandled as e:
        return str(e)
    finally:
        for h in hooks:
            h.remove()
    return None


@method(eager_only=True, check_model=_check_handled)
def lrp(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *,
    composite: Composite = "epsilon_plus_flat", epsilon: Annotated[float, Gt(0)] = 1e-6,
    gamma: Annotated[float, Ge(0)] = 0.25,
    pixel_range: tuple[tuple[float, ...], tuple[float, ...]] | None = None, chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """LRP of the target logit with a zennit composite (`COMPOSITES`): the relevance of each input
    value, `[B, C, H, W]`, summing to the logit where the rules conserve it (epsilon, z+, flat and
    z-box do up to their stabilisers; biases and gamma's and alpha-beta's sign handling absorb some).

    Args:
        model: the classifier, `[B, C, H, W] -> [B, K]`.
        inputs: `[B, C, H, W]` images.
        target: `[B]` classes.
        composite: the rules, by layer type.
        epsilon: the epsilon rule's stabiliser.
        gamma: the gamma rule's weight on positive contributions.
        pixel_range: `(lowest, highest)` value of each input channel, for the z-box rule of
            `epsilon_gamma_box` (the job binds the model's normalised `[0, 1]`).
        chunk_size: images per forward and backward.
    """
    rules = _composite(composite, epsilon, gamma, pixel_range, inputs)
    _check_handled(model, inputs[:1])

    def relevance(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad(), rules.context(model) as hooked:  # the rules act in the backward
            with _Branches(x):
                logits = hooked(x)
            seed = torch.zeros_like(logits).scatter_(1, t[:, None], logits.detach().gather(1, t[:, None]))
            (r,) = torch.autograd.grad(logits, x, grad_outputs=seed)
        return r

    return chunked(relevance, inputs, target, chunk_size)
