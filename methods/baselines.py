"""Baselines that every faithful method must beat."""

from __future__ import annotations

import torch
from torch import nn

from methods.common import method


@method(forward_only=True, stochastic=True)
def random(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Uniform random map `[B, 1, H, W]` from torch's global generator (seeded by the job).

    A method whose deletion AUC is not below, and insertion AUC not above, this one's carries no
    information about the model.
    """
    b, _, h, w = inputs.shape
    return torch.rand(b, 1, h, w, device=inputs.device)
