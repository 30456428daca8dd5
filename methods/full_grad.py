"""FullGrad (Srinivas and Fleuret 2019): the input-gradient term and every layer's bias-gradient terms,
each normalised, upsampled bilinearly to the input and summed, as pytorch-grad-cam computes it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from methods.common import Count, chunked, method


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


def _unit_sum(a: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The sum over channels of the maps |w_c| a_c of `a` `[B, C, h, w]` (`a` >= 0; w = 1 without
    `weight` `[C]`), each shifted to 0 and scaled by its range (+1e-7) first, as pytorch-grad-cam's
    FullGrad normalises every term: `[B, 1, h, w]`. |w_c| a_c's range is |w_c| times a_c's.
    """
    low, high = a.amin(dim=(2, 3)), a.amax(dim=(2, 3))  # [B, C]; no copy in either memory format
    k = torch.ones_like(low[0]) if weight is None else weight.abs().to(low.dtype)
    scale = k / (k * (high - low) + 1e-7)  # [B, C]
    b, c, h, w = a.shape
    if a.is_contiguous():  # the weighted sum over channels as a product, on a view of `a`
        summed = scale[:, None, :] @ a.flatten(2)
    else:  # channels-last (or any other layout: copied); one matrix-vector product per image
        rows = a.permute(0, 2, 3, 1).reshape(b, h * w, c)
        summed = torch.stack([torch.mv(rows[i], scale[i]) for i in range(b)])[:, None]
    return summed.view(b, 1, h, w) - (low * scale).sum(dim=1)[:, None, None, None]


class _Scratch:
    """One buffer for the largest output, allocated once the forward has run, that holds |g| of each
    term in turn: on the CPU a fresh tensor of an activation's size costs more in page faults than
    the arithmetic on it.
    """

    def __init__(self) -> None:
        self.numel = 0
        self.buffer: torch.Tensor | None = None

    def abs(self, g: torch.Tensor) -> torch.Tensor:
        dense = g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last)
        if (
            not dense
            or self.buffer is None
            or self.buffer.numel() < g.numel()
            or self.buffer.dtype != g.dtype
        ):
            return g.abs()
        return torch.abs(g, out=self.buffer[: g.numel()].as_strided(g.shape, g.stride()))


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

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Upsampling is linear: the normalised maps of one resolution are summed, then upsampled once.
        by_size: dict[tuple[int, ...], torch.Tensor] = {}
        scratch = _Scratch()

        def add(bias: torch.Tensor, g: torch.Tensor) -> None:
            # Each term made while the backward runs (the gradient itself flows on, unchanged).
            term = _unit_sum(scratch.abs(g.detach()), bias).float()
            key = tuple(term.shape[2:])
            by_size[key] = term if key not in by_size else by_size[key] + term

        def keep(module: nn.Module, _i: Any, out: torch.Tensor) -> None:
            # A tensor hook: the gradient of this output even if a ReLU later overwrites it in place;
            # a layer that the target logit does not depend on gets none and adds nothing.
            out.register_hook(partial(add, biases[module]))
            scratch.numel = max(scratch.numel, out.numel())

        hooks = [m.register_forward_hook(keep) for m in biases]
        try:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                score = model(x).gather(1, t[:, None]).sum()
                scratch.buffer = x.new_empty(scratch.numel)
                (gx,) = torch.autograd.grad(score, x)
        finally:
            for h in hooks:
                h.remove()
        total = _unit_sum((x.detach() * gx).abs_()).float()
        for term in by_size.values():
            total = total + F.interpolate(term, size, mode="bilinear", align_corners=False)
        return total

    return chunked(attribute, inputs, target, chunk_size)
