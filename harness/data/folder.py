"""An ImageNet-validation-style folder of images (`data=image_folder`): `root/<class>/<file>`, each
class folder mapped to one of the model's classes, with bounding boxes as ground truth where given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from annotated_types import Ge
from PIL import Image, UnidentifiedImageError

from harness.config import read_listing
from harness.data.boxes import ground_truth, read_boxes
from harness.data.images import Images, pixels, to_model_input

log = logging.getLogger("harness")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp", ".gif"}


def _normal(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def mapping(classes: str | Mapping[str, Any], names: Sequence[str]) -> dict[str, int]:
    """An explicit mapping of folder names to class indices: a dict (folder to index or class
    name), or a file: JSON (`{folder: index}`, or ImageNet's `{"0": ["n01440764", "tench"]}`), or
    text with one class per line in index order, the folder name first (ImageNet's
    `LOC_synset_mapping.txt`: `n01440764 tench, Tinca tinca`).
    """
    if isinstance(classes, Mapping):
        return _by_folder(classes, names)
    found = read_listing(str(classes), "data.classes", "a mapping file or {folder: class}")
    if isinstance(found, list):  # text: one class per line, the folder name first
        return {ln.split()[0]: i for i, ln in enumerate(found)} | {ln: i for i, ln in enumerate(found)}
    if not isinstance(found, dict):
        raise ValueError(
            f"data.classes={str(classes)!r} holds a {type(found).__name__}; expected a JSON object"
        )
    if all(isinstance(v, list) and v for v in found.values()):  # {"0": ["n01440764", "tench"]}
        return {str(v[0]): int(k) for k, v in found.items()}
    return _by_folder({str(k): v for k, v in found.items()}, names)


def _by_folder(classes: Mapping[str, Any], names: Sequence[str]) -> dict[str, int]:
    """Folder to class index, from folder to an index or a class name of the model."""
    by_name = {_normal(n): i for i, n in enumerate(names)}
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


def class_index(
    folders: list[str], class_names: Sequence[str] | None = None, classes: Any = None
) -> dict[str, int]:
    """Each class folder's class index among the model's `class_names`, -1 where none fits.

    In this order: the explicit `classes` mapping (`mapping`); integer folder names are the index;
    a folder named as one of the model's classes (case, `_` and `-` aside) takes its index; 1000
    folders named as ImageNet synsets (`n01440764`, ...) take their sorted position, ImageNet's
    order. A folder that matches nothing is never given a made-up index.
    """
    names = list(class_names or [])
    n = len(names) or None
    if classes is not None:
        given = mapping(classes, names)
        outside = {f: i for f, i in given.items() if n is not None and not 0 <= i < n}
        if outside:
            folder, index = next(iter(outside.items()))
            raise ValueError(
                f"data.classes maps {folder!r} to {index}, outside the model's {n} classes; "
                f"expected an index from 0 to {n - 1 if n else 0} or a class name of the model"
            )
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
    num_images: Annotated[int, Ge(1)] | None = None,
    boxes: str | None = None,
    classes: str | dict[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    skip: Annotated[int, Ge(0)] = 0,
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
        boxes: the objects' bounding boxes, the images' ground truth (`harness.data.boxes`): a folder of
            Pascal VOC XML files or a CSV file (path, class, xmin, ymin, xmax, ymax); None: none.
        classes: folder names to the model's classes (see `mapping`); None: matched by name.
        class_names: the model's class names (the job passes them).
        skip: leave out the first this many (in sorted path order) before taking `num_images`: the
            images held out of a job's, where a method draws references from the data (`references`).
    """
    base = Path(root).expanduser()
    files, index = _files(base, root, class_names, classes)
    total = len(files)
    files = files[skip:]
    if not files:
        raise ValueError(
            f"data.skip={skip} but data.root={root!r} has {total} images; expected fewer than {total}"
        )
    if num_images is not None:
        if skip and not 1 <= num_images <= len(files):
            raise ValueError(
                f"{num_images} images after the first {skip} were asked for but data.root={root!r} has "
                f"{total} images"
            )
        if not 1 <= num_images <= len(files):
            raise ValueError(
                f"data.num_images={num_images} but data.root={root!r} has {len(files)} images; "
                f"expected 1 to {len(files)}"
            )
        files = files[:num_images]
    ids = [f"{f.parent.name}/{f.name}" for f in files]
    table = None if boxes is None else read_boxes(boxes, base, ids)  # checked before any image is decoded
    tensors, sides = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                sides.append(im.size)
                tensors.append(to_model_input(pixels(im), size, mean, std))
        except Image.DecompressionBombError as e:
            raise ValueError(
                f"image {str(f)!r} is too large to decode safely ({e}); resize it or leave it out"
            ) from e
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"cannot read image {str(f)!r}: {e}") from e
    labels = torch.tensor([index[f.parent.name] for f in files], dtype=torch.int64)
    truth = None if table is None else ground_truth(table, ids, sides, size, boxes or "")
    return Images(torch.stack(tensors), labels, ids, "image_folder", ground_truth=truth)


def _is_image(path: Path) -> bool:
    """An image file by its suffix, hidden files left out (macOS's `._x.png` and `.DS_Store`)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _files(
    base: Path, root: str, class_names: Sequence[str] | None, classes: Any
) -> tuple[list[Path], dict[str, int]]:
    """The images under `base` in sorted path order, and each class folder's class index (the folders
    that name no class of the model reported once).
    """
    if not base.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r} is not a folder (expected root/<class>/<image>)")
    folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"data.root={str(root)!r} has no class subfolders")
    index = class_index(folders, class_names, classes)
    unmatched = [f for f in folders if index[f] < 0]
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (", ..." if len(unmatched) > 5 else "")
        hint = "add them to data.classes"
        if classes is None:
            hint = "map them with data.classes=<file or {folder: class}>"
        log.warning(
            "data.root: %d of %d class folders name no class of the model (%s); their images are "
            "scored without a label; %s", len(unmatched), len(folders), shown, hint,
        )  # fmt: skip
    files = sorted(f for c in folders for f in (base / c).iterdir() if _is_image(f))
    if not files:
        raise FileNotFoundError(f"data.root={str(root)!r} has no images ({sorted(IMAGE_SUFFIXES)})")
    return files, index
