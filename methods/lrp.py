"""Layer-wise relevance propagation (Bach et al. 2015, doi:10.1371/journal.pone.0130140; the rules
as Montavon et al. 2019, doi:10.1007/978-3-030-28954-6_10, name them), with the composites of zennit,
the library made for it (Anders et al. 2021, arXiv:2106.13200), which is its test's oracle.

The relevance of the target logit, `R = f_t(x)`, flows back layer by layer, each layer by the rule
its composite gives its type (`COMPOSITES`). The rules act on the functions the model calls, in one
torch function mode (`_Branches`) around one forward, and in its backward:

- a convolution or linear layer gets its rule (`Rule`: epsilon, z+, flat, gamma, z-box,
  alpha-beta; zennit's `BasicHook` passes written out), with the BatchNorm that follows it merged
  in (zennit's `SequentialMergeBatchNorm`: by the order the modules were assigned, checked against
  the model's logits once per model); its other weights are made once per call (`Layer.part`),
  a pass of an input's negative part runs only where the input has a negative value, and the
  rule's transposed passes run the convolution's input gradient directly, without a forward;
- an activation passes the relevance through (zennit's `Pass`), as does a BatchNorm not merged;
- an average pooling or a mean (a global pool written `x.mean((2, 3))`) gives each value its share
  (zennit's `Norm`; the gradient would hand relevance to values of zero);
- the sum of two branches that both depend on the input (a residual connection, written `y + x`)
  splits the relevance in proportion to each branch's value, zennit's `Norm` rule for the `Sum`
  layer its canonizers put where torchvision's ResNet blocks add; so any CNN with residual additions
  is handled, not only ResNets;
- anything else (max pooling, padding, reshapes) passes its gradient, as in zennit.

Equal to zennit's own attributor with its canonizers (tests/test_lrp.py), at 1.6 to 2.0 times a
forward+backward on the CPU rather than zennit's 4.3 (its hooks run each layer again and take its
gradient through autograd). The rules' own passes, each layer again with other weights, are noted
as the model's work (`methods.common.note_passes`, by their multiply-adds), so that the row's bound
counts the passes the rule needs.

A model that multiplies two tensors that both depend on the input (attention, squeeze-and-excitation
gates) or normalises across features (LayerNorm, softmax inside) has no rule here: it is refused
with the call and the module that made it.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, cast

import torch
from annotated_types import Ge, Gt
from torch import nn
from torch.nn import functional as F

from methods.common import Count, chunked, method, note_passes
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
GRADIENT_STABILIZER = 1e-10  # lxt's, dividing relevance by a layer's input back into a gradient

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


# The rules of a layer (a convolution or linear call), zennit's `BasicHook` passes written out: each
# returns the relevance of the layer's input `x` from that of its output, `relevance`, given the
# layer's (BatchNorm-merged) weights and its forward output `y`. `vjp(w, g)` is the transpose of the
# layer's linear map with weights `w`, applied to `g`; `f(x, w, b)` the layer with other weights.
_Vjp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_Fwd = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class Rule:
    """A layer's rule, by name (`epsilon`, `z_plus`, `flat`, `gamma`, `z_box`, `alpha_beta`), with
    its parameters; `apply` propagates relevance through one call of the layer.
    """

    name: str
    epsilon: float = 1e-6
    gamma: float = 0.25
    alpha: float = 2.0
    beta: float = 1.0
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None

    @property
    def needs_output(self) -> bool:
        """Whether the rule reads the layer's own output (else only its input is kept)."""
        return self.name in ("epsilon", "gamma", "z_box")

    def apply(
        self, layer: Layer, x: torch.Tensor, y: torch.Tensor | None, relevance: torch.Tensor, f: _Fwd,
        vjp: _Vjp, inside: torch.Tensor | None = None, non_negative: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        """The relevance of `x`; `inside` is one where `x` is the layer's input and zero where it is
        the zero padding the model added before the call (the constant inputs of flat and z-box are
        padded as the input was); `non_negative`: `x` is known to have no negative value.
        """
        w = layer.weight
        if self.name == "epsilon":
            assert y is not None
            return x * vjp(w, relevance / stabilised(y, self.epsilon))
        if self.name == "flat":  # every weight one, the input all ones, no bias; not times the input
            ones, given = layer.w("ones"), torch.ones_like(x) if inside is None else inside
            return vjp(ones, relevance / stabilised(f(given, ones, None)))
        if self.name == "z_box":
            assert y is not None and self.low is not None and self.high is not None
            low, high = self.low.expand_as(x), self.high.expand_as(x)
            if inside is not None:
                low, high = low * inside, high * inside
            wp, wn = layer.w("+"), layer.w("-")
            g = relevance / stabilised(y - f(low, wp, layer.b("+")) - f(high, wn, layer.b("-")))
            return x * vjp(w, g) - low * vjp(wp, g) - high * vjp(wn, g)
        # z+, gamma and alpha-beta: weights (and bias) by the sign of the contribution; the passes of
        # an input's negative part are skipped where it has none (they add exactly zero there).
        negative = not non_negative and bool(x.amin() < 0)
        xp, xn = (x.clamp(min=0), x.clamp(max=0)) if negative else (x, None)
        if self.name == "z_plus":
            return self._pair(
                xp, xn, layer.w("+"), layer.b("+"), layer.w("-"), relevance, f, vjp, positive=True
            )
        if self.name == "alpha_beta":
            up = self._pair(
                xp, xn, layer.w("+"), layer.b("+"), layer.w("-"), relevance, f, vjp, positive=True
            )
            down = self._pair(xp, xn, layer.w("-"), layer.b("-"), layer.w("+"), relevance, f, vjp)
            return self.alpha * up - self.beta * down
        if self.name == "gamma":
            assert y is not None
            wup, wdown = layer.w(f"+{self.gamma}"), layer.w(f"-{self.gamma}")
            up = self._pair(xp, xn, wup, layer.b(f"+{self.gamma}"), wdown, relevance * (y > 0), f, vjp)
            down = self._pair(xp, xn, wdown, layer.b(f"-{self.gamma}"), wup, relevance * (y < 0), f, vjp)
            return up + down
        raise AssertionError(self.name)

    @staticmethod
    def _pair(
        xp: torch.Tensor, xn: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor | None,
        w_neg: torch.Tensor, relevance: torch.Tensor, f: _Fwd, vjp: _Vjp, positive: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        """`xp` through `w` (with `b`) and `xn` through `w_neg` (no bias), sharing the relevance in
        proportion to their joint output; `positive`: `w` and `b` have no negative value.
        """
        z = f(xp, w, b)
        if xn is not None:
            z += f(xn, w_neg, None)
        # With w and b never negative (z+, alpha's share), z is a sum of terms that are never negative.
        g = relevance / (z.add_(STABILIZER) if positive else stabilised(z))
        return xp * vjp(w, g) if xn is None else xp * vjp(w, g) + xn * vjp(w_neg, g)


def _rules(
    name: str, epsilon: float, gamma: float, pixel_range: Any, like: torch.Tensor
) -> tuple[Rule, Rule, Rule | None]:
    """The rules of `composite` `name`: for convolutions, for linear layers, for the first layer
    (None: its type's).
    """
    eps = Rule("epsilon", epsilon=epsilon)
    if name == "epsilon_plus_flat":
        return Rule("z_plus"), eps, Rule("flat")
    if name == "epsilon_plus":
        return Rule("z_plus"), eps, None
    if name == "epsilon_alpha2_beta1":
        return Rule("alpha_beta", alpha=2.0, beta=1.0), eps, None
    if name == "epsilon":
        return eps, eps, None
    if name == "epsilon_gamma_box":
        if pixel_range is None:
            raise ValueError(
                "lrp: composite=epsilon_gamma_box needs pixel_range, the (lowest, highest) value of each "
                "input channel (the job binds it from the model's normalisation)"
            )
        low, high = (
            torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, *(1,) * (like.dim() - 2))
            for v in pixel_range
        )
        return Rule("gamma", gamma=gamma), eps, Rule("z_box", low=low, high=high)
    raise ValueError(f"lrp: unknown composite {name!r}; one of {', '.join(COMPOSITES)}")


CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class Layer:
    """A convolution or linear module as the rules see it: its weights with the BatchNorm merged in that
    follows it among the model's modules in the order they were assigned (zennit's
    `SequentialMergeBatchNorm`, which assumes that is the order they are called in), and its rule.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    rule: Rule
    tally: Tally
    parts: dict[str, torch.Tensor | None] = field(default_factory=dict)
    # The backward carries gradients, not relevance (lxt's gradient-times-input form): the relevance of
    # the output is the gradient times the output, and the input's is handed back divided by the input.
    as_gradient: bool = False

    def w(self, key: str) -> torch.Tensor:
        """The weights a rule passes with (`part`)."""
        made = self.part("w" + key)
        assert made is not None
        return made

    def b(self, key: str) -> torch.Tensor | None:
        """The bias a rule passes with (`part`), or None where the layer has none."""
        return self.part("b" + key)

    def part(self, key: str) -> torch.Tensor | None:
        """The weights or bias a rule passes with, made once per call of `lrp`: `w+`, `w-`, `b+`, `b-`
        (clamped at zero: zennit's `ClampMod`), `w+<gamma>`... (`w + gamma * w+`: its `GammaMod`),
        `wones` (the flat rule's).
        """
        if key not in self.parts:
            source, sign, gamma = (self.weight if key[0] == "w" else self.bias), key[1:2], key[2:]
            if key == "wones":
                made = torch.ones_like(self.weight)
            elif source is None:
                made = None
            else:
                clamped = source.clamp(min=0) if sign == "+" else source.clamp(max=0)
                made = clamped if not gamma else source + float(gamma) * clamped
            self.parts[key] = made
        return self.parts[key]


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    """The modules without children, depth first in the order they were assigned, a convolution or
    linear module counting as one whatever it holds (EfficientNet's convolutions hold their padding).
    """
    children = list(module.children())
    if not children or isinstance(module, _LAYERS):
        yield module
    for child in children if not isinstance(module, _LAYERS) else ():
        yield from _leaves(child)


def _layers(
    model: nn.Module, conv: Rule, linear: Rule, first: Rule | None, tally: Tally
) -> tuple[dict[int, Layer], set[int]]:
    """Each convolution and linear module's `Layer`, by the id of its weight, and the ids of the
    running means of the BatchNorms merged into them (their calls become the identity).
    """
    merged: dict[nn.Module, nn.modules.batchnorm._BatchNorm] = {}
    leaves = list(_leaves(model))
    for a, bn in zip(leaves, leaves[1:], strict=False):
        if (
            isinstance(a, _LAYERS)
            and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.running_var is not None
        ):
            merged[a] = bn
    layers: dict[int, Layer] = {}
    identities: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _LAYERS) or isinstance(module, nn.modules.conv._ConvTransposeNd):
                continue
            rule = (
                first
                if first is not None and not layers
                else (linear if isinstance(module, nn.Linear) else conv)
            )
            w, b = module.weight.detach(), None if module.bias is None else module.bias.detach()
            norm = merged.get(module)
            if norm is not None:
                mean, var = cast(torch.Tensor, norm.running_mean), cast(torch.Tensor, norm.running_var)
                scale = (norm.weight if norm.weight is not None else 1.0) / (var + norm.eps) ** 0.5
                shift = norm.bias if norm.bias is not None else 0.0
                w = w * scale.view(-1, *(1,) * (w.dim() - 1))
                b = ((b if b is not None else 0.0) - mean) * scale + shift
                identities.add(id(mean))
            layers[id(module.weight)] = Layer(w, b, rule, tally)
    return layers, identities


class Relevant(torch.autograd.Function):
    """A convolution or linear call whose backward is its layer's rule, not its gradient (in
    gradient-times-input form where the layer says so: `Layer.as_gradient`).
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any, x: torch.Tensor, layer: Layer, func: Any, rest: dict, inside: torch.Tensor | None,
        non_negative: bool,
    ) -> torch.Tensor:  # fmt: skip
        y = func(x, layer.weight, layer.bias, **rest)
        ctx.layer, ctx.func, ctx.rest, ctx.inside, ctx.non_negative = layer, func, rest, inside, non_negative
        ctx.save_for_backward(x, y if layer.rule.needs_output or layer.as_gradient else None)
        ctx.macs = y.numel() * layer.weight[0].numel()  # multiply-adds of the call
        layer.tally.model += ctx.macs
        return y

    @staticmethod
    def backward(  # noqa: D102
        ctx: Any, relevance: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None, None, None]:
        x, y = ctx.saved_tensors
        func, rest, layer = ctx.func, ctx.rest, ctx.layer
        if layer.as_gradient:
            relevance = relevance * y

        passes = [0, 0]  # the layer again forward, and transposed

        def f(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            passes[0] += 1
            return func(a, w, b, **rest)

        def vjp(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            passes[1] += 1
            return _input_vjp(func, rest, x, w, g)

        r = layer.rule.apply(layer, x, y, relevance, f, vjp, ctx.inside, ctx.non_negative)
        layer.tally.forwards += passes[0] * ctx.macs
        layer.tally.transposed += max(passes[1] - 1, 0) * ctx.macs  # one is the backward's own
        if layer.as_gradient:
            r = r / stabilised(x, GRADIENT_STABILIZER)
        return r, None, None, None, None, None


@dataclass
class Tally:
    """Multiply-adds of the rule layers: in the model's forward, and in the rules' passes beyond a
    forward and backward (the layers again forward with other weights or inputs, and transposed
    more than once).
    """

    model: int = 0
    forwards: int = 0
    transposed: int = 0
    others: int = 0  # multiply-adds of the model's calls without a rule (a transformer's attention)

    def note(self, images: int) -> None:
        """Note the rules' passes since the last note as the model's own work (`note_passes`), in
        images' worth: each layer's forward again is its share of a forward, each transposed pass
        beyond the first its share of a backward (a forward+backward less a forward).
        """
        if self.model:
            whole = self.model + self.others
            forwards, transposed = self.forwards / whole, self.transposed / whole
            note_passes(forwards=images * (forwards - transposed), backwards=images * transposed)
        self.model = self.forwards = self.transposed = self.others = 0


def _input_vjp(func: Any, rest: dict, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """`g` through the transpose of the layer's linear map with weights `w` (which does not depend
    on `x`, only on its shape): the input's gradient, without running the layer forward.
    """
    if func is F.linear:
        return g @ w
    n, padding = CONVS[func], rest["padding"]
    if isinstance(padding, str):  # "same" or "valid": autograd works out the padding
        with torch.enable_grad():
            a = torch.zeros_like(x).requires_grad_(True)
            (grad,) = torch.autograd.grad(func(a, w, None, **rest), a, g)
        return grad
    return torch.ops.aten.convolution_backward(
        g, x, w, None, _ntuple(rest["stride"], n), _ntuple(padding, n), _ntuple(rest["dilation"], n),
        False, [0] * n, rest["groups"], [True, False, False],
    )[0]  # fmt: skip


def _ntuple(v: Any, n: int) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(i) for i in v]


def call_rest(func: Any, args: tuple, kwargs: dict) -> dict:
    """A convolution's or linear layer's arguments after input, weight and bias, by name."""
    if func is F.linear:
        return {}
    names = ("stride", "padding", "dilation", "groups")
    rest = dict(zip(names, args[3:], strict=False)) | {k: v for k, v in kwargs.items() if k in names}
    return {"stride": 1, "padding": 0, "dilation": 1, "groups": 1} | rest


class _Passed(torch.autograd.Function):
    """An element-wise activation (or a BatchNorm not merged into a layer) whose relevance passes
    through unchanged (zennit's `Pass`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, call: Callable[[], torch.Tensor]) -> torch.Tensor:  # noqa: ARG004
        return call()

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, None]:
        return relevance, None


class _Normed(torch.autograd.Function):
    """An average pooling (or a mean) whose relevance each value gets by its share (zennit's `Norm`):
    `x * J^T(R / z)`, not the gradient's even share, which would hand relevance to values of zero.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        ctx.func, ctx.args, ctx.kwargs = func, args, kwargs
        y = func(x, *args, **kwargs)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        x, y = ctx.saved_tensors
        with torch.enable_grad():
            a = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(ctx.func(a, *ctx.args, **ctx.kwargs), a, relevance / stabilised(y))
        return x * g, None, None, None


ACTIVATIONS = frozenset({
    F.relu, F.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.elu, F.elu_, F.selu, F.celu, F.leaky_relu,
    F.leaky_relu_, F.gelu, F.silu, F.mish, F.softplus, F.hardswish, F.hardsigmoid, F.logsigmoid,
    F.softsign, F.tanhshrink, F.hardshrink, F.softshrink, F.threshold, F.rrelu, F.prelu, F.sigmoid,
    F.tanh, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.selu, torch.celu, torch.rrelu,
    torch.prelu, torch.threshold, _T.relu, _T.relu_, _T.sigmoid, _T.tanh,
})  # fmt: skip
_AVG_POOLS = frozenset({
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
})  # fmt: skip


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
        share = relevance / stabilised(z)
        rb = b * share
        return _reduced(a * share, a), _reduced(-rb if ctx.flip else rb, b), None


def stabilised(z: torch.Tensor, by: float = STABILIZER) -> torch.Tensor:
    """Zennit's stabiliser: `z` moved away from zero by `by`, on its own side (zero: up)."""
    return torch.where(z >= 0, z + by, z - by)


def _reduced(r: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`r` summed over the dimensions along which `like` was broadcast."""
    if r.shape == like.shape:
        return r
    extra = r.dim() - like.dim()
    dims = [i for i in range(r.dim()) if i < extra or like.shape[i - extra] == 1 and r.shape[i] != 1]
    return r.sum(dims, keepdim=True).reshape(like.shape)


_INPLACE = {
    F.relu_: F.relu, F.hardtanh_: F.hardtanh, F.elu_: F.elu, F.leaky_relu_: F.leaky_relu,
    torch.relu_: torch.relu, _T.relu_: torch.relu,
}  # fmt: skip


_NON_NEGATIVE = frozenset({
    F.relu, F.relu_, F.relu6, torch.relu, torch.relu_, _T.relu, _T.relu_, F.sigmoid, torch.sigmoid,
    _T.sigmoid, F.softplus, F.hardsigmoid,
})  # fmt: skip
_KEEP_SIGN = frozenset({
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, torch.flatten, _T.flatten, _T.view, _T.reshape, torch.reshape, F.dropout,
    _T.contiguous, torch.mean, _T.mean,
})  # fmt: skip


def _non_negative_out(func: Any, args: tuple, kwargs: dict, from_non_negative: bool) -> bool:
    """Whether a call's output has no negative value: a ReLU's (a hardtanh's with `min_val >= 0`),
    or a pooling, padding with zeros, mean or reshape of a tensor without one.
    """
    if func in _NON_NEGATIVE:
        return True
    if func is F.hardtanh:
        low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        return float(low) >= 0
    if func is F.pad:
        return from_non_negative and _zero_padding(args, kwargs)
    return from_non_negative and (func in _KEEP_SIGN or func in _AVG_POOLS)


def _zero_padding(args: tuple, kwargs: dict) -> bool:
    """Whether an `F.pad` call pads with zeros."""
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    value = args[3] if len(args) > 3 else kwargs.get("value")
    return mode == "constant" and not value


def out_of_place(func: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """An activation call made out of place (`inplace=False`, `relu_` as `relu`): the tensor it would
    overwrite may be kept for a rule's backward.
    """
    func = _INPLACE.get(func, func)
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):  # a builtin: no `inplace` to set
        return func, args, kwargs
    if bound.arguments.get("inplace"):
        bound.arguments["inplace"] = False
    return func, bound.args, bound.kwargs


class _Branches(Following):
    """Follows what depends on the input through the forward, and gives each call its LRP rule:
    a convolution or linear layer in `layers` (by its weight) its layer's rule through `Relevant`,
    a BatchNorm merged into one (by its running mean, in `merged`) the identity, an activation or
    another BatchNorm `_Passed`, an average pooling or a mean `_Normed`, the sum of two
    dependent tensors `_BranchSum`; anything else its gradient. `layers=None` only checks: it raises
    `NotHandled` at a product of two dependent tensors, or a normalisation of one, naming it and
    `where()` it happened.
    """

    def __init__(
        self, start: torch.Tensor, layers: dict[int, Layer] | None = None,
        merged: frozenset[int] = frozenset(), where: Callable[[], str] = lambda: "",
    ) -> None:  # fmt: skip
        super().__init__(start)
        self.layers, self.merged, self.where = layers, merged, where
        self.padded: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor, Any]] = {}
        self.signless: dict[int, weakref.ref[torch.Tensor]] = {}

    def _inside(self, x: torch.Tensor) -> torch.Tensor | None:
        """One where `x` holds values of the tensor it zero-padded (when it was), zero in the padding."""
        seen = self.padded.get(id(x))
        if seen is None or seen[0]() is not x:
            return None
        return F.pad(torch.ones_like(seen[1]), seen[2])

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
        out = self._ruled(func, n, args, kwargs) if self.layers is not None else None
        if out is None:
            out = func(*args, **kwargs)
        self.follow(out)
        if (
            self.layers is not None
            and isinstance(out, torch.Tensor)
            and _non_negative_out(func, args, kwargs, bool(args) and self.non_negative(args[0]))
        ):
            self.signless[id(out)] = weakref.ref(out)
        return out

    def non_negative(self, x: Any) -> bool:
        """Whether `x` is known to hold no negative value (made by a ReLU, pooled or padded from one)."""
        seen = self.signless.get(id(x))
        return seen is not None and seen() is x

    def _ruled(self, func: Any, n: int, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The call with its rule, or None where its gradient is its rule."""
        assert self.layers is not None
        first = args[0] if args else None
        if not self.depends(first):
            return None
        if func in CONVS or func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            layer = self.layers.get(id(weight))
            if layer is None:
                return None
            assert isinstance(first, torch.Tensor)
            inside = self._inside(first) if layer.rule.name in ("flat", "z_box") else None
            rest = call_rest(func, args, kwargs)
            return Relevant.apply(first, layer, func, rest, inside, self.non_negative(first))
        if func is F.pad and _zero_padding(args, kwargs):
            assert isinstance(first, torch.Tensor)
            out = func(*args, **kwargs)
            self.padded[id(out)] = (weakref.ref(out), first, args[1] if len(args) > 1 else kwargs["pad"])
            return out
        if func is F.batch_norm:
            running_mean = args[1] if len(args) > 1 else kwargs.get("running_mean")
            if id(running_mean) in self.merged:
                return first
            return _Passed.apply(first, lambda: func(*args, **kwargs))
        if func in ACTIVATIONS and n == 1:
            func, args, kwargs = out_of_place(func, args, kwargs)
            return _Passed.apply(first, lambda: func(*args, **kwargs))
        if func in _AVG_POOLS:
            return _Normed.apply(first, func, args[1:], kwargs)
        mean = _mean_dims(args, kwargs) if func in _MEANS else None
        if mean is not None:  # a global pool written as a mean: average pooling's rule
            x, dims, keepdim = mean
            return _Normed.apply(x, torch.mean, (dims,), {"keepdim": keepdim})
        if n > 1 and func in _ADDITIONS and len(args) == 2 and not kwargs:
            # In place (`out += x`) too: the sum is a new tensor, which the model's `out = out + x` names.
            name = call_name(func)
            a, b = (args[1], args[0]) if "rsub" in name else args
            return _BranchSum.apply(a, b, -1.0 if "sub" in name else 1.0)
        return None


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
            "residual sums (VGG, ResNet, EfficientNet-Lite, the small and shapes CNNs); for a transformer, "
            "attn_lrp"
        )


def _why_not(model: nn.Module, probe: torch.Tensor) -> str | None:
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
        with torch.no_grad(), _Branches(probe, where=where):
            plain = model(probe)
    except NotHandled as e:
        return str(e)
    finally:
        for h in hooks:
            h.remove()
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and not isinstance(module, _WITH_RULES):
            return f"{type(module).__name__} with parameters (module {name!r})"
    rule = Rule("epsilon")
    layers, merged = _layers(model, rule, rule, None, Tally())
    with torch.no_grad(), _Branches(probe, layers, frozenset(merged)):
        ruled = model(probe)
    off = float((ruled - plain).abs().max() / plain.abs().max().clamp(min=1e-12))
    if off > 1e-4:
        return (
            "BatchNorm that does not follow the convolution or linear layer assigned before it (merged "
            f"into that layer, as zennit's canonizer merges by the order of assignment, the logits move by "
            f"{off:.1e} of their largest)"
        )
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
    conv, linear, first = _rules(composite, epsilon, gamma, pixel_range, inputs)
    _check_handled(model, inputs[:1])
    tally = Tally()
    layers, merged = _layers(model, conv, linear, first, tally)

    def relevance(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            with _Branches(x, layers, frozenset(merged)):  # the rules act in the backward
                logits = model(x)
            seed = torch.zeros_like(logits).scatter_(1, t[:, None], logits.detach().gather(1, t[:, None]))
            (r,) = torch.autograd.grad(logits, x, grad_outputs=seed)
        tally.note(x.shape[0])
        return r

    return chunked(relevance, inputs, target, chunk_size)
