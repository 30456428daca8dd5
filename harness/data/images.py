"""The data contract (`Images`) and the default images: the sample photos that installed packages ship
(scikit-image, matplotlib), so the default comparison needs no download. Every loader returns
`Images`, already resized and normalised for the model (`load_data` passes the model's size,
normalisation and class names).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from annotated_types import Interval
from hydra.utils import get_object, instantiate
from PIL import Image

from metrics.contract import GroundTruth


@dataclass
class Images:
    """A data set small enough to hold in memory.

    Attributes:
        images: `[N, 3, H, W]` float32, normalised for the model.
        labels: `[N]` int64 class index, -1 where no class fits.
        ids: one name per image.
        name: config name of the data, the value of `data` in the results row.
        ground_truth: the evidence of each image's class (object masks and boxes), where known.
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    name: str
    ground_truth: GroundTruth | None = None


def to_model_input(rgb: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`[H, W, 3]` uint8 -> `[3, size, size]` float32 normalised (plain resize, no crop)."""
    t = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    t = TF.resize(t, [size, size], antialias=True).float().div_(255)
    return TF.normalize(t, list(mean), list(std))


def pixels(im: Image.Image) -> np.ndarray:
    """An image's pixels as `[H, W, 3]` uint8, scaled from its depth, never clipped: 16-bit grey
    (`I;16`, PNG and TIFF) by 255/65535; 32-bit integer grey (`I`) the same when it exceeds 255;
    floating-point grey (`F`) from [0, 1] when it lies there, else from [0, 255]; the rest through
    Pillow's RGB conversion (palette, alpha, CMYK, 1-bit).

    Example:
        >>> pixels(Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16)))[0, :, 0].tolist()
        [0, 1, 255]
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        scale = 257.0 if im.mode != "I" or a.max() > 255 else 1.0
        return rgb(np.clip(np.rint(a / scale), 0, 255).astype(np.uint8))
    if im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        a = a * 255 if np.nanmin(a) >= 0 and np.nanmax(a) <= 1 else a
        return rgb(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8))
    return np.asarray(im.convert("RGB"))


def rgb(a: np.ndarray) -> np.ndarray:
    """`[H, W]` grey repeated to three channels, `[H, W, 4]` without alpha: `[H, W, 3]`."""
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a[..., :3]


def grace_hopper() -> np.ndarray:
    """Matplotlib's sample photo of Grace Hopper, `[H, W, 3]` uint8."""
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return np.asarray(im.convert("RGB"))


def photo_sources() -> list[tuple[str, Callable[[], np.ndarray], int]]:
    """(id, loader, ImageNet class or -1). Classes chosen by eye; -1 where ImageNet has none."""
    from skimage import data as sk

    return [
        ("chelsea", sk.chelsea, 285),  # Egyptian cat
        ("coffee", sk.coffee, 967),  # espresso
        ("grace_hopper", grace_hopper, 652),  # military uniform
        ("camera", sk.camera, 872),  # tripod
        ("clock", sk.clock, 892),  # wall clock
        ("rocket", sk.rocket, 657),  # missile (ImageNet has no space rocket)
        ("astronaut", sk.astronaut, -1),  # a person in a spacesuit: no ImageNet class
        ("motorcycle", lambda: sk.stereo_motorcycle()[0], -1),  # no motorcycle class in ImageNet
    ]


def photos(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_images: Annotated[int, Interval(ge=1, le=8)] | None = None,
) -> Images:
    """The eight sample photos shipped by scikit-image and matplotlib, with their ImageNet labels.

    Args:
        size: side of the square model input.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        num_images: take the first this many (1 to 8); None takes all.
    """
    sources = photo_sources()
    n = len(sources) if num_images is None else num_images
    if not 1 <= n <= len(sources):
        raise ValueError(f"data.num_images={num_images} but photos has 1 to {len(sources)} images")
    chosen = sources[:n]
    images = torch.stack([to_model_input(rgb(load()), size, mean, std) for _, load, _ in chosen])
    labels = torch.tensor([label for _, _, label in chosen], dtype=torch.int64)
    return Images(images, labels, [name for name, _, _ in chosen], "photos")


def load_data(
    node: Any, size: int, mean: Sequence[float], std: Sequence[float], class_names: Sequence[str]
) -> Images:
    """Build the data config `node` for a model: its input size and normalisation, and its class
    names where the loader maps folders to classes (`image_folder`).
    """
    takes = inspect.signature(get_object(str(node._target_))).parameters
    extra = {"class_names": list(class_names)} if "class_names" in takes else {}
    return instantiate(node, size=size, mean=mean, std=std, **extra)
