"""DeepLIFT's multipliers in one pass of the model (`rescale`), for `methods.deeplift`.

DeepLIFT's attribution is `(x - x0) * m`, where the multiplier `m` is the gradient of the target
logit with each nonlinearity's derivative replaced by its secant from the baseline's value,
`(f(z) - f(z0)) / (z - z0)` (its derivative where `|z - z0| < 1e-10`), and max pooling's by the
rule Captum uses for it. `rescale` computes `m` in three passes: one forward of the baselines alone
(without autograd; once per call, for every image), which records what went into and came out of
each call of a nonlinearity, then one forward and one backward of the images, in which each such
call is paired, in call order, with the baseline's and given the secant as its derivative. The
calls are seen through a torch function mode (`_Pairing`), not through module hooks, so a
nonlinearity called as a function, or a module called twice, gets its rule too.

What it covers: element-wise `relu`, `relu6`/`hardtanh`, `leaky_relu`, `elu`, `sigmoid`, `tanh` and
`softplus`, 2-d max pooling, and the operations through which the multiplier is the gradient:
convolutions, linear layers, BatchNorm in eval mode, sums, averages, pooling by averaging, and
products or quotients with at most one factor that depends on the input. Anything else raises
`NotCovered`, naming the call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from methods.common import like_inputs
from methods.follow import Following, call_name, method_name

EPS = 1e-10  # Captum's: below it, a difference in a nonlinearity's input counts as none


class NotCovered(Exception):  # noqa: N818 (a reason to take Captum's path, not an error)
    """The model calls something the rescale pass does not cover (named in the message)."""


# Element-wise nonlinearities, as functions and Tensor methods.
_ELEMENTWISE = frozenset(
    {F.relu, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.softplus, torch.relu, torch.sigmoid, torch.tanh,
     torch.Tensor.relu, torch.Tensor.sigmoid, torch.Tensor.tanh}
)  # fmt: skip
# Through these the multiplier is the gradient whatever their operands (sums and rearrangements);
# Tensor methods are named, functions are themselves.
_ADDITIVE_METHODS = {
    "add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__", "__rsub__",
    "neg", "__neg__", "sum", "mean", "flatten", "view", "view_as", "reshape", "reshape_as", "permute",
    "transpose", "contiguous", "squeeze", "unsqueeze", "expand", "expand_as", "chunk", "split",
    "__getitem__", "clone", "to", "float", "double", "half", "bfloat16", "type_as", "dim", "size",
    "numel", "__len__", "__get__", "__format__", "__repr__", "detach", "requires_grad_", "is_contiguous",
}  # fmt: skip
_ADDITIVE_FUNCTIONS = {
    torch.add, torch.sub, torch.neg, torch.sum, torch.mean, torch.flatten, torch.reshape, torch.cat,
    torch.stack, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.pad, F.interpolate, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
}  # fmt: skip
# Linear in each operand: the multiplier is the gradient while at most one operand depends on the input.
_BILINEAR_METHODS = {"mul", "mul_", "__mul__", "__imul__", "__rmul__", "matmul", "__matmul__", "mm", "bmm"}
_BILINEAR_FUNCTIONS = {
    torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
    torch.conv_transpose3d, F.linear, torch.mul, torch.matmul, torch.mm, torch.bmm, torch.einsum,
    F.batch_norm,
}  # fmt: skip
_QUOTIENTS = {"div", "div_", "__truediv__", "__itruediv__", torch.div, torch.true_divide}


@dataclass
class _Call:
    """A nonlinearity's call in the baselines' forward: what went in and came out, and the
    derivative there (or the argmax positions, for max pooling), `[K, ...]` for K baselines.
    """

    func: Any
    z0: torch.Tensor
    y0: torch.Tensor
    d0: torch.Tensor | None = None  # an element-wise function's derivative at z0
    indices0: torch.Tensor | None = None

    def take(self, pairs: slice | torch.Tensor) -> _Call:
        """The call as the baselines of a chunk's image-baseline pairs saw it: `[n, ...]`, one per
        pair, from a slice of the baselines (a view) or their indices (a copy).
        """
        d0, indices0 = self.d0, self.indices0
        return _Call(
            self.func, self.z0[pairs], self.y0[pairs], None if d0 is None else d0[pairs],
            None if indices0 is None else indices0[pairs],
        )  # fmt: skip


class _Pairing(Following):
    """Records the nonlinearities' calls (`calls=None`: the baselines' forward) or gives each call
    the derivative DeepLIFT assigns it (`calls` from that forward, taken for the image-baseline
    pairs being forwarded: one baseline per pair, or one for all). Raises `NotCovered` at a call
    that neither the rules nor the pass-through sets cover.
    """

    def __init__(self, start: torch.Tensor, calls: list[_Call] | None = None) -> None:
        super().__init__(start)
        self.recording = calls is None
        self.calls: list[_Call] = [] if calls is None else calls
        self.next = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        n_derived = self.dependent(args, kwargs)
        if n_derived == 0:
            return func(*args, **kwargs)  # the model's own constants: nothing to rescale
        if func in _ELEMENTWISE:
            out = self._elementwise(func, args, kwargs)
        elif func is F.max_pool2d:
            out = self._max_pool(args, kwargs)
        else:
            self._check_linear(func, args, kwargs, n_derived)
            out = func(*args, **kwargs)
        self.follow(out)
        return out

    def _check_linear(self, func: Any, args: tuple, kwargs: dict, n_derived: int) -> None:
        name = method_name(func)
        if name in _ADDITIVE_METHODS or (name is None and func in _ADDITIVE_FUNCTIONS):
            if func in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d) and _bound(func, args, kwargs).get(
                "training", True
            ):
                raise NotCovered(f"{call_name(func)} in training mode")
            return
        if name in _BILINEAR_METHODS or (name is None and func in _BILINEAR_FUNCTIONS):
            if n_derived > 1:
                raise NotCovered(f"{call_name(func)} of two tensors that depend on the input")
            if func is F.batch_norm and _bound(func, args, kwargs).get("training", False):
                raise NotCovered("batch_norm in training mode")
            return
        if name in _QUOTIENTS or (name is None and func in _QUOTIENTS):
            divisor = args[1] if len(args) > 1 else kwargs.get("other")
            if isinstance(divisor, torch.Tensor) and self.depends(divisor):
                raise NotCovered(f"{call_name(func)} by a tensor that depends on the input")
            return
        raise NotCovered(call_name(func))

    def _paired(self, func: Any, z: torch.Tensor) -> _Call:
        if self.next >= len(self.calls) or self.calls[self.next].func is not func:
            raise NotCovered("a forward whose nonlinearities differ between the baselines and the images")
        call = self.calls[self.next]
        self.next += 1
        if tuple(call.z0.shape[1:]) != tuple(z.shape[1:]):
            raise NotCovered("a forward whose shapes differ between the baselines and the images")
        return call

    def _elementwise(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        z, f = args[0], _out_of_place(func, args, kwargs)

        if self.recording:
            with torch.enable_grad():
                z0 = z.detach().requires_grad_(True)
                y0 = f(z0)
                (d0,) = torch.autograd.grad(y0.sum(), z0)
            self.calls.append(_Call(func, z0.detach(), y0.detach(), d0))
            return y0.detach()
        return _Rescaled.apply(z, self._paired(func, z), f)

    def _max_pool(self, args: tuple, kwargs: dict) -> torch.Tensor:
        settings = _bound(F._max_pool2d, args, kwargs)  # type: ignore[attr-defined]
        z = settings.pop("input")
        if settings.pop("return_indices"):
            raise NotCovered("max_pool2d with return_indices")
        pool = _Pool(
            _pair(settings["kernel_size"]), _pair(settings["stride"] or settings["kernel_size"]),
            _pair(settings["padding"]), _pair(settings["dilation"]), bool(settings["ceil_mode"]),
        )  # fmt: skip
        if self.recording:
            y0, indices0 = pool.forward(z)
            self.calls.append(_Call(F.max_pool2d, z.detach(), y0, indices0=indices0))
            return y0
        return _MaxPooled.apply(z, self._paired(F.max_pool2d, z), pool)


def _out_of_place(func: Any, args: tuple, kwargs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The call `func(*args, **kwargs)` as a function of its input, with its other settings, whether
    given by name or by position (`nn.Softplus` passes beta and threshold by position), never in place.
    """
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):  # a builtin without a signature (none of them has `inplace`)
        return lambda t: func(t, *args[1:], **kwargs)
    settings = {k: v for k, v in list(bound.arguments.items())[1:] if k != "inplace"}
    return lambda t: func(t, **settings)


def _bound(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):  # a builtin with no signature: its settings are keywords
        return {"input": args[0], **kwargs}
    bound.apply_defaults()
    return dict(bound.arguments)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Rescaled(torch.autograd.Function):
    """An element-wise nonlinearity whose derivative is DeepLIFT's secant from the paired baseline's."""

    @staticmethod
    def forward(
        ctx: Any, z: torch.Tensor, call: _Call, f: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        y = f(z)
        dz = z - call.z0
        m = (y - call.y0).div_(dz)
        # Where the input did not move, the derivative (as Captum): z = z0 there, so the baseline's.
        m = torch.where(dz.abs_() < EPS, call.d0, m)  # type: ignore[arg-type]
        ctx.save_for_backward(m)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (m,) = ctx.saved_tensors
        return grad * m, None, None


@dataclass(frozen=True)
class _Pool:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.max_pool2d(z, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode, True)

    def spread(self, g: torch.Tensor, indices: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """`g` written back to the positions its window's maximum came from (one per position,
        as `max_unpool2d` writes, which is what Captum's rule does).
        """
        return F.max_unpool2d(g, indices, self.kernel, self.stride, self.padding, list(size))


class _MaxPooled(torch.autograd.Function):
    """2-d max pooling with the multiplier of Captum's `maxpool2d` rule: the change of the pooled
    output, split at the larger of the two maxima, sent back to where each maximum came from, over
    the change of the input; the plain gradient where the input did not move.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, call: _Call, pool: _Pool) -> torch.Tensor:
        y, indices = pool.forward(z)
        ctx.save_for_backward(z, y, indices)
        ctx.call, ctx.pool = call, pool
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        z, y, indices = ctx.saved_tensors
        call, pool = ctx.call, ctx.pool
        top = torch.maximum(y, call.y0)
        assert call.indices0 is not None  # recorded with the call
        indices0 = call.indices0.expand_as(indices)
        moved = pool.spread(grad * (top - call.y0), indices, z.shape[2:]) + pool.spread(
            grad * (y - top), indices0, z.shape[2:]
        )
        dz = z - call.z0
        plain = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, z, list(pool.kernel), list(pool.stride), list(pool.padding), list(pool.dilation),
            pool.ceil_mode, indices,
        )  # fmt: skip
        return torch.where(dz.abs() < EPS, plain, moved / dz), None, None


def rescale(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, baselines: torch.Tensor, chunk: int
) -> torch.Tensor:
    """DeepLIFT's attributions of `inputs` `[B, C, H, W]` against each of `baselines` `[K, C, H, W]`,
    averaged over the baselines (DeepLIFT-SHAP; DeepLIFT for one baseline): `[B, C, H, W]`.

    The `B * K` image-baseline pairs (image-major: pair `p` is image `p // K` against baseline
    `p % K`) are forwarded `chunk` at a time, so that every forward but the last is full whatever
    `K` is; each image's attributions are summed in baseline order. Raises `NotCovered` where the
    model calls what the rule does not cover.
    """
    k = baselines.shape[0]
    with torch.no_grad(), _Pairing(baselines) as recorder:
        model(baselines)
    calls = recorder.calls
    chunk = max(1, int(chunk))
    total = torch.zeros_like(inputs)
    for lo in range(0, inputs.shape[0] * k, chunk):
        hi = min(lo + chunk, inputs.shape[0] * k)
        first, last = lo // k, (hi - 1) // k  # the images this chunk's pairs belong to
        pairs = torch.arange(lo, hi, device=inputs.device)
        which: slice | torch.Tensor
        if k == 1:
            x, which = inputs[lo:hi], slice(0, 1)  # one baseline for all: broadcast, no copies
        elif first == last:
            x, which = inputs[first : first + 1], slice(lo % k, lo % k + hi - lo)  # one image
        else:
            x, which = inputs[pairs // k], pairs % k
        empty = torch.empty((hi - lo, *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device)
        copies = like_inputs(empty, inputs).copy_(x)
        t = target[(pairs // k).to(target.device)]
        attributions = _against(model, copies, t, [c.take(which) for c in calls], baselines[which])
        for b in range(first, last + 1):  # each image's pairs, in baseline order
            total[b] += attributions[max(lo, b * k) - lo : min(hi, (b + 1) * k) - lo].sum(0)
    return total / k


def _against(
    model: nn.Module, copies: torch.Tensor, t: torch.Tensor, calls: list[_Call], baselines: torch.Tensor
) -> torch.Tensor:
    """Each image-baseline pair's attributions, `[n, C, H, W]` for `n` pairs (`copies`, `t`: each
    pair's image, a tensor of its own, and class; `baselines` and `calls`: each pair's baseline and
    its recorded calls, or one for all), from one forward and one backward.
    """
    copies.requires_grad_(True)
    with torch.enable_grad():
        pairing = _Pairing(copies, calls)
        with pairing:
            logits = model(copies)
        if pairing.next != len(calls):
            raise NotCovered("a forward whose nonlinearities differ between the baselines and the images")
        score = logits.gather(1, t[:, None]).sum()
        (m,) = torch.autograd.grad(score, copies)
    return (copies.detach() - baselines) * m
