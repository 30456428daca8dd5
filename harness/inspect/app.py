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
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from harness.checks import check_node
from harness.data import load_data
from harness.device import SpeedOptions, available_memory, image_memory, resolve_device
from harness.errors import HarnessError
from harness.inspect import figures, pictures
from harness.inspect.actmax import Ascent, Objective, best_chunk, maximise, pass_times
from harness.inspect.layers import check_units, class_index, conv_layer, conv_layers, layer

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


def _check_settings(cfg: DictConfig) -> None:
    """What needs no model: the model, data and device nodes against their signatures, then the
    figures' ranges and allowed values.
    """
    for where in ("model", "data"):
        check_node(cfg[where], where)
    check_node(cfg.device, "device", target="harness.device.device_settings")
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


def _channels(model: torch.nn.Module, name: str, sample: torch.Tensor) -> int:
    """The number of channels of layer `name`'s output (one forward of one image when not a conv)."""
    module = layer(model, name)
    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels
    with pictures._outputs(model, [name]) as kept, torch.no_grad():
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


def run(cfg: DictConfig, staging: Path) -> list[str]:
    """Compute and write every enabled figure into `staging`; returns their names."""
    _check_settings(cfg)
    device = resolve_device(cfg.device.name)
    torch.manual_seed(int(cfg.seed))
    clf = instantiate(cfg.model)
    data = load_data(cfg.data, clf.input_size, clf.mean, clf.std, clf.class_names)
    n = min(int(cfg.images), len(data.ids))
    x, ids = data.images[:n].to(device), list(data.ids[:n])
    model = clf.module.to(device).eval()  # as loaded: the weights shown are the model's own
    plan = _plan(cfg, clf, x)
    # The same function, run faster (memory format, paddings and BatchNorms folded), the layers
    # shown or maximised keeping their own outputs.
    fast = copy.deepcopy(model)
    read = {plan.get("actmax_layer"), *plan.get("features", [])} - {None}
    SpeedOptions.from_config(cfg.device).prepare(fast, x[:2], keep=read)
    for p in fast.parameters():
        p.requires_grad_(False)
    mean, std = torch.tensor(clf.mean).view(3, 1, 1), torch.tensor(clf.std).view(3, 1, 1)
    shown = (x.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    write = Writer(staging)
    with torch.no_grad():
        top1 = fast(x).argmax(dim=1)
    names = clf.class_names
    if cfg.top_k.enabled:
        idx, probs = pictures.top_k(fast, x, int(cfg.top_k.k))
        labels = [[names[i] for i in row] for row in idx]
        write(
            "top_k",
            figures.top_k_figure(shown, labels, probs, ids),
            {"classes": idx, "probabilities": probs},
            {"figure": "top_k", "k": int(cfg.top_k.k), "images": ids},
        )
    if cfg.saliency.enabled:
        target = torch.full_like(top1, plan["target"]) if "target" in plan else top1
        panels = pictures.saliency_panels(fast, x, target)
        arrays = {k: v.cpu().numpy() for k, v in panels.items()} | {"target": target.cpu().numpy()}
        for i, image_id in enumerate(ids):
            title = f"{image_id}: class {int(target[i])} ({names[int(target[i])]})"
            one = {k: v[i] for k, v in arrays.items() if k != "target"}
            write(
                f"saliency_{_safe(image_id)}",
                figures.saliency_figure(shown[i], one, title),
                {k: v[i : i + 1] for k, v in arrays.items()},
                {
                    "figure": "saliency",
                    "image": image_id,
                    "target": int(target[i]),
                    "target_name": names[int(target[i])],
                    "methods": ["saliency", "guided_backprop"],
                },
            )
    if cfg.filters.enabled:
        conv = conv_layer(model, plan["filters"])
        tiles = pictures.filter_tiles(
            model,
            plan["filters"],
            int(cfg.filters.max_filters),
            int(cfg.filters.max_channels),
            str(cfg.filters.normalise),
        )
        rgb = conv.in_channels == 3 and conv.groups == 1
        write(
            f"filters_{_safe(plan['filters'])}",
            figures.tile_grid(
                tiles,
                f"{plan['filters']}: {len(tiles)} of {conv.out_channels} filters, "
                f"normalised per {cfg.filters.normalise}",
                rgb,
            ),
            {"tiles": tiles},
            {"figure": "filters", "layer": plan["filters"], **_plain(cfg.filters)},
        )
    if cfg.features.enabled:
        k = int(cfg.features.image)
        maps = pictures.feature_maps(fast, x[k : k + 1], plan["features"], int(cfg.features.max_channels))
        for name, m in maps.items():
            write(
                f"features_{_safe(name)}",
                figures.map_grid(m[0], [f"channel {c}" for c in range(len(m[0]))], f"{name} on {ids[k]}"),
                {"maps": m},
                {"figure": "features", "layer": name, "image": ids[k], **_plain(cfg.features)},
            )
    if cfg.actmax.enabled:
        _actmax(cfg, plan, fast, clf, device, write)
    if cfg.occlusion.enabled:
        window, stride = plan["occlusion"]
        heat = pictures.occlusion_map(fast, x, top1, window, stride, float(cfg.occlusion.baseline))
        captions = [f"{i}: {names[int(t)]}" for i, t in zip(ids, top1, strict=True)]
        write(
            "occlusion",
            figures.occlusion_figure(shown, heat, captions, "occlusion, top-1 class"),
            {"heat": heat, "target": top1.cpu().numpy()},
            {"figure": "occlusion", **_plain(cfg.occlusion), "window": window, "stride": stride},
        )
    if cfg.weights.enabled:
        hist = pictures.weight_histograms(model, int(cfg.weights.bins))
        arrays = {f"{k}.counts": c for k, (c, _) in hist.items()} | {
            f"{k}.edges": e for k, (_, e) in hist.items()
        }
        write(
            "weights",
            figures.histogram_grid(hist, f"weights of {clf.name}, per layer"),
            arrays,
            {"figure": "weights", "layers": list(hist), **_plain(cfg.weights)},
        )
    return write.written


def _actmax(
    cfg: DictConfig,
    plan: dict[str, Any],
    fast: torch.nn.Module,
    clf: Any,
    device: torch.device,
    write: Writer,
) -> None:
    a = cfg.actmax
    settings = Ascent(
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
    size = int(a.size or clf.input_size)
    for what, layer_name, units in (
        ("channels", plan["actmax_layer"], plan["channels"]),
        ("classes", None, plan["classes"]),
    ):
        if not units:
            continue
        objective = Objective(fast, layer_name, clf.mean, clf.std)
        chunk = a.chunk_size or _chunk(objective, units, size, device, float(cfg.device.memory_budget))
        started = time.perf_counter()
        images, start, end = maximise(objective, units, size, settings, device, chunk)
        seconds = time.perf_counter() - started
        names = clf.class_names
        labels = [
            f"{'class ' + names[u] if layer_name is None else f'channel {u}'}: {s:.2g} → {e:.2g}"
            for u, s, e in zip(units, start.tolist(), end.tolist(), strict=True)
        ]
        stem = f"actmax_{_safe(layer_name or 'classes')}"
        where = "output classes" if layer_name is None else layer_name
        write(
            stem,
            figures.image_grid(
                images.permute(0, 2, 3, 1).cpu().numpy(),
                labels,
                f"activation maximisation of {where} ({settings.steps} steps)",
            ),
            {
                "images": images.cpu().numpy(),
                "units": np.array(units),
                "start": start.numpy(),
                "end": end.numpy(),
            },
            {
                "figure": "actmax",
                "layer": layer_name,
                what: units,
                "size": size,
                "chunk_size": chunk,
                "seconds": round(seconds, 2),
                **settings.as_dict(),
            },
        )
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
