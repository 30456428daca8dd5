"""Data whose evidence is known: one shape per image sets the class, everything else carries none.

Each image is a crop of one of the sample photos (`harness.data.photos`' sources) with one object
pasted on it: a shape of a class (`circle`, `square`, ...) of random colour, size, rotation and
position, and optionally distractor bars (the same for every class, so they carry no class) drawn
beneath it. The object's exact pixel mask and its bounding box are the ground truth. Everything is
drawn from a generator seeded by `(seed, split)`: the same seed gives the same images, and the
`train`, `val` and `test` splits are disjoint draws (the model trains on `train`, reports its
held-out accuracy on `val`; jobs score `test`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.nn import functional as F

from harness.data.images import Images, photo_sources, rgb
from metrics.contract import GroundTruth

CLASSES = ("circle", "square", "triangle", "cross")
SPLITS = ("train", "val", "test")
_PHOTO_SIDE = 256


def _inside(form: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether points `(u, v)` in the shape's own frame (radius 1) lie inside `form`."""
    if form == "circle":
        return u**2 + v**2 <= 1.0
    if form == "square":
        return (u.abs() <= 0.8) & (v.abs() <= 0.8)
    if form == "triangle":  # equilateral, inscribed in the unit circle: vertices (0, 1), (+-sqrt(3)/2, -1/2)
        s = math.sqrt(3.0)
        return (v >= -0.5) & (s * u + v <= 1.0) & (-s * u + v <= 1.0)
    if form == "cross":
        return ((u.abs() <= 1.0) & (v.abs() <= 0.3)) | ((u.abs() <= 0.3) & (v.abs() <= 1.0))
    if form == "bar":  # the distractor: no class has it
        return (u.abs() <= 1.0) & (v.abs() <= 0.12)
    raise ValueError(f"unknown shape {form!r}; expected one of {', '.join(CLASSES)}")


def _draw(forms: Sequence[str], g: torch.Generator, size: int, scale: tuple[float, float]) -> torch.Tensor:
    """Masks `[N, size, size]` of one shape per form, each of random radius, rotation and position
    (wholly inside the image).
    """
    n = len(forms)
    radius = (scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=g)) * size / 2
    centre = radius[:, None] + (size - 2 * radius[:, None]) * torch.rand(n, 2, generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx = (xs[None] - centre[:, 0, None, None]) / radius[:, None, None]
    dy = (ys[None] - centre[:, 1, None, None]) / radius[:, None, None]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for form in set(forms):
        rows = torch.tensor([i for i, f in enumerate(forms) if f == form])
        masks[rows] = _inside(form, u[rows], v[rows])
    return masks


def _colours(n: int, g: torch.Generator) -> torch.Tensor:
    """`[N, 3]` saturated colours (random hue, saturation and value in [0.6, 1])."""
    h = torch.rand(n, generator=g)
    s, v = 0.6 + 0.4 * torch.rand(n, generator=g), 0.6 + 0.4 * torch.rand(n, generator=g)
    k = (torch.tensor([5.0, 3.0, 1.0])[None] + 6 * h[:, None]) % 6
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


@cache
def _photos() -> torch.Tensor:
    """The sample photos as `[P, 3, 256, 256]` floats in [0, 1], the pool backgrounds are cut from."""
    side = [_PHOTO_SIDE, _PHOTO_SIDE]
    return (
        torch.stack(
            [
                TF.resize(torch.from_numpy(np.array(rgb(load()))).permute(2, 0, 1), side, antialias=True)
                for _, load, _ in photo_sources()
            ]
        ).float()
        / 255
    )


def _backgrounds(n: int, g: torch.Generator, size: int) -> torch.Tensor:
    """`[N, 3, size, size]` random square crops (a quarter to all of a photo's side), maybe mirrored."""
    pool = _photos()
    which = torch.randint(len(pool), (n,), generator=g)
    side = 0.25 + 0.75 * torch.rand(n, generator=g)
    corner = (1 - side)[:, None] * torch.rand(n, 2, generator=g)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = 2 * corner + side[:, None] - 1  # the crop's centre in [-1, 1]
    out = torch.empty(n, 3, size, size)
    for start in range(0, n, 256):  # bounded memory: 256 photos at a time
        rows = slice(start, start + 256)
        grid = F.affine_grid(theta[rows], [len(theta[rows]), 3, size, size], align_corners=False)
        out[rows] = F.grid_sample(pool[which[rows]], grid, mode="bilinear", align_corners=False)
    return out


def generate(
    n: int,
    *,
    size: int = 64,
    classes: Sequence[str] = CLASSES,
    distractors: int = 1,
    scale: Sequence[float] = (0.25, 0.4),
    seed: int = 0,
    split: str = "test",
) -> tuple[torch.Tensor, torch.Tensor, GroundTruth]:
    """Draw `n` images: pixels `[N, 3, size, size]` in [0, 1], labels `[N]`, and their ground truth.

    Args:
        n: number of images.
        size: side in pixels.
        classes: shape of each class, among `CLASSES`; classes are balanced (image i has class
            i mod K before shuffling).
        distractors: bars drawn under the object in every image, whatever its class.
        scale: the object's diameter as a share of the side, drawn uniformly in this range.
        seed: the data's seed.
        split: `train`, `val` or `test`; each is its own draw.
    """
    check(size=size, classes=classes, distractors=distractors, scale=scale, split=split)
    g = torch.Generator().manual_seed(int(seed) * len(SPLITS) + SPLITS.index(split) + 7919)
    labels = torch.arange(n) % len(classes)
    labels = labels[torch.randperm(n, generator=g)]
    pixels = _backgrounds(n, g, size)
    lo, hi = float(scale[0]), float(scale[1])
    for _ in range(distractors):
        bars = _draw(["bar"] * n, g, size, (lo, hi))
        pixels = torch.where(bars[:, None], _colours(n, g)[:, :, None, None], pixels)
    masks = _draw([classes[int(k)] for k in labels], g, size, (lo, hi))
    pixels = torch.where(masks[:, None], _colours(n, g)[:, :, None, None], pixels)
    return pixels, labels, GroundTruth.from_masks(masks)


def check(*, size: int, classes: Sequence[str], distractors: int, scale: Sequence[float], split: str) -> None:
    """Raise `ValueError` naming a bad generator setting and what is allowed."""
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"data.size={size!r}; expected an integer >= 16")
    unknown = [c for c in classes if c not in CLASSES]
    if unknown or len(set(classes)) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"data.classes={list(classes)}; expected 2 or more distinct of {', '.join(CLASSES)}")
    if not isinstance(distractors, int) or distractors < 0:
        raise ValueError(f"data.distractors={distractors!r}; expected an integer >= 0")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"data.scale={list(scale)}; expected [low, high] with 0 < low <= high <= 1")
    if split not in SPLITS:
        raise ValueError(f"data.split={split!r}; expected one of {', '.join(SPLITS)}")


def shapes(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_images: int = 32,
    classes: Sequence[str] = CLASSES,
    distractors: int = 1,
    scale: Sequence[float] = (0.25, 0.4),
    seed: int = 0,
    split: str = "test",
) -> Images:
    """The generated shapes (see `generate`) normalised for the model, with their masks and boxes.

    `size` is the model's input side (`model.input_size`), as for every data set.
    """
    pixels, labels, truth = generate(
        num_images, size=size, classes=classes, distractors=distractors, scale=scale, seed=seed, split=split
    )
    images = TF.normalize(pixels, list(mean), list(std))
    ids = [f"{split}{seed}_{i:04d}_{classes[int(k)]}" for i, k in enumerate(labels)]
    return Images(images, labels, ids, "shapes", ground_truth=truth)
