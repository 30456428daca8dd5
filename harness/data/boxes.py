"""Bounding boxes for `image_folder`, the ground truth of real data: Pascal VOC XML files or a CSV file.

- **VOC** (`data.boxes=<folder>`): one XML file per image (`<annotation><filename>`, then per object
  `<name>` and `<bndbox>` with `xmin`, `ymin`, `xmax`, `ymax`), as VOC and ImageNet's validation
  annotations ship; an annotation belongs to the image whose file name, or name without suffix,
  equals its `<filename>`.
- **CSV** (`data.boxes=<file>.csv`): a header `path,class,xmin,ymin,xmax,ymax`, one row per box;
  `path` relative to `data.root` (`<class folder>/<file>`).

Coordinates are VOC's: pixels of the original image, 1-based, both ends included. An image's ground
truth is the union of its boxes of its own class (its folder's name), or of all its boxes when none
names that class; the mask is the box (only boxes are known). Every image must have a box, and every
box must name an image of the folder and lie inside it.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from metrics.contract import GroundTruth

Box = tuple[str, float, float, float, float]  # class, xmin, ymin, xmax, ymax
COLUMNS = ("path", "class", "xmin", "ymin", "xmax", "ymax")


def _voc(folder: Path, ids: list[str]) -> dict[str, list[Box]]:
    by_name: dict[str, str] = {}
    for i in ids:
        name = i.split("/", 1)[1]
        by_name.setdefault(name, i)
        by_name.setdefault(Path(name).stem, i)
    table: dict[str, list[Box]] = defaultdict(list)
    for xml in sorted(folder.glob("*.xml")):
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise ValueError(f"data.boxes: cannot read {str(xml)!r}: {e}") from None
        filename = (root.findtext("filename") or xml.stem).strip()
        image = by_name.get(filename) or by_name.get(Path(filename).stem)
        if image is None:
            raise ValueError(
                f"data.boxes: {str(xml)!r} annotates {filename!r}, which is not an image of data.root"
            )
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            try:
                coords = [float(bb.findtext(k) or "") for k in COLUMNS[2:]]  # type: ignore[union-attr]
            except (AttributeError, ValueError):
                raise ValueError(f"data.boxes: {str(xml)!r} has an object without a numeric bndbox") from None
            table[image].append((str(obj.findtext("name") or "").strip(), *coords))  # type: ignore[arg-type]
    return table


def _csv(file: Path, ids: list[str]) -> dict[str, list[Box]]:
    known = set(ids)
    table: dict[str, list[Box]] = defaultdict(list)
    with file.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in COLUMNS):
            raise ValueError(f"data.boxes={str(file)!r}: expected the columns {','.join(COLUMNS)}")
        for n, row in enumerate(reader, start=2):
            path = row["path"].strip().replace("\\", "/")
            if path not in known:
                raise ValueError(
                    f"data.boxes={str(file)!r} line {n}: image {path!r} is not in data.root "
                    "(paths are <class folder>/<file>, relative to data.root)"
                )
            try:
                coords = [float(row[k]) for k in COLUMNS[2:]]
            except (TypeError, ValueError):
                raise ValueError(f"data.boxes={str(file)!r} line {n}: the box {row} is not numeric") from None
            table[path].append((row["class"].strip(), *coords))  # type: ignore[arg-type]
    return table


def read_boxes(source: str, root: Path, ids: list[str]) -> dict[str, list[Box]]:
    """The boxes of each image id (`<class folder>/<file>`), checked: every box names an image of
    `root` and lies inside it, and every image has a box.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        table = _voc(path, ids)
    elif path.is_file() and path.suffix.lower() == ".csv":
        table = _csv(path, ids)
    else:
        raise ValueError(f"data.boxes={source!r}: expected a folder of VOC XML files or a .csv file")
    missing = [i for i in ids if not table.get(i)]
    if missing:
        raise ValueError(
            f"data.boxes={source!r} has no box for image {missing[0]!r} ({len(missing)} without)"
        )
    for image, boxes in table.items():
        with Image.open(root / image) as im:
            w, h = im.size
        for _, x0, y0, x1, y1 in boxes:
            if not (1 <= x0 <= x1 <= w and 1 <= y0 <= y1 <= h):
                raise ValueError(
                    f"data.boxes={source!r}: box (xmin {x0:g}, ymin {y0:g}, xmax {x1:g}, ymax {y1:g}) of "
                    f"{image!r} lies outside the image ({w}x{h}; expected 1 <= xmin <= xmax <= {w} and "
                    f"1 <= ymin <= ymax <= {h})"
                )
    return table


def ground_truth(
    table: dict[str, list[Box]], ids: list[str], sides: list[tuple[int, int]], size: int, source: str
) -> GroundTruth:
    """Masks `[N, size, size]` of each image's boxes at the model's input size (plain resize): a pixel
    is inside when its centre, in the original image's coordinates, falls in a box.
    """
    masks = torch.zeros(len(ids), size, size, dtype=torch.bool)
    centre = torch.arange(size) + 0.5
    for i, (image, (w, h)) in enumerate(zip(ids, sides, strict=True)):
        cls = image.split("/", 1)[0]
        boxes = [b for b in table[image] if b[0] == cls] or table[image]
        u, v = centre * w / size, centre * h / size  # original pixel coordinates, 0-based continuous
        for _, x0, y0, x1, y1 in boxes:
            rows = (v >= y0 - 1) & (v < y1)
            cols = (u >= x0 - 1) & (u < x1)
            masks[i] |= rows[:, None] & cols[None, :]
    return GroundTruth(masks, masks.clone())
