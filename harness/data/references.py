"""Reference images: held out of a data config's explained images, for methods that draw baselines from
the data (Expected Gradients: Erion et al. 2021 take them from the training data).

Each source says which images it holds out: the photos, other sample photos that scikit-image ships
(textures, micrographs, a page of text; never one of the eight); the generated shapes, the same
settings' `val` split (`train` when the job explains `val`); an image folder, the images after the
explained ones in sorted path order (so the job's `data.num_images` must leave some).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from harness.config import HarnessError
from harness.data.images import Images, rgb, to_model_input


def reference_photo_sources() -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(id, loader) of the sample photos held out of `photos`: scikit-image's, none of the eight."""
    from skimage import data as sk

    return [
        ("brick", sk.brick),
        ("grass", sk.grass),
        ("gravel", sk.gravel),
        ("coins", sk.coins),
        ("moon", sk.moon),
        ("page", sk.page),
        ("text", sk.text),
        ("hubble_deep_field", sk.hubble_deep_field),
        ("immunohistochemistry", sk.immunohistochemistry),
        ("retina", sk.retina),
        ("cell", sk.cell),
        ("microaneurysms", sk.microaneurysms),
        ("colorwheel", sk.colorwheel),
        ("checkerboard", sk.checkerboard),
    ]


def _photos(
    node: Any, count: int, size: int, mean: Sequence[float], std: Sequence[float], _names: Any
) -> Images:
    sources = reference_photo_sources()[:count]
    images = torch.stack([to_model_input(rgb(load()), size, mean, std) for _, load in sources])
    return Images(images, torch.full((len(sources),), -1), [name for name, _ in sources], "photos (held out)")


def _shapes(
    node: Any, count: int, size: int, mean: Sequence[float], std: Sequence[float], _names: Any
) -> Images:
    split = "train" if node.get("split", "test") == "val" else "val"
    return instantiate(node, size=size, mean=mean, std=std, num_images=count, split=split)


def _folder(
    node: Any, count: int, size: int, mean: Sequence[float], std: Sequence[float], names: Any
) -> Images:
    explained = node.get("num_images")
    if explained is None:
        raise HarnessError(
            f"the method draws {count} reference images from the data's images after the explained ones, "
            "and data.num_images=null explains every image of the folder; set data.num_images to leave "
            f"at least {count} images"
        )
    try:
        return instantiate(
            node, size=size, mean=mean, std=std, class_names=list(names), num_images=count,
            skip=int(explained), boxes=None,
        )  # fmt: skip
    except (ValueError, InstantiationException) as e:
        cause = e.__cause__ if isinstance(e.__cause__, ValueError) else e
        raise HarnessError(
            f"the method draws {count} reference images from the data's images after the first "
            f"data.num_images={explained}: {cause}"
        ) from None


# The loaders whose held-out images are known, by `_target_`.
SOURCES: dict[str, Callable[..., Images]] = {
    "harness.data.photos": _photos,
    "harness.data.shapes": _shapes,
    "harness.data.image_folder": _folder,
}


def held_out(
    node: Any, count: int, size: int, mean: Sequence[float], std: Sequence[float], class_names: Sequence[str]
) -> Images:
    """`count` images of the data config `node`'s source held out of the images it explains, made
    ready for the model as those are; a clear error where the source has too few or says none.
    """
    target = str(node._target_)
    if target not in SOURCES:
        raise HarnessError(
            f"the method draws reference images from the data, and data {target} does not say which of "
            f"its images are held out of the explained ones; use one of {', '.join(sorted(SOURCES))}"
        )
    if target == "harness.data.photos" and count > len(reference_photo_sources()):
        most = len(reference_photo_sources())
        raise HarnessError(
            f"method.n_references={count} but the photos hold out {most} reference photos; "
            f"expected 1 to {most}"
        )
    return SOURCES[target](node, count, size, mean, std, class_names)
