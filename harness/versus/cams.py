"""The CAM family and DeepLIFT against the libraries that define them, side by side on one machine.

`python -m harness.versus.cams --out results/published/<machine>` times, on EfficientNet-Lite0 at
224x224 (its `head` layer) and the sample photos, each method of ours against pytorch-grad-cam
1.5.7's and torchcam 0.5's where they have it, and DeepLIFT and DeepLIFT-SHAP against Captum's:

- every library gets the model as a user passes it, each its own standard call that ends in maps of
  the input's size: pytorch-grad-cam's `cam(input_tensor, targets)` (maps scaled and resized on the
  host, as it returns them), torchcam's extractor on the model's scores (its maps upsampled with
  torch), Captum's `attribute`; ours runs with the harness's defaults (channels_last, BatchNorm
  folded into the convolutions) at the chunk sizes the harness calibrates;
- the gradient methods on the eight photos; Score-CAM and Ablation-CAM, a forward per channel
  (1,280 of them), on one photo;
- the calls alternate, ours first, after one warm-up call each; every figure is the best of
  `--repeats` calls: on a shared machine interference only ever adds time.

It writes `versus_cams.csv` and `versus_cams.md` into `--out`: per method, ms per image for each
library, and how many times faster ours is than the faster of the others.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

import methods
from harness.results import atomic_write
from harness.runtime import machine_id, synchronize
from harness.versus.captum import Setup, _setup

log = logging.getLogger("harness")
SETTING, LAYER, SHAP_BASELINES = "efficientnet_lite0@224", "head", 10
# Ours, and the rivals' class names: pytorch-grad-cam's and torchcam's (None: it has none).
CAMS: dict[str, tuple[str | None, str | None]] = {
    "grad_cam": ("GradCAM", "GradCAM"),
    "grad_cam_plus_plus": ("GradCAMPlusPlus", "GradCAMpp"),
    "xgrad_cam": ("XGradCAM", "XGradCAM"),
    "layer_cam": ("LayerCAM", "LayerCAM"),
    "hires_cam": ("HiResCAM", None),
    "eigen_cam": ("EigenCAM", None),
    "full_grad": ("FullGrad", None),
    "score_cam": ("ScoreCAM", "ScoreCAM"),
    "ablation_cam": ("AblationCAM", None),
}
ONE_IMAGE = {"score_cam", "ablation_cam"}  # a forward per channel: one photo


def best_of(calls: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, float]:
    """Each call's best wall time in ms over `repeats` rounds, the calls alternating, after a warm-up."""
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, fn in calls.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
    return best


def _grad_cam_call(kind: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> Callable[[], Any]:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layers = [] if kind == "FullGrad" else [model.get_submodule(LAYER)]
    cam = getattr(pytorch_grad_cam, kind)(model=model, target_layers=layers)
    targets = [ClassifierOutputTarget(int(c)) for c in t]
    return lambda: cam(input_tensor=x, targets=targets)


def _torchcam_call(kind: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> Callable[[], Any]:
    from torchcam import methods as torchcam

    size, classes = tuple(x.shape[2:]), t.tolist()

    def call() -> torch.Tensor:
        with getattr(torchcam, kind)(model, target_layer=LAYER, input_shape=tuple(x.shape[1:])) as extractor:
            if kind == "ScoreCAM":  # forward-only: its hooks read the input of a plain forward
                with torch.no_grad():
                    model(x)
                (cam,) = extractor(class_idx=classes)
            else:
                (cam,) = extractor(class_idx=classes, scores=model(x))
        return F.interpolate(cam[:, None].detach(), size, mode="bilinear", align_corners=False)

    return call


def cams(s: Setup, device: torch.device, repeats: int, names: list[str]) -> list[dict[str, Any]]:
    """Each CAM of `names`: ours, pytorch-grad-cam's and torchcam's, ms per image."""
    rows = []
    for name in names:
        pgc, tc = CAMS[name]
        n = 1 if name in ONE_IMAGE else len(s.x)
        x, t = s.x[:n], s.t[:n]
        ours = getattr(methods, name)
        chunk = s.bs if methods.traits_of(ours).forward_only else s.grad_bs
        layer = {} if name == "full_grad" else {"layer": LAYER}
        calls: dict[str, Callable[[], Any]] = {
            "ours": partial(ours, s.model, x, t, chunk_size=chunk, **layer)
        }
        if pgc:
            calls["pytorch-grad-cam"] = _grad_cam_call(pgc, s.captum_model, x, t)
        if tc:
            calls["torchcam"] = _torchcam_call(tc, s.captum_model, x, t)
        log.info("%s on %d image(s): %s", name, n, ", ".join(calls))
        rows.append(_row(name, n, best_of(calls, device, repeats)))
    return rows


def deeplift(s: Setup, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """DeepLIFT (zero baseline) and DeepLIFT-SHAP (10 baselines, one photo) against Captum's."""
    from captum.attr import DeepLift, DeepLiftShap

    baselines = torch.randn((SHAP_BASELINES, *s.x.shape[1:]), generator=torch.Generator().manual_seed(0))
    baselines = baselines.to(device).contiguous(memory_format=torch.channels_last)
    one, t1 = s.x[:1], s.t[:1]
    zero = torch.zeros_like(s.x)
    lift = best_of(
        {
            "ours": lambda: methods.deeplift(s.model, s.x, s.t, chunk_size=s.grad_bs),
            "captum": lambda: DeepLift(s.captum_model).attribute(s.x, zero, target=s.t),
        },
        device,
        repeats,
    )
    shap = best_of(
        {
            "ours": lambda: methods.deeplift_shap(
                s.model, one, t1, n_baselines=SHAP_BASELINES, chunk_size=s.grad_bs
            ),
            "captum": lambda: DeepLiftShap(s.captum_model).attribute(one, baselines, target=t1),
        },
        device,
        repeats,
    )
    return [_row("deeplift", len(s.x), lift), _row(f"deeplift_shap ({SHAP_BASELINES} baselines)", 1, shap)]


def _row(name: str, images: int, best: dict[str, float]) -> dict[str, Any]:
    others = {k: v for k, v in best.items() if k != "ours"}
    fastest = min(others, key=others.__getitem__)
    return {
        "method": name,
        "images": images,
        **{f"{k}_ms_per_image": v / images for k, v in best.items()},
        "fastest_other": fastest,
        "speedup": others[fastest] / best["ours"],
    }


def to_markdown(table: pd.DataFrame) -> str:
    """The rows as a Markdown table, ms per image."""
    libraries = [c.removesuffix("_ms_per_image") for c in table.columns if c.endswith("_ms_per_image")]
    head = "| method | images | " + " | ".join(libraries) + " | ours faster than the faster other by |"
    lines = [head, "| --- | ---: | " + " | ".join("---:" for _ in libraries) + " | ---: |"]
    for _, r in table.iterrows():
        cells = [
            "" if pd.isna(r[f"{lib}_ms_per_image"]) else f"{r[f'{lib}_ms_per_image']:.1f}"
            for lib in libraries
        ]
        lines.append(
            f"| {r.method} | {r.images} | " + " | ".join(cells) + f" | {r.speedup:.2f}x ({r.fastest_other}) |"
        )
    return "\n".join(lines) + "\n"


def write(out: Path, stem: str, title: str, table: pd.DataFrame, repeats: int, s: Setup) -> None:
    """`<stem>.csv` and `<stem>.md` (the table in Markdown under `title`, with how it was timed) into
    `out`, and the Markdown printed.
    """
    text = (
        f"{title}\n\n{to_markdown(table)}\nms per image, best of {repeats} alternating calls after a "
        "warm-up; batch sizes: ours the harness's calibrated ones "
        f"({s.bs} forward, {s.grad_bs} forward+backward), the libraries their defaults.\n"
    )
    atomic_write(out / f"{stem}.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(out / f"{stem}.md", lambda p: p.write_text(text))
    print(text)


def main(argv: list[str] | None = None) -> None:
    """Run the comparisons and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for versus_cams.csv and .md")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per figure; the best is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", help="these methods only (names of ours)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    device = torch.device(args.device)
    s = _setup(SETTING, device)
    rows = cams(s, device, args.repeats, [n for n in CAMS if not args.only or n in args.only])
    if not args.only or "deeplift" in args.only:
        rows += deeplift(s, device, args.repeats)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    title = (
        f"# The CAM family and DeepLIFT against their libraries ({machine_id()}, {args.device}, {SETTING})"
    )
    write(args.out, "versus_cams", title, table, args.repeats, s)


if __name__ == "__main__":
    main()
