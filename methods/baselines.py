"""Baselines: `random`, which every faithful method must beat, and `oracle`, the known evidence itself."""

from __future__ import annotations

from typing import Any

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


@method(forward_only=True, ground_truth=True)
def oracle(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, ground_truth: Any
) -> torch.Tensor:
    """The object's mask as the map `[B, 1, H, W]` (1 on the object, 0 elsewhere), on data whose
    evidence is known (`metrics.GroundTruth`): the answer every localisation metric scores 1, and an
    upper reference for the faithfulness metrics on a model that uses the object alone.
    """
    return ground_truth.mask[:, None].to(device=inputs.device, dtype=torch.float32)
