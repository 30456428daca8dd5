"""Gradient-based attribution methods, through Captum (https://captum.ai); SmoothGrad and its
variants are in `methods.noise_tunnel`.

Each returns `[B, C, H, W]` on the inputs' device. `chunk_size` is the number of images (or
image-sample pairs) per forward pass; the harness sets it from the model's best batch size.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from annotated_types import Ge
from captum.attr import (
    GradientShap,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    Saliency,
)
from torch import nn

from methods.common import Count, chunked, method

# Captum's quadrature rules for the path integral of integrated gradients.
Quadrature = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]


@method()
def saliency(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, chunk_size: Count = 16
) -> torch.Tensor:
    """Absolute input gradient of the target logit (Simonyan et al. 2014, arXiv:1312.6034, eq. 2)."""
    explainer = Saliency(model)
    return chunked(lambda x, t: explainer.attribute(x, target=t, abs=True), inputs, target, chunk_size)


@method()
def input_x_gradient(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, chunk_size: Count = 16
) -> torch.Tensor:
    """Input times gradient (Shrikumar et al. 2016, arXiv:1605.01713)."""
    explainer = InputXGradient(model)
    return chunked(lambda x, t: explainer.attribute(x, target=t), inputs, target, chunk_size)


@method(eager_only=True)
def guided_backprop(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, chunk_size: Count = 16
) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2015, arXiv:1412.6806): ReLUs pass only positive
    gradients. Captum rewrites `nn.ReLU` modules; other activations keep their plain gradient.
    """
    explainer = GuidedBackprop(model)
    return chunked(lambda x, t: explainer.attribute(x, target=t), inputs, target, chunk_size)


@method()
def integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    n_steps: Count = 50,
    method: Quadrature = "gausslegendre",
    chunk_size: Count = 16,
) -> torch.Tensor:
    """Integrated gradients from a zero baseline (Sundararajan et al. 2017, arXiv:1703.01365, eq. 1).

    Args:
        model: classifier returning logits.
        inputs: `[B, C, H, W]` normalised images; the baseline is zero in this space.
        target: `[B]` classes.
        n_steps: points of the path integral.
        method: Captum's quadrature rule (`gausslegendre`, `riemann_trapezoid`, ...).
        chunk_size: image-step pairs per forward pass.
    """
    explainer = IntegratedGradients(model)
    images = min(inputs.shape[0], chunk_size)

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return explainer.attribute(
            x, target=t, n_steps=n_steps, method=method, internal_batch_size=max(chunk_size, len(x))
        )

    return chunked(attribute, inputs, target, images)


@method(stochastic=True)
def gradient_shap(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    n_samples: Count = 20,
    stdevs: Annotated[float, Ge(0)] = 0.1,
    chunk_size: Count = 16,
) -> torch.Tensor:
    """GradientSHAP (Lundberg and Lee 2017, arXiv:1705.07874).

    Expected gradients on random points between the input and a zero baseline, with Gaussian input
    noise of std `stdevs`. Captum forwards all `n_samples` of an image at once, so the samples are
    split into calls of at most `chunk_size` forwards and their means combined, weighted by count.
    """
    explainer = GradientShap(model)
    images = max(1, min(inputs.shape[0], chunk_size // n_samples))
    per_call = max(1, min(n_samples, chunk_size // images))

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        baselines = torch.zeros_like(x[:1])
        total = torch.zeros_like(x)
        for done in range(0, n_samples, per_call):
            k = min(per_call, n_samples - done)
            total += k * explainer.attribute(x, baselines, target=t, n_samples=k, stdevs=stdevs)
        return total / n_samples

    return chunked(attribute, inputs, target, images)
