"""The data of the report page's example browser, per (model, data): each image with its label, its
top-5 predictions, whether the top-1 is right, each method's map over it, its curves and its values.

Pictures are JPEG thumbnails at most `THUMB` pixels on a side (small images are enlarged by a whole
factor, pixels kept sharp), at most `MAX_IMAGES` images per (model, data), so that the page stays
small for any sweep: the default comparison's 104 pictures and curves take 1.0 MB of its 2.6 MB page.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from harness.report.plots import display_scale
from harness.results import read_maps

THUMB = 160  # longest side of a thumbnail, pixels
MAX_IMAGES = 64  # images per (model, data) in the browser; the page says how many the sweep has
JPEG_QUALITY = 80
ALPHA = 0.6  # the map's weight over the grey image, as in the grid plot
OUTLINE = (0, 255, 0)  # the known evidence's outline, where the data has it


def data_uri(image: Image.Image, kind: str = "JPEG") -> str:
    """An image as a `data:` address, for a page with no files beside it."""
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **({"quality": JPEG_QUALITY} if kind == "JPEG" else {}))
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(pixels: np.ndarray) -> Image.Image:
    """`[H, W, 3]` uint8 at most `THUMB` on its longest side; small images enlarged by a whole factor."""
    image = Image.fromarray(pixels)
    side = max(image.size)
    if side > THUMB:
        scale = THUMB / side
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.LANCZOS)
    factor = THUMB // side
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of a boolean mask that touch a pixel outside it (4-neighbourhood)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay(pixels: np.ndarray, plane: np.ndarray, mask: np.ndarray | None = None) -> Image.Image:
    """A map over its image as the grid plot draws it (`display_scale`: non-negative maps in inferno,
    signed ones red + and blue -, over the grey image), as a thumbnail, the mask outlined in green.

    Args:
        pixels: `[3, H, W]` uint8, the image as displayed.
        plane: `[h, w]` the map summed over channels (resized to `H, W` if it differs).
        mask: `[H, W]` bool, the known evidence, or None.
    """
    values = torch.from_numpy(np.asarray(plane, dtype=np.float32))
    if values.shape != pixels.shape[1:]:
        values = F.interpolate(values[None, None], size=pixels.shape[1:], mode="bilinear")[0, 0]
    scaled, cmap, vmin = display_scale(values)
    colours = matplotlib.colormaps[cmap](((scaled - vmin) / (1 - vmin)).numpy())[..., :3]
    grey = pixels.astype(np.float32).mean(axis=0)[..., None] / 255
    blended = ((1 - ALPHA) * grey + ALPHA * colours) * 255
    image = _thumbnail(blended.round().clip(0, 255).astype(np.uint8))
    if mask is not None:
        sized = Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)
        edge = _outline(np.asarray(sized) > 127)
        drawn = np.asarray(image).copy()
        drawn[edge] = OUTLINE
        image = Image.fromarray(drawn)
    return image


def _status(label: int, predicted: int) -> str:
    return "unlabelled" if label < 0 else "correct" if label == predicted else "incorrect"


def _top(scores: pd.Series) -> list[tuple[str, float]]:
    """The top-5 (name, probability) of a row of scores.csv; runs before it held them: the top-1."""
    top = []
    for k in range(1, 6):
        if f"top{k}_name" in scores and pd.notna(scores[f"top{k}_name"]):
            top.append((str(scores[f"top{k}_name"]), round(float(scores[f"top{k}_prob"]), 4)))
    return top or [(str(scores["target_name"]), round(float(scores["target_prob"]), 4))]


def _scores(folder: Path) -> pd.DataFrame:
    """A job's scores.csv by image id; ids and class names as text even where they look like numbers."""
    names = {
        c: str for c in ["image_id", "target_name", "label_name"] + [f"top{k}_name" for k in range(1, 6)]
    }
    return pd.read_csv(folder / "scores.csv", dtype=names).set_index("image_id")


def _curves(table: pd.DataFrame, ids: list[str]) -> tuple[dict[str, list[float]], dict[str, dict[str, list]]]:
    """From a job's curves.csv: each curve's x (fraction) and, per image, its scores."""
    xs, per_image = {}, {}
    for curve, sub in table.groupby("metric", sort=False):
        wide = sub.pivot(index="image_id", columns="point", values="score")
        xs[str(curve)] = sub.groupby("point")["fraction"].first().round(4).tolist()
        per_image[str(curve)] = {i: wide.loc[i].round(4).tolist() for i in ids if i in wide.index}
    return xs, per_image


def group_examples(rows: pd.DataFrame, fields: dict[str, str]) -> dict[str, Any]:
    """The browser's data of one (model, data): its rows, one job per method (the first)."""
    rows = rows.drop_duplicates("method")
    jobs = {str(r["method"]): Path(r["job_dir"]) for _, r in rows.iterrows()}
    first = next(iter(jobs.values()))
    scores = _scores(first)
    ids = [str(i) for i in scores.index[:MAX_IMAGES]]
    images: dict[str, dict[str, Any]] = {}
    for image_id in ids:
        s = scores.loc[image_id]
        label = int(s["label"])
        label_name = s.get("label_name") if "label_name" in s else None
        images[image_id] = {
            "id": image_id,
            "label": None if label < 0 else str(label_name) if pd.notna(label_name) else str(label),
            "pred": str(s["target_name"]),
            "status": _status(label, int(s["target"])),
            "top": _top(s),
            "maps": {},
            "curves": {},
            "values": {},
        }
    xs: dict[str, list[float]] = {}
    for method, folder in jobs.items():
        arrays = read_maps(folder)
        index = {str(i): n for n, i in enumerate(arrays["ids"])}
        mask = arrays.get("truth_mask")
        method_scores = _scores(folder)
        curve_x, curves = _curves(pd.read_csv(folder / "curves.csv", dtype={"image_id": str}), ids)
        xs |= curve_x
        for image_id, entry in images.items():
            if image_id not in index:  # merged sweeps whose jobs hold different images
                continue
            n = index[image_id]
            pixels = arrays["images"][n]
            if "src" not in entry:
                entry["src"] = data_uri(_thumbnail(pixels.transpose(1, 2, 0)))
            plane = arrays["maps"][n].astype(np.float32).sum(axis=0)
            entry["maps"][method] = data_uri(overlay(pixels, plane, None if mask is None else mask[n]))
            for curve, values in curves.items():
                if image_id in values:
                    entry["curves"].setdefault(curve, {})[method] = values[image_id]
            entry["values"][method] = {
                f: round(float(method_scores.loc[image_id, f]), 4)
                for f in fields
                if f in method_scores.columns and pd.notna(method_scores.loc[image_id, f])
            }
    return {
        "name": f"{rows['model'].iloc[0]} / {rows['data'].iloc[0]}",
        "methods": list(jobs),
        "fields": fields,
        "x": xs,
        "total": len(scores),
        "images": list(images.values()),
    }


def examples(rows: pd.DataFrame, fields: dict[str, str]) -> list[dict[str, Any]]:
    """The browser's data of every (model, data) of the sweep."""
    return [group_examples(group, fields) for _, group in rows.groupby(["model", "data"], sort=True)]
