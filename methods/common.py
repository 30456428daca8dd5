"""What every method shares: splitting a batch of images into chunks that fit one forward pass."""

from __future__ import annotations

from collections.abc import Callable

import torch


def chunked(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    target: torch.Tensor,
    images: int,
) -> torch.Tensor:
    """Apply `fn(inputs, target)` to `images` images at a time and concatenate the maps.

    Args:
        fn: attribution of a chunk, `([b, C, H, W], [b]) -> [b, 1 or C, H, W]`.
        inputs: `[B, C, H, W]` images.
        target: `[B]` classes.
        images: images per call, at least 1.
    """
    images = max(1, int(images))
    parts = [
        fn(inputs[i : i + images], target[i : i + images]).detach() for i in range(0, inputs.shape[0], images)
    ]
    return torch.cat(parts)


def seed_all(seed: int) -> None:
    """Seed every generator that methods draw from: torch's (all devices) and NumPy's global one,
    which Captum's GradientShap uses for its baselines and interpolation points.
    """
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
