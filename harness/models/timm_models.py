"""Any timm architecture (`model=timm`), an optional extra: `pip install -e '.[timm]'`.

Weights come from a local file (any checkpoint `harness.models.weights` reads) or, with
`weights: pretrained`, from timm's local Hugging Face cache with the hub set offline: the harness
never downloads. Grad-CAM's layer: a ViT's (or DeiT's) last block's first norm (tokens), a Swin's
last stage (`[B, H, W, C]`), otherwise the last of the model's feature stages (`feature_info`), or
the last convolution.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from torch import nn

from harness.config import HarnessError, first_line
from harness.models.classifier import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    Count,
    Rgb,
    RgbScale,
    Side,
    check_arch,
    check_num_classes,
    seeded,
)
from harness.models.facts import default_cam_layer, model_facts
from harness.models.weights import load_weights

# Families whose input size is built into the model (patch grids, windows): built for `input_size`.
SIZED = ("vit", "deit", "swin", "eva", "beit", "cait", "xcit")


def _cam(arch: str, module: nn.Module) -> tuple[str, str]:
    if arch.startswith(("vit", "deit")) and hasattr(module, "blocks"):
        return f"blocks.{len(list(module.get_submodule('blocks').children())) - 1}.norm1", "tokens"
    if arch.startswith("swin") and hasattr(module, "layers"):
        return f"layers.{len(list(module.get_submodule('layers').children())) - 1}", "nhwc"
    info = getattr(module, "feature_info", None)  # timm's own list of its feature stages
    if info and isinstance(info[-1], dict) and info[-1].get("module"):
        # The last stage's output (a ResNet's layer4): its last convolution may feed a BatchNorm
        # that timm starts at zero (zero_init_last), whose gradients would then all be zero.
        return str(info[-1]["module"]), "nchw"
    return default_cam_layer(arch, module, families=False)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The Hugging Face hub offline inside the block (its environment variable, and its constant,
    which it read when imported), as it was outside.
    """
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants: Any
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    before = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = before
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def timm_classifier(
    arch: str,
    weights: str | None = None,
    weights_key: str | None = None,
    weights_prefix: str | None = None,
    num_classes: Count = 1000,
    input_size: Side = 224,
    mean: Rgb = IMAGENET_MEAN,
    std: RgbScale = IMAGENET_STD,
    cam_layer: str | None = "auto",
    cam_layout: str | None = "auto",
    blocks: list[str | list[str]] | str | None = "auto",
    class_names: str | None = None,
    seed: int = 0,
) -> Classifier:
    """A timm model by name (`timm.list_models()`), random weights drawn from `seed`, then loaded
    from `weights` (a checkpoint file, or `pretrained` for timm's own weights from the local cache).
    """
    try:
        import timm
    except ImportError:
        raise HarnessError("model=timm needs the timm package: pip install -e '.[timm]'") from None
    check_arch(arch, timm.list_models(), "a timm model", "timm.list_models() lists them")
    check_num_classes(num_classes)
    module = _created(timm, arch, weights, num_classes, input_size, seed)
    if weights is not None and weights != "pretrained":
        load_weights(module, str(weights), key=weights_key, prefix=weights_prefix, name=arch)
    if cam_layer in (None, "auto"):
        layer, layout = _cam(arch, module)
        cam_layer, cam_layout = layer, layout if cam_layout in (None, "auto") else cam_layout
    layer, layout, stages = model_facts(module, arch, cam_layer, cam_layout, blocks, families=False)
    return Classifier.from_module(
        module, arch, input_size, class_names=class_names, num_classes=num_classes,
        pretrained=weights is not None, seed=seed, mean=mean, std=std,
        cam_layer=layer, cam_layout=layout, blocks=stages,
    )  # fmt: skip


def _created(
    timm: Any, arch: str, weights: str | None, num_classes: int, input_size: int, seed: int
) -> nn.Module:
    """`timm.create_model`, random weights drawn from `seed`, or `pretrained` from the local cache."""
    extra: dict[str, Any] = {"img_size": input_size} if arch.startswith(SIZED) else {}
    pretrained = weights == "pretrained"
    try:
        with _offline(), seeded(seed):
            return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **extra)
    except Exception as e:  # noqa: BLE001 (timm and the hub raise many types)
        why = (
            "its pretrained weights are not in the local Hugging Face cache"
            if pretrained
            else "it cannot be built"
        )
        raise HarnessError(
            f"model=timm model.arch={arch}: {why} ({type(e).__name__}: {first_line(e, 200)}); give "
            "model.weights=<checkpoint file>"
        ) from None
