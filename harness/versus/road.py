"""Our ROAD against its forward bound and against pytorch-grad-cam's `ROADCombined`, side by side.

    python -m harness.versus.road [--images 8] [--repeats 3] [--out DIR]

On EfficientNet-Lite0 at 224x224, run with the default comparison's CPU speed settings
(`conf/device/cpu.yaml`: BatchNorm folded, NHWC), and the sample photos, with the Grad-CAM maps of the
model's top-1 class, it times:

- `metrics.road` (9 percentages, most- and least-relevant first, noisy linear imputation on the
  device) against its bound: the model's own time for the images it forwards (18 per image), at the
  harness's chosen chunk size, timed just before and after each call;
- pytorch-grad-cam's `ROADCombined` (the same percentages and imputation, solved per image and per
  percentage with SciPy on the CPU; it also forwards the clean image once per percentage and order)
  on the same maps, per forwarded image and per image, alternating with ours.

pytorch-grad-cam is not a dependency of the harness: install it where this module can import it only
for this measurement, beside the project's torch (`pip install --target DIR --no-deps` and the
packages of `GRAD_CAM_PACKAGES`, then `PYTHONPATH=DIR`). Every figure is the best of `--repeats`
calls: on a shared machine interference only ever adds time. It writes `versus_road.csv` and
`versus_road.md` into `--out` when given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import OmegaConf

import methods
import metrics
from harness.data import photos
from harness.models import efficientnet_lite0
from harness.results import atomic_write
from harness.runtime import DEFAULT_BATCH_SIZES, ModelSpeed, SpeedOptions, count_forwards, machine_id, measure

log = logging.getLogger("harness")
CONF = Path(__file__).resolve().parents[2] / "conf"
PERCENTAGES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
# What pytorch-grad-cam 1.5.7's ROAD imports beyond this project's own dependencies.
GRAD_CAM_PACKAGES = "grad-cam ttach opencv-python-headless scikit-learn threadpoolctl joblib narwhals"


def _grad_cam_road() -> Any:
    try:
        from pytorch_grad_cam.metrics.road import ROADCombined
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    except ImportError as e:
        print(
            f"error: pytorch-grad-cam is not importable ({e}); install it for this measurement only, e.g.\n"
            f"  pip install --target /tmp/gradcam --no-deps {GRAD_CAM_PACKAGES}\n"
            "  PYTHONPATH=/tmp/gradcam python -m harness.versus.road",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    return ROADCombined, ClassifierOutputSoftmaxTarget


def compare(images: int, repeats: int) -> pd.DataFrame:
    """The rows of the comparison (see the module's docstring)."""
    road_combined, softmax_target = _grad_cam_road()
    device = torch.device("cpu")
    clf = efficientnet_lite0()
    model = clf.module.eval()
    x = photos(num_images=images, size=clf.input_size, mean=clf.mean, std=clf.std).images
    with torch.no_grad():
        target = model(x).argmax(1)
    maps = methods.grad_cam(model, x, target, layer=clf.cam_layer, chunk_size=images)
    # The model at the default comparison's CPU speed settings (conf/device/cpu.yaml).
    options = SpeedOptions.from_config(OmegaConf.load(CONF / "device" / "cpu.yaml"))
    options.prepare(model, x[:1])
    x = x.contiguous(memory_format=options.memory_format)
    speed = ModelSpeed(model, x, device, options.memory_format)
    speed.calibrate({"forward": DEFAULT_BATCH_SIZES["cpu"]})
    bs = speed.batch_size

    def ours() -> Any:
        torch.manual_seed(0)
        return metrics.road(model, x, maps, target, mean=tuple(clf.mean), std=tuple(clf.std), chunk_size=bs)

    cams = maps[:, 0].numpy()
    targets = [softmax_target(int(t)) for t in target]
    theirs_fn = road_combined(percentiles=list(PERCENTAGES))

    def theirs() -> Any:
        torch.manual_seed(0)
        return theirs_fn(x, cams, targets, model)

    _, bounded = measure(ours, device, model=model, speed=speed, min_repeats=repeats, max_repeats=repeats)
    best = {"ours": float("inf"), "grad_cam": float("inf")}
    forwards = {}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("grad_cam", theirs)):
            with count_forwards(model) as seen:
                _, t = measure(fn, device, warmup=lambda: None, min_repeats=1, max_repeats=1)
            forwards[name] = seen.forwards
            best[name] = min(best[name], t.best_ms)
    per_forward = {k: best[k] / forwards[k] for k in best}
    common = {"machine": machine_id(), "model": "efficientnet_lite0@224", "images": images, "batch_size": bs}
    rows = [
        ("ours: time / bound (forwards counted, imputation included)", bounded.bound_ratio),
        ("ours: ms per image", best["ours"] / images),
        ("ours: forwards per image", forwards["ours"] / images),
        ("grad-cam ROADCombined: ms per image", best["grad_cam"] / images),
        ("grad-cam ROADCombined: forwards per image", forwards["grad_cam"] / images),
        ("grad-cam ROADCombined: time / our bound", best["grad_cam"] / (bounded.bound_ms or float("nan"))),
        ("grad-cam / ours, per image", best["grad_cam"] / best["ours"]),
        ("grad-cam / ours, per forwarded image", per_forward["grad_cam"] / per_forward["ours"]),
        ("model forward, ms per image (bound loops)", (bounded.bound_ms or float("nan")) / forwards["ours"]),
    ]
    return pd.DataFrame([common | {"check": c, "value": v} for c, v in rows])


def main(argv: list[str] | None = None) -> None:
    """Command line: print the comparison and write it into `--out`."""
    parser = argparse.ArgumentParser(prog="python -m harness.versus.road", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8, help="sample photos (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="calls of each, the best kept (default 3)")
    parser.add_argument("--out", type=Path, help="folder for versus_road.csv and .md")
    args = parser.parse_args(argv)
    for name in ("images", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}; expected a positive number")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = compare(args.images, args.repeats)
    text = table[["check", "value"]].to_markdown(index=False, floatfmt=".3f")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "versus_road.csv", lambda p: table.to_csv(p, index=False))
        settings = table.iloc[0][["machine", "model", "images", "batch_size"]].to_dict()
        atomic_write(args.out / "versus_road.md", lambda p: p.write_text(f"{settings}\n\n{text}\n"))


if __name__ == "__main__":
    main()
