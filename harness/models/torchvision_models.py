"""Any torchvision classification model, by name through torchvision's registry (`model=torchvision`,
and the named configs `resnet18`, `vgg16`, ...), with its weights from the local torch hub cache, a
checkpoint file of any name, or random.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from harness.config import HarnessError, first_line, names_a_file
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
    random_or_loaded,
)
from harness.models.facts import model_facts


def torchvision_classifier(
    arch: str,
    cam_layer: str | None = "auto",
    weights: str | None = None,
    input_size: Side = 224,
    num_classes: Count = 1000,
    seed: int = 0,
    blocks: list[str | list[str]] | str | None = "auto",
    weights_key: str | None = None,
    weights_prefix: str | None = None,
    class_names: str | None = None,
    mean: Rgb = IMAGENET_MEAN,
    std: RgbScale = IMAGENET_STD,
    cam_layout: str | None = "auto",
) -> Classifier:
    """Any torchvision classification model, by name through torchvision's registry.

    Args:
        arch: a name that `torchvision.models.list_models(module=torchvision.models)` returns, e.g.
            `resnet18`; also the `model` value in the row.
        cam_layer: layer that Grad-CAM explains; `auto` picks the family's usual one
            (`harness.models.facts.CAM_LAYERS`).
        weights: a weights enum name of the architecture (`IMAGENET1K_V1`, `DEFAULT`), resolved from
            the local torch hub cache; or a checkpoint file of any name (`harness.models.weights`); or
            None for random weights drawn from `seed`.
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
    from torchvision.models import list_models

    known = list_models(module=torchvision.models)
    listing = f"the {len(known)} names: torchvision.models.list_models(module=torchvision.models)"
    check_arch(arch, known, "a torchvision classification model", listing)
    check_num_classes(num_classes)
    enum = _weights_enum(arch, weights)
    if enum is not None:
        module = _pretrained(arch, enum, weights, input_size, num_classes)
    else:
        load = {"key": weights_key, "prefix": weights_prefix, "name": arch}
        module = random_or_loaded(lambda: _build(arch, None, input_size, num_classes), weights, seed, **load)
    layer, layout, stages = model_facts(module, arch, cam_layer, cam_layout, blocks)
    return Classifier.from_module(
        module, arch, input_size, class_names=class_names, num_classes=num_classes,
        pretrained=weights is not None, seed=seed, mean=mean, std=std,
        cam_layer=layer, cam_layout=layout, blocks=stages,
    )  # fmt: skip


def _build(arch: str, enum: Any, input_size: int, num_classes: int) -> nn.Module:
    """The architecture built for `input_size` (ViTs and MaxViT take it), with `enum`'s weights."""
    from torchvision.models import get_model

    extra: dict[str, Any] = {"image_size": input_size} if arch.startswith("vit") else {}
    extra |= {"input_size": (input_size, input_size)} if arch.startswith("maxvit") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet, inception: init defaults
        try:
            return get_model(arch, weights=enum, num_classes=num_classes, **extra)
        except (ValueError, AssertionError, RuntimeError) as e:
            raise HarnessError(
                f"model {arch} cannot be built with model.input_size={input_size} "
                f"and num_classes={num_classes}: {first_line(e, 200)}"
            ) from None


def _pretrained(arch: str, enum: Any, weights: Any, input_size: int, num_classes: int) -> nn.Module:
    """The architecture with the weights `enum` names, from the local torch hub cache only."""
    if num_classes != len(enum.meta["categories"]):
        raise HarnessError(
            f"model.weights={weights} of {arch} has {len(enum.meta['categories'])} classes; "
            f"model.num_classes={num_classes}"
        )
    try:
        return _build(arch, enum, input_size, num_classes)
    except HarnessError:
        raise
    except Exception as e:  # noqa: BLE001 (a download attempt fails in many ways offline)
        raise HarnessError(
            f"model.weights={weights}: {arch}'s {enum.name} weights are not in the torch hub cache "
            f"({torch.hub.get_dir()}/checkpoints/{Path(enum.url).name}) and cannot be downloaded "
            f"({type(e).__name__}); put the file there, or give model.weights=<checkpoint file>"
        ) from None


def _weights_enum(arch: str, weights: str | None) -> Any:
    """The torchvision weights enum member that `weights` names, or None when it names a file (a
    path, or a name with a file suffix) or is None.
    """
    from torchvision.models import get_model_weights

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
