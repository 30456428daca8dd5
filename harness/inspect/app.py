"""The Hydra app behind `python -m harness.inspect` (config `conf/inspect.yaml`).

Every name and setting is checked against the model before any picture is computed; the figures,
their arrays (`<figure>.npz`) and their settings (`<figure>.json`) are written into a hidden folder
beside `out` and moved into place at the end, so that a run that fails leaves no result files.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from harness.config import DeviceSettings, HarnessError, check_node, hydra_errors_in_one_line
from harness.data import load_data
from harness.inspect import figures, pictures
from harness.inspect.actmax import Ascent, Objective, best_chunk, maximise, pass_times
from harness.inspect.layers import check_units, class_index, conv_layer, conv_layers, layer
from harness.inspect.settings import check_known
from harness.runtime import SpeedOptions, available_memory, image_memory, resolve_device

log = logging.getLogger("harness.inspect")
CONF = Path(__file__).resolve().parents[2] / "conf"


class Writer:
    """Writes each figure with its arrays and settings into the staging folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: list[str] = []

    def __call__(self, stem: str, fig: Any, arrays: dict[str, np.ndarray], settings: dict[str, Any]) -> None:
        """Write `<stem>.png`, `<stem>.npz` and `<stem>.json`."""
        figures.save(fig, str(self.folder / f"{stem}.png"))
        np.savez_compressed(self.folder / f"{stem}.npz", **arrays)  # type: ignore[arg-type]
        (self.folder / f"{stem}.json").write_text(json.dumps(settings, indent=1, default=str))
        self.written.append(stem)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _check_settings(cfg: DictConfig) -> DeviceSettings:
    """What needs no model: the model and data nodes against their signatures, the device settings,
    then the figures' ranges and allowed values; returns the device settings.
    """
    check_known(cfg, CONF / "inspect.yaml")
    for where in ("model", "data"):
        check_node(cfg[where], where)
    device = DeviceSettings.from_config(cfg.device)
    if cfg.filters.normalise not in ("tile", "layer"):
        raise HarnessError(f"filters.normalise={cfg.filters.normalise!r}; expected 'tile' or 'layer'")
    for key in (
        "images",
        "filters.max_filters",
        "filters.max_channels",
        "features.max_channels",
        "actmax.steps",
        "weights.bins",
        "top_k.k",
    ):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HarnessError(f"{key}={value!r}; expected a positive integer")
    if cfg.actmax.chunk_size is not None and (
        not isinstance(cfg.actmax.chunk_size, int) or cfg.actmax.chunk_size < 1
    ):
        raise HarnessError(
            f"actmax.chunk_size={cfg.actmax.chunk_size!r}; expected null or a positive integer"
        )
    out = Path(cfg.out)
    if out.exists():
        raise HarnessError(f"out={str(out)!r} exists; give a new folder (nothing there is overwritten)")
    return device


def _channels(model: torch.nn.Module, name: str, sample: torch.Tensor) -> int:
    """The number of channels of layer `name`'s output (one forward of one image when not a conv)."""
    module = layer(model, name)
    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels
    with pictures.outputs(model, [name]) as kept, torch.no_grad():
        model(sample[:1])
    out = kept[name]
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise HarnessError(f"layer {name!r} does not output a [B, C, ...] tensor; choose another layer")
    return int(out.shape[1])


def _plan(cfg: DictConfig, clf: Any, images: torch.Tensor) -> dict[str, Any]:
    """Every name resolved and checked against the model: layers, channels, classes."""
    model, names = clf.module, clf.class_names
    plan: dict[str, Any] = {}
    first_conv = conv_layers(model)[0] if conv_layers(model) else ""
    if cfg.filters.enabled:
        plan["filters"] = cfg.filters.layer or first_conv
        conv_layer(model, plan["filters"])
    convs = conv_layers(model)
    act_layer = cfg.actmax.layer or (convs[len(convs) // 2] if convs else clf.cam_layer)
    if cfg.actmax.enabled:
        count = _channels(model, act_layer, images)
        plan["actmax_layer"] = act_layer
        plan["channels"] = check_units(
            list(cfg.actmax.channels),
            count,
            f"actmax.channels: layer {act_layer!r} has {count} channels; channel",
        )
        plan["classes"] = [class_index(c, names) for c in cfg.actmax.classes]
    if cfg.features.enabled:
        plan["features"] = list(cfg.features.layers or [act_layer])
        for name in plan["features"]:
            _channels(model, name, images)
        check_units([cfg.features.image], len(images), "features.image")
    if cfg.occlusion.enabled:
        side = clf.input_size
        window = int(cfg.occlusion.window or side // 4)
        stride = int(cfg.occlusion.stride or window)
        if not 0 < window <= side or stride < 1 or (side - window) % stride:
            raise HarnessError(
                f"occlusion.window={window}, occlusion.stride={stride} do not tile the {side}-pixel input: "
                f"need window <= {side} and ({side} - window) divisible by stride (e.g. both {side // 4})"
            )
        plan["occlusion"] = (window, stride)
    if cfg.saliency.enabled and cfg.saliency.target is not None:
        plan["target"] = class_index(cfg.saliency.target, names)
    return plan


def _chunk(objective: Objective, units: list[int], size: int, device: torch.device, budget: float) -> int:
    """Images per ascent chunk: `best_chunk` of the batch sizes up to the number of units that fit
    `budget` of the free memory.
    """
    sample = torch.rand(1, 3, size, size, device=device)
    memory = image_memory(objective.model, sample, device, grad=True, memory_format=torch.contiguous_format)
    fits = int((budget * available_memory(device) - memory.fixed) // max(memory.per_image, 1.0))
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= min(len(units), max(fits, 1))]
    return best_chunk(pass_times(objective, units, size, device, sizes), device)


@dataclass
class Inputs:
    """What every figure draws from: the model as loaded and its faster copy, the images and their
    display pixels, their ids, top-1 classes and the names resolved by `_plan`.
    """

    clf: Any
    model: torch.nn.Module
    fast: torch.nn.Module
    x: torch.Tensor
    shown: np.ndarray
    ids: list[str]
    top1: torch.Tensor
    plan: dict[str, Any]


def run(cfg: DictConfig, staging: Path) -> list[str]:
    """Compute and write every enabled figure into `staging`; returns their names."""
    settings = _check_settings(cfg)
    device = resolve_device(settings.name)
    torch.manual_seed(int(cfg.seed))
    inputs = _inputs(cfg, settings, device)
    write = Writer(staging)
    figures_of = {
        "top_k": _top_k, "saliency": _saliency, "filters": _filters, "features": _features,
        "actmax": lambda c, i, w: _actmax(c, i, device, settings.memory_budget, w),
        "occlusion": _occlusion, "weights": _weights,
    }  # fmt: skip
    for key, draw in figures_of.items():
        if cfg[key].enabled:
            draw(cfg, inputs, write)
    return write.written


def _inputs(cfg: DictConfig, settings: DeviceSettings, device: torch.device) -> Inputs:
    """The model, its images on `device`, every name checked, and the faster copy: the same function,
    run faster (memory format, paddings and BatchNorms folded), the layers shown or maximised keeping
    their own outputs.
    """
    clf = instantiate(cfg.model)
    data = load_data(cfg.data, clf.input_size, clf.mean, clf.std, clf.class_names)
    n = min(int(cfg.images), len(data.ids))
    x, ids = data.images[:n].to(device), list(data.ids[:n])
    model = clf.module.to(device).eval()  # as loaded: the weights shown are the model's own
    plan = _plan(cfg, clf, x)
    fast = copy.deepcopy(model)
    read = {plan.get("actmax_layer"), *plan.get("features", [])} - {None}
    SpeedOptions.from_settings(settings).prepare(fast, x[:2], keep=read)
    for p in fast.parameters():
        p.requires_grad_(False)
    mean, std = torch.tensor(clf.mean).view(3, 1, 1), torch.tensor(clf.std).view(3, 1, 1)
    shown = (x.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        top1 = fast(x).argmax(dim=1)
    return Inputs(clf, model, fast, x, shown, ids, top1, plan)


def _top_k(cfg: DictConfig, i: Inputs, write: Writer) -> None:
    idx, probs = pictures.top_k(i.fast, i.x, int(cfg.top_k.k))
    labels = [[i.clf.class_names[c] for c in row] for row in idx]
    write(
        "top_k",
        figures.top_k_figure(i.shown, labels, probs, i.ids),
        {"classes": idx, "probabilities": probs},
        {"figure": "top_k", "k": int(cfg.top_k.k), "images": i.ids},
    )


def _saliency(cfg: DictConfig, i: Inputs, write: Writer) -> None:
    names = i.clf.class_names
    target = torch.full_like(i.top1, i.plan["target"]) if "target" in i.plan else i.top1
    panels = pictures.saliency_panels(i.fast, i.x, target)
    arrays = {k: v.cpu().numpy() for k, v in panels.items()} | {"target": target.cpu().numpy()}
    for n, image_id in enumerate(i.ids):
        t = int(target[n])
        one = {k: v[n] for k, v in arrays.items() if k != "target"}
        write(
            f"saliency_{_safe(image_id)}",
            figures.saliency_figure(i.shown[n], one, f"{image_id}: class {t} ({names[t]})"),
            {k: v[n : n + 1] for k, v in arrays.items()},
            {
                "figure": "saliency", "image": image_id, "target": t, "target_name": names[t],
                "methods": ["saliency", "guided_backprop"],
            },
        )  # fmt: skip


def _filters(cfg: DictConfig, i: Inputs, write: Writer) -> None:
    name, f = i.plan["filters"], cfg.filters
    conv = conv_layer(i.model, name)
    tiles = pictures.filter_tiles(i.model, name, int(f.max_filters), int(f.max_channels), str(f.normalise))
    title = f"{name}: {len(tiles)} of {conv.out_channels} filters, normalised per {f.normalise}"
    rgb = conv.in_channels == 3 and conv.groups == 1
    write(
        f"filters_{_safe(name)}",
        figures.tile_grid(tiles, title, rgb),
        {"tiles": tiles},
        {"figure": "filters", "layer": name, **_plain(f)},
    )


def _features(cfg: DictConfig, i: Inputs, write: Writer) -> None:
    k = int(cfg.features.image)
    maps = pictures.feature_maps(i.fast, i.x[k : k + 1], i.plan["features"], int(cfg.features.max_channels))
    for name, m in maps.items():
        write(
            f"features_{_safe(name)}",
            figures.map_grid(m[0], [f"channel {c}" for c in range(len(m[0]))], f"{name} on {i.ids[k]}"),
            {"maps": m},
            {"figure": "features", "layer": name, "image": i.ids[k], **_plain(cfg.features)},
        )


def _occlusion(cfg: DictConfig, i: Inputs, write: Writer) -> None:
    window, stride = i.plan["occlusion"]
    heat = pictures.occlusion_map(i.fast, i.x, i.top1, window, stride, float(cfg.occlusion.baseline))
    captions = [f"{n}: {i.clf.class_names[int(t)]}" for n, t in zip(i.ids, i.top1, strict=True)]
    write(
        "occlusion",
        figures.occlusion_figure(i.shown, heat, captions, "occlusion, top-1 class"),
        {"heat": heat, "target": i.top1.cpu().numpy()},
        {"figure": "occlusion", **_plain(cfg.occlusion), "window": window, "stride": stride},
    )


def _weights(cfg: DictConfig, i: Inputs, write: Writer) -> None:
    hist = pictures.weight_histograms(i.model, int(cfg.weights.bins))
    arrays = {f"{k}.counts": c for k, (c, _) in hist.items()} | {
        f"{k}.edges": e for k, (_, e) in hist.items()
    }
    write(
        "weights",
        figures.histogram_grid(hist, f"weights of {i.clf.name}, per layer"),
        arrays,
        {"figure": "weights", "layers": list(hist), **_plain(cfg.weights)},
    )


def _ascent(cfg: DictConfig) -> Ascent:
    a = cfg.actmax
    return Ascent(
        steps=int(a.steps),
        lr=float(a.lr),
        init_std=float(a.init_std),
        lp=float(a.lp),
        lp_weight=float(a.lp_weight),
        tv_weight=float(a.tv_weight),
        jitter=int(a.jitter),
        blur_every=int(a.blur_every),
        blur_sigma=float(a.blur_sigma),
        scale_every=int(a.scale_every),
        scales=(float(a.scales[0]), float(a.scales[1])),
        seed=int(cfg.seed),
    )


def _actmax(cfg: DictConfig, i: Inputs, device: torch.device, budget: float, write: Writer) -> None:
    """Activation maximisation of the chosen channels of a layer, then of the chosen classes."""
    settings, size = _ascent(cfg), int(cfg.actmax.size or i.clf.input_size)
    for what, layer_name, units in (
        ("channels", i.plan["actmax_layer"], i.plan["channels"]),
        ("classes", None, i.plan["classes"]),
    ):
        if not units:
            continue
        objective = Objective(i.fast, layer_name, i.clf.mean, i.clf.std)
        chunk = cfg.actmax.chunk_size or _chunk(objective, units, size, device, budget)
        started = time.perf_counter()
        images, start, end = maximise(objective, units, size, settings, device, chunk)
        seconds = time.perf_counter() - started
        names = i.clf.class_names
        labels = [
            f"{'class ' + names[u] if layer_name is None else f'channel {u}'}: {s:.2g} → {e:.2g}"
            for u, s, e in zip(units, start.tolist(), end.tolist(), strict=True)
        ]
        where = "output classes" if layer_name is None else layer_name
        title = f"activation maximisation of {where} ({settings.steps} steps)"
        write(
            f"actmax_{_safe(layer_name or 'classes')}",
            figures.image_grid(images.permute(0, 2, 3, 1).cpu().numpy(), labels, title),
            {"images": images.cpu().numpy(), "units": np.array(units), "start": start.numpy(),
             "end": end.numpy()},
            {
                "figure": "actmax", "layer": layer_name, what: units, "size": size, "chunk_size": chunk,
                "seconds": round(seconds, 2), **settings.as_dict(),
            },
        )  # fmt: skip
        log.info(
            "activation maximisation of %d %s of %s: %.1f s, chunks of %d",
            len(units),
            what,
            where,
            seconds,
            chunk,
        )


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


@hydra.main(version_base=None, config_path=str(CONF), config_name="inspect")
def main(cfg: DictConfig) -> None:
    """Write the model's pictures into `cfg.out`; a bad name or setting exits with one line."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")  # per call, about hooks
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", stream=sys.stderr
    )
    out = Path(cfg.out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        staging.mkdir(parents=True)
        written = run(cfg, staging)
        os.replace(staging, out)
    except (HarnessError, InstantiationException, ValueError, FileNotFoundError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"{len(written)} figures: {out}")


def cli() -> None:
    """`python -m harness.inspect`: the app, with Hydra's own errors in one line."""
    hydra_errors_in_one_line(main)
