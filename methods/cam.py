"""Class activation maps: Grad-CAM and guided Grad-CAM through Captum for convolutional layers, and
Grad-CAM of layers whose output is laid out otherwise (a Swin stage's `[B, H, W, C]`, a ViT
block's tokens `[B, 1 + h*w, C]`), taken to `[B, C, h, w]` first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from captum.attr import GuidedGradCam, LayerAttribution, LayerGradCam
from torch import nn

from methods.common import Count, chunked, method


def _layer(model: nn.Module, layer: str) -> nn.Module:
    try:
        return model.get_submodule(layer)
    except AttributeError as e:
        children = [name for name, _ in model.named_children()]
        raise ValueError(
            f"layer={layer!r} is not a submodule of {type(model).__name__}; "
            f"give a qualified name such as one of {children} (see model.cam_layer)"
        ) from e


LAYOUTS = ("nchw", "nhwc", "tokens")
Layout = Literal["nchw", "nhwc", "tokens"]


def to_nchw(a: torch.Tensor, layout: str) -> torch.Tensor:
    """A layer's output as `[B, C, h, w]`: `nhwc` permuted; `tokens` `[B, N, C]` without the class
    token when `N - 1` is a square (else all `N` tokens, which must be a square), as a `h x h` grid.
    """
    if layout == "nchw":
        return a
    if layout == "nhwc":
        return a.permute(0, 3, 1, 2)
    n = a.shape[1]
    for skip in (1, 0):
        side = math.isqrt(n - skip)
        if side * side == n - skip and side > 0:
            grid = a[:, skip:]
            return grid.transpose(1, 2).reshape(a.shape[0], a.shape[2], side, side)
    raise ValueError(f"a tokens layer's output has {n} tokens, neither a square nor 1 + a square")


def _grad_cam_laid_out(
    model: nn.Module, module: nn.Module, layout: str, size: tuple[int, ...]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Grad-CAM of a layer of any layout: the same sums as Captum's `LayerGradCam`, on `to_nchw`."""

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            with torch.enable_grad():
                logits = model(x)
                grad = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), seen[0])[0]
        finally:
            handle.remove()
        act, grad = to_nchw(seen[0].detach(), layout), to_nchw(grad, layout)
        cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
        return LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")

    return attribute


@method(eager_only=True)
def grad_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    layer: str,
    layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391, eq. 1-2): ReLU of the layer's activations
    weighted by their spatially averaged gradients, upsampled bilinearly to the input size.

    `layer` is a qualified submodule name (the model config's `cam_layer`), `layout` how its output
    is laid out (`nchw`, `nhwc`, `tokens`: the model config's `cam_layout`). `[B, 1, H, W]`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {', '.join(LAYOUTS)}")
    size = tuple(inputs.shape[2:])
    if layout != "nchw":
        return chunked(
            _grad_cam_laid_out(model, _layer(model, layer), layout, size), inputs, target, chunk_size
        )
    explainer = LayerGradCam(model, _layer(model, layer))

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cam = explainer.attribute(x, target=t, relu_attributions=True)
        return LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")

    return chunked(attribute, inputs, target, chunk_size)


@method(eager_only=True)
def guided_grad_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    layer: str,
    layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017, section 3.1): guided backprop times the upsampled
    Grad-CAM map. `[B, C, H, W]`; layers with `nchw` output only.
    """
    if layout != "nchw":
        raise ValueError(
            f"guided_grad_cam needs a layer with [B, C, H, W] output; the model's cam_layout is {layout}"
        )
    explainer = GuidedGradCam(model, _layer(model, layer))

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return explainer.attribute(x, target=t, interpolate_mode="bilinear")

    return chunked(attribute, inputs, target, chunk_size)
