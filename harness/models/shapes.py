"""`shapes_cnn`: a small residual CNN that the harness trains, in-process, on the generated shapes.

The first job that needs it trains it on the data's `train` split and measures its accuracy on the
held-out `val` split (never on the `test` images that jobs score); the weights and those figures are
cached outside git, in `$HARNESS_CACHE` (default `~/.cache/attribution-harness`) under a folder keyed by
the data's generator settings, the model's settings and the seed. A model below `min_accuracy` is
refused with a message, not used silently.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
from annotated_types import Gt, Interval
from torch import nn
from torch.nn import functional as F

from harness.config import HarnessError, cache_root, digest
from harness.data import generate
from harness.models.classifier import Classifier, Count, Side, seeded

log = logging.getLogger("harness")
MEAN = STD = (0.5, 0.5, 0.5)
SHAPES_TARGET = "harness.data.shapes"


class _Residual(nn.Module):
    """Two 3x3 conv-BN layers with a skip connection (1x1 conv where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.out(self.body(x) + self.skip(x))


class ShapesCNN(nn.Module):
    """Stem (5x5, stride 2), three residual stages (stride 1, 2, 2), global average pool, linear."""

    def __init__(self, num_classes: int, width: int = 24) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 5, 2, 2, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.stage1 = _Residual(w, w, 1)
        self.stage2 = _Residual(w, 2 * w, 2)
        self.stage3 = _Residual(2 * w, 4 * w, 2)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def generator_settings(data: Any, name: str = "shapes_cnn") -> dict[str, Any]:
    """The settings of the shapes generator that model `name` trains on (the job's `data` node)."""
    target = data.get("_target_") if hasattr(data, "get") else None
    if target != SHAPES_TARGET:
        raise HarnessError(
            f"model {name} is trained on the generated shapes; got data {target!r}: use data=shapes"
        )
    keys = ("classes", "distractors", "scale", "seed")
    return {k: (list(data[k]) if k in ("classes", "scale") else data[k]) for k in keys}


def _batches(n: int, batch: int, g: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=g)
    return [order[i : i + batch] for i in range(0, n - batch + 1, batch)]


def train(
    module: nn.Module, data: dict[str, Any], size: int, settings: dict[str, Any], seed: int
) -> dict[str, Any]:
    """Train `module` in place on the `train` split (AdamW, one-cycle schedule, random flips);
    returns the held-out accuracy on `val` and the time taken.
    """
    started = time.perf_counter()
    gen = {k: data[k] for k in ("classes", "distractors", "scale")} | {"size": size, "seed": data["seed"]}
    pixels, labels, _ = generate(settings["train_images"], split="train", **gen)
    x = (pixels - 0.5) / 0.5
    g = torch.Generator().manual_seed(seed)
    epochs, batch = settings["epochs"], settings["batch_size"]
    steps = epochs * (len(x) // batch)
    opt = torch.optim.AdamW(module.parameters(), lr=settings["lr"], weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings["lr"], total_steps=steps)
    module.train()
    for _ in range(epochs):
        for rows in _batches(len(x), batch, g):
            xb = x[rows]
            flip = torch.rand(len(rows), generator=g) < 0.5  # every class is mirror-symmetric
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(module(xb), labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    module.eval()
    held_x, held_y, _ = generate(settings["val_images"], split="val", **gen)
    with torch.no_grad():
        pred = torch.cat([module((c - 0.5) / 0.5).argmax(1) for c in held_x.split(512)])
    return {
        "held_out_accuracy": float((pred == held_y).float().mean()),
        "held_out_images": len(held_y),
        "train_images": len(x),
        "train_s": time.perf_counter() - started,
    }


def shapes_cnn(
    data: Mapping[str, Any],
    input_size: Side = 64,
    width: Count = 24,
    train_images: Count = 12000,
    val_images: Count = 2000,
    epochs: Count = 4,
    batch_size: Count = 64,
    lr: Annotated[float, Gt(0)] = 4e-3,
    min_accuracy: Annotated[float, Interval(ge=0, le=1)] = 0.95,
    seed: int = 0,
    cam_layer: str = "stage3",
    blocks: list[str | list[str]] | None = None,
) -> Classifier:
    """The shapes model for the job's `data` (its config node, which must be `data=shapes`), trained
    once and cached (see the module's docstring); its held-out accuracy goes into the row.

    Args:
        data: the job's data config; the model learns the classes that it generates.
        input_size: side of the input (the data is generated at this size).
        width: channels of the first stage (then twice and four times as many).
        train_images: images of the training split.
        val_images: images of the held-out split, for the accuracy.
        epochs: passes over the training split.
        batch_size: images per step.
        lr: the one-cycle schedule's peak learning rate (AdamW).
        min_accuracy: a model whose held-out accuracy is lower is refused.
        seed: draws the initial weights and the batches.
        cam_layer: the layer that Grad-CAM explains.
        blocks: stages for the sanity checks, in forward order (see `Classifier.blocks`).
    """
    gen = generator_settings(data)
    settings = {
        "input_size": input_size, "width": width, "train_images": train_images, "val_images": val_images,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
    }  # fmt: skip
    classes = list(gen["classes"])
    with seeded(seed):
        module = ShapesCNN(len(classes), width)
    facts = trained_once(module, "shapes_cnn", gen, settings, min_accuracy)
    return Classifier.from_module(
        module, "shapes_cnn", input_size, class_names=classes, num_classes=len(classes), pretrained=True,
        mean=MEAN, std=STD, cam_layer=cam_layer, blocks=blocks,
        facts={k: facts[k] for k in ("held_out_accuracy", "held_out_images", "train_images", "train_s")},
    )  # fmt: skip


def trained_once(
    module: nn.Module, name: str, gen: dict[str, Any], settings: dict[str, Any], min_accuracy: float
) -> dict[str, Any]:
    """`module` with the weights cached for model `name` under its settings, trained there once;
    the facts of its training. A model whose held-out accuracy is below `min_accuracy` is refused.
    """
    folder = cache_root() / name / digest({"data": gen, "model": settings})
    if (folder / "facts.json").is_file():
        module.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
        facts = dict(json.loads((folder / "facts.json").read_text()))
    else:
        log.info(
            "%s: training on %d generated images (once; cached in %s)", name, settings["train_images"], folder
        )
        with seeded(settings["seed"]):
            facts = train(module, gen, settings["input_size"], settings, settings["seed"])
        _save(folder, module, facts | {"data": gen, "model": settings})
    log.info("%s: held-out accuracy %.4f", name, facts["held_out_accuracy"])
    if facts["held_out_accuracy"] < min_accuracy:
        raise HarnessError(
            f"{name} reached a held-out accuracy of {facts['held_out_accuracy']:.4f} on "
            f"{facts['held_out_images']} images, below model.min_accuracy={min_accuracy}; train longer "
            f"(model.epochs, model.train_images) or lower model.min_accuracy (cached in {folder})"
        )
    return facts


def _save(folder: Path, module: nn.Module, facts: dict[str, Any]) -> None:
    """Write the weights, then the facts (whose presence marks the cache entry complete), each
    through a temporary file, so that a killed training leaves no entry that looks complete.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"model.pt.{os.getpid()}.tmp"
    torch.save(module.state_dict(), tmp)
    tmp.replace(folder / "model.pt")
    tmp = folder / f"facts.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(facts, indent=1))
    tmp.replace(folder / "facts.json")
