"""Your own architecture (`model=custom`): any builder importable from where you run, called with its
arguments, its weights from any checkpoint file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
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
    random_or_loaded,
)
from harness.models.facts import model_facts


def custom_classifier(
    builder: str,
    args: dict[str, Any] | None = None,
    weights: str | None = None,
    weights_key: str | None = None,
    weights_prefix: str | None = None,
    num_classes: Count | None = None,
    input_size: Side = 224,
    mean: Rgb = IMAGENET_MEAN,
    std: RgbScale = IMAGENET_STD,
    cam_layer: str | None = "auto",
    cam_layout: str | None = "auto",
    blocks: list[str | list[str]] | str | None = "auto",
    class_names: str | None = None,
    name: str | None = None,
    seed: int = 0,
) -> Classifier:
    """Your own architecture: `builder` (a dotted path to a class or function returning an
    `nn.Module` that maps `[B, 3, H, W]` normalised images to logits) called with `args`, its
    random weights drawn from `seed`, then loaded from `weights` (any checkpoint,
    `harness.models.weights`).

    The number of classes is the width of the logits of one forward pass on a zero image (checked
    against `num_classes` when given); `name` (default: the builder's) is the row's `model`.
    """
    kwargs = dict(args or {})
    label = name or str(builder).rsplit(".", 1)[-1]
    make = _importable(builder)
    hint = (
        "model.args.num_classes"
        if "num_classes" in kwargs
        else "the builder's number of classes (model.args)"
    )
    module = random_or_loaded(
        lambda: _built(make, builder, kwargs), weights, seed,
        key=weights_key, prefix=weights_prefix, name=label, classes_setting=hint,
    )  # fmt: skip
    width = _logits_width(module.eval(), label, input_size)
    if num_classes is not None and num_classes != width:
        raise HarnessError(f"model.num_classes={num_classes} but model {label} returns {width} logits")
    layer, layout, stages = model_facts(module, label, cam_layer, cam_layout, blocks, families=False)
    return Classifier.from_module(
        module, label, input_size, class_names=class_names, num_classes=width,
        pretrained=weights is not None, seed=seed, mean=mean, std=std,
        cam_layer=layer, cam_layout=layout, blocks=stages,
    )  # fmt: skip


def _importable(builder: str) -> Callable[..., Any]:
    """The class or function that `builder` (a dotted path) names."""
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
    return make


def _built(make: Callable[..., Any], builder: str, kwargs: dict[str, Any]) -> nn.Module:
    """`make(**kwargs)`, which must accept them and return an `nn.Module`."""
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


def _logits_width(module: nn.Module, label: str, input_size: int) -> int:
    """The number of logits of one forward pass on a zero image, which must give `[1, classes]`."""
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
    return int(logits.shape[1])
