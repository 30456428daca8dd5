"""Data loaders: each returns `Images`, already resized and normalised for the model.

`photos` uses the sample photos that installed packages ship (scikit-image, matplotlib), so the default
comparison needs no download. `image_folder` reads an ImageNet-validation-style folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from metrics.localisation import GroundTruth

log = logging.getLogger("harness")
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


def _normal(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def _mapping(classes: str | Mapping[str, Any], names: Sequence[str]) -> dict[str, int]:
    """An explicit mapping of folder names to class indices: a dict (folder to index or class
    name), or a file: JSON (`{folder: index}`, or ImageNet's `{"0": ["n01440764", "tench"]}`), or
    text with one class per line in index order, the folder name first (ImageNet's
    `LOC_synset_mapping.txt`: `n01440764 tench, Tinca tinca`).
    """
    by_name = {_normal(n): i for i, n in enumerate(names)}
    if isinstance(classes, Mapping):
        out = {}
        for folder, value in classes.items():
            if isinstance(value, int) and not isinstance(value, bool):
                out[str(folder)] = value
            elif _normal(str(value)) in by_name:
                out[str(folder)] = by_name[_normal(str(value))]
            else:
                raise ValueError(
                    f"data.classes maps {folder!r} to {value!r}, which is neither an index nor a class "
                    "name of the model"
                )
        return out
    path = Path(str(classes)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"data.classes={str(classes)!r}: no such file; expected a mapping file or {{folder: class}}"
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            found = json.loads(text)
        except ValueError as e:
            raise ValueError(f"data.classes={str(classes)!r} is not JSON ({e})") from None
        if not isinstance(found, dict):
            raise ValueError(
                f"data.classes={str(classes)!r} holds a {type(found).__name__}; expected a JSON object"
            )
        if all(isinstance(v, list) and v for v in found.values()):  # {"0": ["n01440764", "tench"]}
            return {str(v[0]): int(k) for k, v in found.items()}
        return _mapping({str(k): v for k, v in found.items()}, names)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return {ln.split()[0]: i for i, ln in enumerate(lines)} | {ln: i for i, ln in enumerate(lines)}


def class_index(
    folders: list[str], class_names: Sequence[str] | None = None, classes: Any = None
) -> dict[str, int]:
    """Each class folder's class index among the model's `class_names`, -1 where none fits.

    In this order: the explicit `classes` mapping (`_mapping`); integer folder names are the index;
    a folder named as one of the model's classes (case, `_` and `-` aside) takes its index; 1000
    folders named as ImageNet synsets (`n01440764`, ...) take their sorted position, ImageNet's
    order. A folder that matches nothing is never given a made-up index.
    """
    names = list(class_names or [])
    n = len(names) or None
    if classes is not None:
        given = _mapping(classes, names)
        found = {f: given.get(f, -1) for f in folders}
    elif all(f.isdigit() for f in folders):
        found = {f: int(f) for f in folders}
    else:
        by_name = {_normal(c): i for i, c in enumerate(names)}
        found = {f: by_name.get(_normal(f), -1) for f in folders}
        synsets = all(len(f) == 9 and f[0] == "n" and f[1:].isdigit() for f in folders)
        if synsets and len(folders) == 1000:
            found = {f: i for i, f in enumerate(sorted(folders))}
    if n is not None:
        found = {f: i if 0 <= i < n else -1 for f, i in found.items()}
    return found


def image_folder(
    root: str,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_images: int | None = None,
    boxes: str | None = None,
    classes: str | dict[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> Images:
    """Images in `root/<class>/<file>`, the ImageNet validation layout.

    The class of a folder is the model's class it names (`class_index`: an explicit mapping, an
    integer index, a class name, or one of all 1000 ImageNet synsets); the images of a folder that
    names no class are scored without a label (-1), and the folders are reported once. Images are
    taken in sorted path order.

    Args:
        root: folder holding one subfolder per class.
        size: side of the square model input.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        num_images: take the first this many; None takes all.
        boxes: the objects' bounding boxes, the images' ground truth (`harness.boxes`): a folder of
            Pascal VOC XML files or a CSV file (path, class, xmin, ymin, xmax, ymax); None: none.
        classes: folder names to the model's classes (see `_mapping`); None: matched by name.
        class_names: the model's class names (the job passes them).
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r} is not a folder (expected root/<class>/<image>)")
    folders = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"data.root={str(root)!r} has no class subfolders")
    index = class_index(folders, class_names, classes)
    unmatched = [f for f in folders if index[f] < 0]
    if unmatched:
        log.warning(
            "data.root: %d of %d class folders name no class of the model (%s); their images are "
            "scored without a label; map them with data.classes=<file or {folder: class}>",
            len(unmatched), len(folders), ", ".join(unmatched[:5]) + (", ..." if len(unmatched) > 5 else ""),
        )  # fmt: skip
    files = sorted(f for c in folders for f in (base / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
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


def load_data(
    node: Any, size: int, mean: Sequence[float], std: Sequence[float], class_names: Sequence[str]
) -> Images:
    """Build the data config `node` for a model: its input size and normalisation, and its class
    names where the loader maps folders to classes (`image_folder`).
    """
    import inspect

    from hydra.utils import get_object, instantiate

    takes = inspect.signature(get_object(str(node._target_))).parameters
    extra = {"class_names": list(class_names)} if "class_names" in takes else {}
    return instantiate(node, size=size, mean=mean, std=std, **extra)
