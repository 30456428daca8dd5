"""Our defaults against the model's own bound and against Captum's defaults, measured side by side.

`python -m harness.versus_captum --out results/published/<machine>` runs, for each setting (ResNet-18
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
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from captum.attr import IntegratedGradients, Occlusion

import methods
import metrics
from harness.data import photos
from harness.device import DEFAULT_BATCH_SIZES, available_memory, fold_batchnorm, image_memory
from harness.model_speed import ModelSpeed
from harness.models import Classifier, efficientnet_lite0, torchvision_classifier
from harness.results import atomic_write
from harness.timing import count_forwards, machine_id, measure, synchronize

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


def check(setting: str, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """All figures for one model and input size."""
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
    bs, grad_bs = speed.batch_size, speed.grad_batch_size
    assert grad_bs is not None  # backward sizes were given
    log.info("%s: batch sizes %d (forward), %d (forward+backward)", setting, bs, grad_bs)
    occ: dict[str, Any] = {"window": WINDOW, "stride": STRIDE, "chunk_size": bs}
    maps = methods.saliency(model, x, t, chunk_size=grad_bs)
    calls: dict[str, Callable[[], Any]] = {
        "occlusion": lambda: methods.occlusion(model, x, t, **occ),
        "integrated_gradients": lambda: methods.integrated_gradients(
            model, x, t, n_steps=IG_STEPS, chunk_size=grad_bs
        ),
        "deletion": lambda: metrics.deletion(model, x, maps, t, chunk_size=bs),
        "insertion": lambda: metrics.insertion(model, x, maps, t, chunk_size=bs),
    }
    rows = []
    common = {
        "setting": setting,
        "device": device.type,
        "machine": machine_id(),
        "batch_size": bs,
        "grad_batch_size": grad_bs,
        "batchnorms_folded": folded,
    }
    for name, fn in calls.items():
        _, timing = measure(fn, device, model=model, speed=speed, min_repeats=repeats, max_repeats=repeats)
        rows.append(
            common
            | {
                "check": f"{name}: time / bound",
                "value": timing.bound_ratio,
                "target": "<= 1.1",
                "holds": timing.bound_ratio is not None and timing.bound_ratio <= 1.1,
                "ms_per_image": timing.best_ms / len(x),
                "bound_ms_per_image": timing.bound_ms / len(x) if timing.bound_ms else None,
                "forwards_per_image": (timing.forwards + timing.backwards) / len(x),
            }
        )
    scorer = torch.nn.Sequential(captum_model, torch.nn.Softmax(dim=1))
    one, t1 = x[:1], t[:1]
    c = x.shape[1]
    occlusion_vs = side_by_side(
        lambda: methods.occlusion(model, one, t1, **occ),
        lambda: Occlusion(scorer).attribute(
            one,
            sliding_window_shapes=(c, WINDOW, WINDOW),
            strides=(c, STRIDE, STRIDE),
            baselines=0.0,
            target=t1,
        ),
        (model, captum_model),
        device,
        repeats,
    )
    # Captum's default forwards all image-steps in one batch; on a CPU with a few GB that may not fit
    # (EfficientNet-Lite0 at 224: 8 x 50 steps did not fit in 24 GB). Then compare on the most images
    # whose batch fits half the available memory, by the harness's (conservative) estimate.
    need = image_memory(captum_model, x, device, True, torch.channels_last).per_image * IG_STEPS
    room = 0.5 * available_memory(device)
    k = next((k for k in (8, 4, 2, 1) if k * need <= room), 0)
    ig_note = (
        ""
        if k == 8
        else (
            f"Captum's default on 8 images needs about {8 * need / 2**30:.0f} GiB (estimate), "
            f"{room / 2**30:.0f} GiB is half the free memory: compared on {k} image(s)"
        )
    )
    ig_vs = (
        side_by_side(
            lambda: methods.integrated_gradients(model, x[:k], t[:k], n_steps=IG_STEPS, chunk_size=grad_bs),
            lambda: IntegratedGradients(captum_model).attribute(
                x[:k], target=t[:k], n_steps=IG_STEPS, method="gausslegendre"
            ),
            (model, captum_model),
            device,
            repeats,
        )
        if k
        else {"speedup": float("nan")}
    )
    compared = (
        (
            "occlusion, 1 image: Captum default (perturbations_per_eval=1) / ours, per forward",
            occlusion_vs,
            2.0,
            "",
        ),
        (
            f"integrated gradients, {k} images: Captum default (no internal_batch_size) / ours, per forward",
            ig_vs,
            1.15,
            ig_note,
        ),
    )
    for name, vs, target, note in compared:
        value = vs["speedup"]
        rows.append(
            common
            | {
                "check": name,
                "value": value,
                "target": f">= {target}",
                "holds": value >= target,
                "note": note,
            }
            | vs
        )
    return rows


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
