"""FullGrad (Srinivas and Fleuret 2019): the input-gradient term and every layer's bias-gradient terms,
each normalised, upsampled bilinearly to the input and summed, as pytorch-grad-cam computes it.

Every term is made while the backward runs, from a gradient just written (so still in the cache): on
the CPU in two compiled passes over it (`methods.full_grad_cpu`), elsewhere in torch's ops.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType
from typing import Any

import numba
import torch
from torch import nn
from torch.nn import functional as F

from methods import full_grad_cpu
from methods.common import Count, chunked, method, numba_threads

# A reduction over the positions of a channels-last map runs at memory speed once its rows hold this
# many values; rows of fewer channels (16 or 24 in an early layer) run up to 10 times slower.
_ROW = 256


def _bias(module: nn.Module) -> torch.Tensor | None:
    """What a layer adds to each channel: a convolution's bias; BatchNorm's (in eval mode)
    beta - mean * gamma / std.
    """
    if isinstance(module, nn.Conv2d):
        return None if module.bias is None else module.bias.detach()
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if isinstance(module, nn.BatchNorm2d) and mean is not None and var is not None:
        gamma = module.weight.detach() if module.weight is not None else torch.ones_like(mean)
        beta = module.bias.detach() if module.bias is not None else torch.zeros_like(mean)
        return beta - mean * gamma / torch.sqrt(var + module.eps)
    return None


def _scale(low: torch.Tensor, high: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Each map's factor `[B, C]`: |w_c| / (|w_c| (high - low) + 1e-7), the range of |w_c| a_c being
    |w_c| times a_c's (w = 1 without `weight` `[C]`).
    """
    k = torch.ones_like(low[0]) if weight is None else weight.abs().to(low.dtype)
    return k / (k * (high - low) + 1e-7)


def _unit_sum(g: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The sum over channels of the maps |w_c g_c| of `g` `[B, C, h, w]` (w = 1 without `weight` `[C]`),
    each shifted to 0 and scaled by its range (+1e-7) first, as pytorch-grad-cam's FullGrad
    normalises every term: `[B, 1, h, w]`, in `g`'s dtype.
    """
    b, c, h, w = g.shape
    kernels = _compiled(g)
    if kernels is not None:  # the CPU: two passes over g in one call (`methods.full_grad_cpu`)
        k = torch.ones(c, dtype=g.dtype) if weight is None else weight.abs().to(g.dtype)
        out = torch.empty(b, h * w, dtype=g.dtype)
        if c >= 8 and g.is_contiguous(memory_format=torch.channels_last):  # rows of channels: a view
            rows = g.permute(0, 2, 3, 1).reshape(b, h * w, c)
            kernels.term_rows(rows.numpy(), k.numpy(), out.numpy(), 4 * numba.get_num_threads())
        else:  # planes (an input's few channels copied out of channels-last: rows that short run slowly)
            planes = g.contiguous().view(b, c, h * w)
            kernels.term_planes(planes.numpy(), k.numpy(), out.numpy(), 1024)
        return out.view(b, 1, h, w)
    a = g.abs()
    low, high = a.amin(dim=(2, 3)), a.amax(dim=(2, 3))
    a -= low[:, :, None, None]  # before the scaling: a channel of one value gives 0, not a rounding error
    return torch.einsum("bc,bchw->bhw", _scale(low, high, weight), a)[:, None]


def _compiled(g: torch.Tensor) -> ModuleType | None:
    """`methods.full_grad_cpu` for a float32 or float64 CPU map laid out channels-last or contiguous,
    else None: other devices, dtypes and layouts take torch's ops.
    """
    if g.device.type != "cpu" or g.dtype not in (torch.float32, torch.float64) or g.requires_grad:
        return None
    if not (g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last)):
        return None
    return full_grad_cpu


@method(eager_only=True)
def full_grad(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, chunk_size: Count = 16
) -> torch.Tensor:
    """FullGrad (Srinivas and Fleuret 2019, arXiv:1905.00780, eq. 5-6), as pytorch-grad-cam computes
    it: |x * dy/dx| for each input channel plus, for every Conv2d with a bias and every BatchNorm2d,
    |b_c * dy/dz_c| for each of its channels c (z its output, b what it adds to the channel), each
    map normalised to [0, 1] on its own (`_unit_sum`) and upsampled bilinearly to the input, all summed.
    Reads every such layer, not one; one forward and one backward. `[B, 1, H, W]`.
    """
    size = tuple(inputs.shape[2:])
    biases = {m: b for m in model.modules() if (b := _bias(m)) is not None}
    if inputs.device.type == "cpu":  # the compiled terms on the threads torch uses
        numba_threads()

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Upsampling is linear: the normalised maps of one resolution are summed, then upsampled once.
        by_size: dict[tuple[int, ...], torch.Tensor] = {}

        def add(bias: torch.Tensor, slot: int, grads: tuple[torch.Tensor | None, ...]) -> None:
            g = grads[slot]
            if g is None:  # the target logit does not depend on this output
                return
            term = _unit_sum(g.detach(), bias).float()
            key = tuple(term.shape[2:])
            by_size[key] = term if key not in by_size else by_size[key] + term

        def keep(module: nn.Module, _i: Any, out: torch.Tensor) -> None:
            # The gradient of this output as the node that made it receives it (so before a ReLU
            # that overwrote `out` in place, if one did): a hook on the node, not on the tensor,
            # is the same gradient at less cost to the backward.
            if out.grad_fn is not None:
                out.grad_fn.register_prehook(partial(add, biases[module], out.output_nr))

        hooks = [m.register_forward_hook(keep) for m in biases]
        try:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                score = model(x).gather(1, t[:, None]).sum()
                (gx,) = torch.autograd.grad(score, x)
        finally:
            for h in hooks:
                h.remove()
        total = _unit_sum(x.detach() * gx).float()
        for term in by_size.values():
            total = total + F.interpolate(term, size, mode="bilinear", align_corners=False)
        return total

    return chunked(attribute, inputs, target, chunk_size)
