"""Our defaults against the model's own bound and against Captum's defaults, measured side by side.

`python -m harness.versus.captum --out results/published/<machine>` runs, for each setting (ResNet-18
at 96x96, EfficientNet-Lite0 at 224x224, the eight sample photos):

- occlusion, integrated gradients (50 steps) and the deletion and insertion curves at the harness's
  chosen chunk sizes, each with its forward (or forward+backward) bound timed beside every call;
- Captum's default occlusion (`perturbations_per_eval=1`) on one image against ours on the same image,
  and Captum's default integrated gradients (no `internal_batch_size`: all 8 x 50 image-steps in one
  batch) against ours on the eight images, per forwarded image, alternating the two calls.

Ours runs with the harness's defaults (channels_last, BatchNorm folded into the convolutions, the
chosen chunk sizes); Captum gets the model as given, with channels_last inputs too. Every figure is
the best of several repeats: on a shared machine interference only ever adds time.
It writes `versus_captum.csv` and `versus_captum.md` into `--out`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from captum.attr import IntegratedGradients, Occlusion

import methods
import metrics
from harness.data import photos
from harness.models import Classifier, efficientnet_lite0, torchvision_classifier
from harness.results import atomic_write
from harness.runtime import (
    DEFAULT_BATCH_SIZES,
    ModelSpeed,
    available_memory,
    count_forwards,
    fold_batchnorm,
    image_memory,
    machine_id,
    measure,
    synchronize,
)

log = logging.getLogger("harness")
SETTINGS: dict[str, Callable[[], Classifier]] = {
    "resnet18@96": lambda: torchvision_classifier("resnet18", "layer4", input_size=96),
    "efficientnet_lite0@224": lambda: efficientnet_lite0(),
}
WINDOW, STRIDE, IG_STEPS = 32, 16, 50


def side_by_side(
    ours: Callable[[], Any],
    theirs: Callable[[], Any],
    models: tuple[torch.nn.Module, torch.nn.Module],
    device: torch.device,
    repeats: int,
) -> dict[str, float]:
    """Alternate the two calls `repeats` times after a warm-up each; best ms per forwarded image."""
    best = {"ours": float("inf"), "captum": float("inf")}
    images = {}
    for fn in (ours, theirs):
        fn()
    synchronize(device)
    for _ in range(repeats):
        for name, fn, model in (("ours", ours, models[0]), ("captum", theirs, models[1])):
            with count_forwards(model) as seen:
                _, t = measure(fn, device, warmup=lambda: None, min_repeats=1, max_repeats=1)
            images[name] = seen.forwards + seen.backwards
            best[name] = min(best[name], t.best_ms)
    return {
        "ours_ms_per_forward": best["ours"] / images["ours"],
        "captum_ms_per_forward": best["captum"] / images["captum"],
        "ours_forwards": images["ours"],
        "captum_forwards": images["captum"],
        "speedup": (best["captum"] / images["captum"]) / (best["ours"] / images["ours"]),
    }


@dataclass
class Setup:
    """One setting's model as a user passes it to Captum (`captum_model`) and as ours runs it
    (`model`: BatchNorm folded), the photos, their top-1 classes, and the chosen chunk sizes.
    """

    name: str
    captum_model: torch.nn.Module
    model: torch.nn.Module
    x: torch.Tensor
    t: torch.Tensor
    speed: ModelSpeed
    folded: int

    @property
    def bs(self) -> int:  # noqa: D102
        return self.speed.batch_size

    @property
    def grad_bs(self) -> int:  # noqa: D102
        assert self.speed.grad_batch_size is not None  # backward sizes were calibrated
        return self.speed.grad_batch_size

    def common(self, device: torch.device) -> dict[str, Any]:
        """The fields every row of this setting carries."""
        return {
            "setting": self.name, "device": device.type, "machine": machine_id(), "batch_size": self.bs,
            "grad_batch_size": self.grad_bs, "batchnorms_folded": self.folded,
        }  # fmt: skip


def _setup(setting: str, device: torch.device) -> Setup:
    """The setting's model on the eight photos, both ways, with its chunk sizes calibrated."""
    clf = SETTINGS[setting]()
    data = photos(num_images=8, size=clf.input_size, mean=clf.mean, std=clf.std)
    # Captum gets the model as a user would pass it; ours runs it with the harness's default options
    # (channels_last inputs for both, BatchNorm folded for ours), and its bound runs the same model.
    captum_model = clf.module.to(device).to(memory_format=torch.channels_last)
    x = data.images.to(device).contiguous(memory_format=torch.channels_last)
    model = copy.deepcopy(captum_model)
    folded = fold_batchnorm(model, x[:2])
    with torch.no_grad():
        t = model(x).argmax(1)
    speed = ModelSpeed(model, x, device, torch.channels_last)
    sizes = DEFAULT_BATCH_SIZES[device.type]
    speed.calibrate({"forward": sizes, "forward_backward": sizes})
    log.info(
        "%s: batch sizes %d (forward), %s (forward+backward)",
        setting,
        speed.batch_size,
        speed.grad_batch_size,
    )
    return Setup(setting, captum_model, model, x, t, speed, folded)


def _bounded(s: Setup, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """Our occlusion, integrated gradients and curves against their bounds."""
    occ: dict[str, Any] = {"window": WINDOW, "stride": STRIDE, "chunk_size": s.bs}
    maps = methods.saliency(s.model, s.x, s.t, chunk_size=s.grad_bs)
    calls: dict[str, Callable[[], Any]] = {
        "occlusion": lambda: methods.occlusion(s.model, s.x, s.t, **occ),
        "integrated_gradients": lambda: methods.integrated_gradients(
            s.model, s.x, s.t, n_steps=IG_STEPS, chunk_size=s.grad_bs
        ),
        "deletion": lambda: metrics.deletion(s.model, s.x, maps, s.t, chunk_size=s.bs),
        "insertion": lambda: metrics.insertion(s.model, s.x, maps, s.t, chunk_size=s.bs),
    }
    rows = []
    for name, fn in calls.items():
        _, timing = measure(
            fn, device, model=s.model, speed=s.speed, min_repeats=repeats, max_repeats=repeats
        )
        rows.append(
            {
                "check": f"{name}: time / bound",
                "value": timing.bound_ratio,
                "target": "<= 1.1",
                "holds": timing.bound_ratio is not None and timing.bound_ratio <= 1.1,
                "ms_per_image": timing.best_ms / len(s.x),
                "bound_ms_per_image": timing.bound_ms / len(s.x) if timing.bound_ms else None,
                "forwards_per_image": (timing.forwards + timing.backwards) / len(s.x),
            }
        )
    return rows


def _occlusion_vs(s: Setup, repeats: int, device: torch.device) -> dict[str, float]:
    """Captum's default occlusion (`perturbations_per_eval=1`) against ours, on one image."""
    scorer = torch.nn.Sequential(s.captum_model, torch.nn.Softmax(dim=1))
    one, t1, c = s.x[:1], s.t[:1], s.x.shape[1]
    occ: dict[str, Any] = {"window": WINDOW, "stride": STRIDE, "chunk_size": s.bs}
    return side_by_side(
        lambda: methods.occlusion(s.model, one, t1, **occ),
        lambda: Occlusion(scorer).attribute(
            one,
            sliding_window_shapes=(c, WINDOW, WINDOW),
            strides=(c, STRIDE, STRIDE),
            baselines=0.0,
            target=t1,
        ),
        (s.model, s.captum_model),
        device,
        repeats,
    )


def _ig_vs(s: Setup, repeats: int, device: torch.device) -> tuple[dict[str, float], int, str]:
    """Captum's default integrated gradients (every image-step in one batch) against ours, on the most
    images whose batch fits half the available memory (EfficientNet-Lite0 at 224: 8 x 50 steps did
    not fit in 24 GB), by the harness's (conservative) estimate; with the images compared and a note.
    """
    need = image_memory(s.captum_model, s.x, device, True, torch.channels_last).per_image * IG_STEPS
    room = 0.5 * available_memory(device)
    k = next((k for k in (8, 4, 2, 1) if k * need <= room), 0)
    note = "" if k == 8 else (
        f"Captum's default on 8 images needs about {8 * need / 2**30:.0f} GiB (estimate), "
        f"{room / 2**30:.0f} GiB is half the free memory: compared on {k} image(s)"
    )  # fmt: skip
    if not k:
        return {"speedup": float("nan")}, k, note
    vs = side_by_side(
        lambda: methods.integrated_gradients(
            s.model, s.x[:k], s.t[:k], n_steps=IG_STEPS, chunk_size=s.grad_bs
        ),
        lambda: IntegratedGradients(s.captum_model).attribute(
            s.x[:k], target=s.t[:k], n_steps=IG_STEPS, method="gausslegendre"
        ),
        (s.model, s.captum_model),
        device,
        repeats,
    )
    return vs, k, note


def check(setting: str, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """All figures for one model and input size."""
    s = _setup(setting, device)
    rows = _bounded(s, repeats, device)
    ig_vs, k, ig_note = _ig_vs(s, repeats, device)
    compared = (
        ("occlusion, 1 image: Captum default (perturbations_per_eval=1) / ours, per forward",
         _occlusion_vs(s, repeats, device), 2.0, ""),
        (f"integrated gradients, {k} images: Captum default (no internal_batch_size) / ours, per forward",
         ig_vs, 1.15, ig_note),
    )  # fmt: skip
    for name, vs, target, note in compared:
        value = vs["speedup"]
        rows.append(
            {"check": name, "value": value, "target": f">= {target}", "holds": value >= target, "note": note}
            | vs
        )
    return [s.common(device) | r for r in rows]


def to_markdown(table: pd.DataFrame) -> str:
    """The checks as a Markdown table."""
    lines = ["| setting | check | value | target | holds |", "| --- | --- | --- | --- | --- |"]
    for _, r in table.iterrows():
        lines.append(
            f"| {r.setting} | {r.check} | {r.value:.3f} | {r.target} | {'yes' if r.holds else 'NO'} |"
        )
    notes = [
        f"- {r.setting}: {r.note}" for _, r in table.iterrows() if isinstance(r.get("note"), str) and r.note
    ]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def main(argv: list[str] | None = None) -> None:
    """Run the checks and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for versus_captum.csv and .md")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per figure; the best is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")
    device = torch.device(args.device)
    table = pd.DataFrame([row for s in args.settings for row in check(s, args.repeats, device)])
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"# Our defaults against the bound and against Captum ({machine_id()}, {args.device})"
    text = f"{title}\n\n{to_markdown(table)}\nBest of {args.repeats} repeats for every figure.\n"
    atomic_write(args.out / "versus_captum.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(args.out / "versus_captum.md", lambda p: p.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
