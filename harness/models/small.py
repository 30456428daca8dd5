"""The small CNN, for tests and quick sweeps: random weights drawn from the job's seed, or a checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from harness.models.classifier import Classifier, Count, Side, random_or_loaded


class SmallCNN(nn.Module):
    """A four-layer CNN for tests and synthetic data with known ground truth."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def small_cnn(
    weights: str | None = None,
    num_classes: Count = 10,
    input_size: Side = 32,
    width: Count = 16,
    seed: int = 0,
    cam_layer: str = "features.4",
    blocks: list[str | list[str]] | None = None,
) -> Classifier:
    """The small CNN; random weights drawn from `seed` unless a checkpoint file is given."""
    module = random_or_loaded(lambda: SmallCNN(num_classes, width), weights, seed, name="small_cnn")
    return Classifier.from_module(
        module, "small_cnn", input_size, class_names=[str(i) for i in range(num_classes)],
        num_classes=num_classes, pretrained=weights is not None, seed=seed,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), cam_layer=cam_layer, blocks=blocks,
    )  # fmt: skip
