"""Class activation maps through Captum: Grad-CAM and guided Grad-CAM."""

from __future__ import annotations

import torch
from captum.attr import GuidedGradCam, LayerAttribution, LayerGradCam
from torch import nn

from methods.common import chunked, method


def _layer(model: nn.Module, layer: str) -> nn.Module:
    try:
        return model.get_submodule(layer)
    except AttributeError as e:
        children = [name for name, _ in model.named_children()]
        raise ValueError(
            f"layer={layer!r} is not a submodule of {type(model).__name__}; "
            f"give a qualified name such as one of {children} (see model.cam_layer)"
        ) from e


@method(eager_only=True)
def grad_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    layer: str,
    chunk_size: int = 16,
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391, eq. 1-2): ReLU of the layer's activations
    weighted by their spatially averaged gradients, upsampled bilinearly to the input size.

    `layer` is a qualified submodule name (the model config's `cam_layer`). `[B, 1, H, W]`.
    """
    explainer = LayerGradCam(model, _layer(model, layer))
    size = tuple(inputs.shape[2:])

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
    chunk_size: int = 16,
) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017, section 3.1): guided backprop times the upsampled
    Grad-CAM map. `[B, C, H, W]`.
    """
    explainer = GuidedGradCam(model, _layer(model, layer))

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return explainer.attribute(x, target=t, interpolate_mode="bilinear")

    return chunked(attribute, inputs, target, chunk_size)
