"""What the harness derives about a model it did not write: the layer Grad-CAM explains and how its
output is laid out, and the stages the sanity checks re-initialise, each given or `auto`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from harness.config import HarnessError
from harness.models.classifier import Blocks, plain_blocks

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


def family(arch: str) -> tuple[str | Callable[[nn.Module], str], str] | None:
    """The torchvision family's Grad-CAM layer and layout (`CAM_LAYERS`), or None."""
    for prefixes, layer, layout in CAM_LAYERS:
        if arch.startswith(prefixes):
            return layer, layout
    return None


def default_cam_layer(arch: str, module: nn.Module, families: bool = True) -> tuple[str, str]:
    """Grad-CAM's layer and its layout for a torchvision architecture (`families`); for any other
    model, the last convolution (in registration order), `nchw`.
    """
    found = family(arch) if families else None
    if found is not None:
        layer, layout = found
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


def check_layer(module: nn.Module, layer: str, name: str) -> None:
    """Refuse a Grad-CAM layer that is not a module of the model, listing its top-level modules."""
    try:
        module.get_submodule(layer)
    except AttributeError:
        tops = ", ".join(n for n, _ in module.named_children())
        raise HarnessError(
            f"model.cam_layer={layer!r} is not a module of {name}; its top-level modules: {tops}"
        ) from None


def model_facts(
    module: nn.Module,
    name: str,
    cam_layer: str | None,
    cam_layout: str | None,
    blocks: Any,
    families: bool = True,
) -> tuple[str, str, Blocks]:
    """Grad-CAM's layer and layout and the sanity checks' blocks: given, or `auto` (or null); the
    torchvision families' defaults only for torchvision models (`families`).
    """
    if cam_layout not in (None, "auto", *LAYOUTS):
        raise HarnessError(f"model.cam_layout={cam_layout!r}; expected auto, {', '.join(LAYOUTS)}")
    if cam_layer in (None, "auto"):
        layer, layout = default_cam_layer(name, module, families)
    else:
        found = family(name) if families else None
        layer, layout = str(cam_layer), found[1] if found else "nchw"
    layout = layout if cam_layout in (None, "auto") else str(cam_layout)
    check_layer(module, layer, name)
    stages = default_blocks(module) if blocks in (None, "auto") else plain_blocks(blocks)
    return layer, layout, stages
