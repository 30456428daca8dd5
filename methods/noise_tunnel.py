"""The noise tunnel of gradients: SmoothGrad, SmoothGrad-squared and VarGrad from one set of samples.

Each image gets `nt_samples` noisy copies, x + N(0, sigma^2) with sigma = `noise_level` times the
image's own value range (Smilkov et al. 2017, sec. 3: sigma / (x_max - x_min)); the gradients of the
target logit at the copies give the three maps as Captum's `NoiseTunnel` types define them: their
mean (`smoothgrad`), the mean of their squares (`smoothgrad_sq`, Hooker et al. 2019's SG-SQ) and
their variance, E[g^2] - E[g]^2 (`vargrad`, Adebayo et al. 2018). Image-sample pairs are forwarded
`chunk_size` at a time across images. An image's noise is drawn from torch's generator (seeded by the
job) in image order, all its samples at once, so the maps do not depend on `chunk_size`.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import nn

from methods.common import Count, input_gradients, like_inputs, method


def draw_noise(samples: int, image: torch.Tensor) -> torch.Tensor:
    """`samples` standard normal draws shaped like `image` `[C, H, W]`: `[samples, C, H, W]`."""
    return torch.randn((samples, *image.shape), device=image.device, dtype=image.dtype)


def gradient_moments(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    nt_samples: int,
    noise_level: float,
    absolute: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the mean square over each image's noisy copies of the gradient of its target
    logit (of its absolute value when `absolute`): `[B, C, H, W]` each.
    """
    b = inputs.shape[0]
    mean, square = torch.empty_like(inputs), torch.empty_like(inputs)
    per_group = max(1, chunk_size // nt_samples)  # images whose samples go forward together
    for start in range(0, b, per_group):
        x, t = inputs[start : start + per_group], target[start : start + per_group]
        sigma = noise_level * (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1))  # [k]
        noisy = like_inputs(
            torch.cat([x[i] + sigma[i] * draw_noise(nt_samples, x[i]) for i in range(len(x))]), x
        )
        targets = t.repeat_interleave(nt_samples)
        grads = input_gradients(model, noisy, targets, chunk_size).view(len(x), nt_samples, *x.shape[1:])
        if absolute:
            grads = grads.abs_()
        mean[start : start + len(x)] = grads.mean(dim=1)
        square[start : start + len(x)] = grads.square_().mean(dim=1)
    return mean, square


@method(stochastic=True)
def smoothgrad(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    nt_samples: Count = 25,
    noise_level: Annotated[float, Ge(0)] = 0.15,
    absolute: bool = True,
    chunk_size: Count = 16,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017, arXiv:1706.03825, eq. 3): the mean gradient over noisy copies,
    of its absolute value when `absolute` (Captum's `NoiseTunnel(Saliency)`, whose default that is).
    """
    mean, _ = gradient_moments(
        model,
        inputs,
        target,
        nt_samples=nt_samples,
        noise_level=noise_level,
        absolute=absolute,
        chunk_size=chunk_size,
    )
    return mean


@method(stochastic=True)
def smoothgrad_sq(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    nt_samples: Count = 25,
    noise_level: Annotated[float, Ge(0)] = 0.15,
    chunk_size: Count = 16,
) -> torch.Tensor:
    """SmoothGrad-squared (Hooker et al. 2019, arXiv:1806.10758, sec. 4.1): the mean squared gradient
    over SmoothGrad's noisy copies (the same samples for the same seed).
    """
    _, square = gradient_moments(
        model,
        inputs,
        target,
        nt_samples=nt_samples,
        noise_level=noise_level,
        absolute=False,
        chunk_size=chunk_size,
    )
    return square


@method(stochastic=True)
def vargrad(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    nt_samples: Count = 25,
    noise_level: Annotated[float, Ge(0)] = 0.15,
    absolute: bool = False,
    chunk_size: Count = 16,
) -> torch.Tensor:
    """VarGrad (Adebayo et al. 2018, arXiv:1810.03307, sec. 2): the variance of the gradient over
    SmoothGrad's noisy copies, E[g^2] - E[g]^2 (of |g| when `absolute`, as Captum's `NoiseTunnel` of
    `Saliency` with its default `abs=True` computes it).
    """
    mean, square = gradient_moments(
        model,
        inputs,
        target,
        nt_samples=nt_samples,
        noise_level=noise_level,
        absolute=absolute,
        chunk_size=chunk_size,
    )
    return square - mean * mean
