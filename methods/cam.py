"""Class activation maps: Grad-CAM and guided Grad-CAM through Captum for convolutional layers, and
Grad-CAM of layers whose output is laid out otherwise (a Swin stage's `[B, H, W, C]`, a ViT
block's tokens `[B, 1 + h*w, C]`), taken to `[B, C, h, w]` first; the gradient CAM family
(Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM) as rules on one capture of a layer. The CAMs of forwards
alone are in `methods.cam_forward`, FullGrad in `methods.full_grad`. Every map is upsampled to the
input bilinearly, as Grad-CAM's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from captum.attr import GuidedBackprop, GuidedGradCam, LayerAttribution, LayerGradCam
from torch import nn

from methods.common import Count, chunked, method


def submodule(model: nn.Module, layer: str) -> nn.Module:
    """The model's submodule `layer` (a qualified name), or a message naming the model's children."""
    try:
        return model.get_submodule(layer)
    except AttributeError as e:
        children = [name for name, _ in model.named_children()]
        raise ValueError(
            f"layer={layer!r} is not a submodule of {type(model).__name__}; "
            f"give a qualified name such as one of {children} (see model.cam_layer)"
        ) from e


def logits_and_output(
    model: nn.Module, module: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and the module's output in one forward of the model on `x`."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen[0]


def output_of(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's output in a forward of the model on `x`."""
    return logits_and_output(model, module, x)[1]


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
    if layout != "nchw":  # Captum's LayerGradCam takes [B, C, h, w] only: the same sums on to_nchw
        return _cam_family(grad_cam_rule, model, inputs, target, layer, layout, chunk_size)
    explainer = LayerGradCam(model, submodule(model, layer))

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
    Grad-CAM map. `[B, C, H, W]`. Captum's `GuidedGradCam` on a layer with `nchw` output; on another
    layout (a transformer's tokens) the same product of this module's `grad_cam` and Captum's
    `GuidedBackprop`, as Captum's computes it.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout != "nchw":
        cam = grad_cam(model, inputs, target, layer=layer, layout=layout, chunk_size=chunk_size)
        guided = GuidedBackprop(model)
        return chunked(lambda x, t: guided.attribute(x, target=t), inputs, target, chunk_size) * cam
    explainer = GuidedGradCam(model, submodule(model, layer))

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return explainer.attribute(x, target=t, interpolate_mode="bilinear")

    return chunked(attribute, inputs, target, chunk_size)


# The gradient CAM family: one capture of a layer's activations A and of the gradient g of each image's
# target logit with respect to them, then a rule that weighs them into a map at the layer's resolution.
# The ReLU and Grad-CAM's bilinear upsampling follow, as in `grad_cam`; each map equals
# pytorch-grad-cam's before its upsampling and min-max scaling (tests/test_cams.py).


def layer_capture(
    model: nn.Module, module: nn.Module, layout: str, x: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output A and d(logit of each image's target)/dA, both `[B, C, h, w]` (`to_nchw`).

    The target logits are summed before one backward pass: in eval mode an image's logit depends on
    its own activations only, so each image's gradient is its own.
    """
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            grad = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), seen[0])[0]
    finally:
        handle.remove()
    return to_nchw(seen[0].detach(), layout), to_nchw(grad, layout)


def _spatial_sum(a: torch.Tensor) -> torch.Tensor:
    return a.sum(dim=(2, 3), keepdim=True)


def grad_cam_rule(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM's (eq. 1-2): channel weights the spatial mean of g, as Captum's `LayerGradCam`."""
    return (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True)


def grad_cam_plus_plus_rule(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018, arXiv:1710.11063, eq. 19 with the ReLU of eq. 7): channel
    weights sum_ij relu(g) alpha_ij with alpha = g^2 / (2 g^2 + sum_ab A_ab g^3), 0 where g is 0;
    1e-6 in the denominator where it vanishes (as pytorch-grad-cam).
    """
    g2 = g * g
    alpha = g2 / (2 * g2 + _spatial_sum(a) * g2 * g + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return (_spatial_sum(torch.relu(g) * alpha) * a).sum(dim=1, keepdim=True)


def xgrad_cam_rule(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020, arXiv:2008.02312, eq. 9): channel weights sum_ij g A / sum_ij A
    (1e-7 added to the sum where it vanishes, as pytorch-grad-cam).
    """
    return (_spatial_sum(g * a / (_spatial_sum(a) + 1e-7)) * a).sum(dim=1, keepdim=True)


def layer_cam_rule(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021, IEEE TIP 30, eq. 5): each position weighted by its own positive
    gradient, sum_c relu(g) A.
    """
    return (torch.relu(g) * a).sum(dim=1, keepdim=True)


def hires_cam_rule(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos and Carin 2020, arXiv:2011.08891, eq. 5): sum_c g A, the element-wise
    product that Grad-CAM averages away.
    """
    return (g * a).sum(dim=1, keepdim=True)


Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RULES: dict[str, Rule] = {
    "grad_cam_plus_plus": grad_cam_plus_plus_rule,
    "xgrad_cam": xgrad_cam_rule,
    "layer_cam": layer_cam_rule,
    "hires_cam": hires_cam_rule,
}


def layer_map(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, layer: str, layout: str, rule: str
) -> torch.Tensor:
    """A CAM of the family at the layer's resolution, `[B, 1, h, w]`, after its ReLU."""
    a, g = layer_capture(model, submodule(model, layer), layout, inputs, target)
    return torch.relu(RULES[rule](a, g))


def _cam_family(
    rule: Rule,
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    layer: str,
    layout: str,
    chunk: int,
) -> torch.Tensor:
    size, module = tuple(inputs.shape[2:]), submodule(model, layer)  # a missing layer named before any pass

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cam = torch.relu(rule(*layer_capture(model, module, layout, x, t)))
        return LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")

    return chunked(attribute, inputs, target, chunk)


@method(eager_only=True)
def grad_cam_plus_plus(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, layer: str, layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """Grad-CAM++ (`grad_cam_plus_plus_rule`) of `layer`, upsampled bilinearly as Grad-CAM. `[B, 1, H, W]`."""
    return _cam_family(grad_cam_plus_plus_rule, model, inputs, target, layer, layout, chunk_size)


@method(eager_only=True)
def xgrad_cam(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, layer: str, layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """XGrad-CAM (`xgrad_cam_rule`) of `layer`, upsampled bilinearly as Grad-CAM. `[B, 1, H, W]`."""
    return _cam_family(xgrad_cam_rule, model, inputs, target, layer, layout, chunk_size)


@method(eager_only=True)
def layer_cam(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, layer: str, layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """LayerCAM (`layer_cam_rule`) of `layer`, upsampled bilinearly as Grad-CAM. `[B, 1, H, W]`."""
    return _cam_family(layer_cam_rule, model, inputs, target, layer, layout, chunk_size)


@method(eager_only=True)
def hires_cam(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, layer: str, layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """HiResCAM (`hires_cam_rule`) of `layer`, upsampled bilinearly as Grad-CAM. `[B, 1, H, W]`."""
    return _cam_family(hires_cam_rule, model, inputs, target, layer, layout, chunk_size)
