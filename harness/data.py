"""Data loaders: each returns `Images`, already resized and normalised for the model.

`photos` uses the sample photos that installed packages ship (scikit-image, matplotlib), so the default
comparison needs no download. `image_folder` reads an ImageNet-validation-style folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from metrics.localisation import GroundTruth

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp", ".gif"}


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


def _to_model_input(rgb: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`[H, W, 3]` uint8 -> `[3, size, size]` float32 normalised (plain resize, no crop)."""
    t = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    t = TF.resize(t, [size, size], antialias=True).float().div_(255)
    return TF.normalize(t, list(mean), list(std))


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a[..., :3]


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return np.asarray(im.convert("RGB"))


def _photo_sources() -> list[tuple[str, Callable[[], np.ndarray], int]]:
    """(id, loader, ImageNet class or -1). Classes chosen by eye; -1 where ImageNet has none."""
    from skimage import data as sk

    return [
        ("chelsea", sk.chelsea, 285),  # Egyptian cat
        ("coffee", sk.coffee, 967),  # espresso
        ("grace_hopper", _grace_hopper, 652),  # military uniform
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
    num_images: int | None = None,
) -> Images:
    """The eight sample photos shipped by scikit-image and matplotlib, with their ImageNet labels.

    Args:
        size: side of the square model input.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        num_images: take the first this many (1 to 8); None takes all.
    """
    sources = _photo_sources()
    n = len(sources) if num_images is None else num_images
    if not 1 <= n <= len(sources):
        raise ValueError(f"data.num_images={num_images} but photos has 1 to {len(sources)} images")
    chosen = sources[:n]
    images = torch.stack([_to_model_input(_rgb(load()), size, mean, std) for _, load, _ in chosen])
    labels = torch.tensor([label for _, _, label in chosen], dtype=torch.int64)
    return Images(images, labels, [name for name, _, _ in chosen], "photos")


def _class_index(folder_names: list[str]) -> dict[str, int]:
    """Integer folder names are the class index; otherwise sorted position (ImageNet wnid order)."""
    if all(name.isdigit() for name in folder_names):
        return {name: int(name) for name in folder_names}
    return {name: i for i, name in enumerate(sorted(folder_names))}


def image_folder(
    root: str,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_images: int | None = None,
    boxes: str | None = None,
) -> Images:
    """Images in `root/<class>/<file>`, the ImageNet validation layout.

    The class of a folder is its name when the name is an integer, else its position among the
    sorted folder names (the order of ImageNet's wnids, as torchvision's ImageFolder has it).
    Images are taken in sorted path order.

    Args:
        root: folder holding one subfolder per class.
        size: side of the square model input.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        num_images: take the first this many; None takes all.
        boxes: the objects' bounding boxes, the images' ground truth (`harness.boxes`): a folder of
            Pascal VOC XML files or a CSV file (path, class, xmin, ymin, xmax, ymax); None: none.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r} is not a folder (expected root/<class>/<image>)")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"data.root={str(root)!r} has no class subfolders")
    index = _class_index(classes)
    files = sorted(f for c in classes for f in (base / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"data.root={str(root)!r} has no images ({sorted(IMAGE_SUFFIXES)})")
    if num_images is not None:
        if num_images < 1:
            raise ValueError(f"data.num_images={num_images} must be at least 1")
        files = files[:num_images]
    ids = [f"{f.parent.name}/{f.name}" for f in files]
    table = None
    if boxes is not None:
        from harness.boxes import read_boxes

        table = read_boxes(boxes, base, ids)  # checked before any image is decoded
    tensors, sides = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                sides.append(im.size)
                tensors.append(_to_model_input(np.asarray(im.convert("RGB")), size, mean, std))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {str(f)!r}: {e}") from e
    labels = torch.tensor([index[f.parent.name] for f in files], dtype=torch.int64)
    truth = None
    if table is not None:
        from harness.boxes import ground_truth

        truth = ground_truth(table, ids, sides, size, boxes or "")
    return Images(torch.stack(tensors), labels, ids, "image_folder", ground_truth=truth)
