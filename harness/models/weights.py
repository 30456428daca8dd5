"""Loading a model's weights from a file, with one clear line for every way a file can be wrong.

`load_weights` takes a state dict saved by `torch.save`, or a checkpoint that holds one under a key
(`state_dict` for Lightning, `model`, `model_state_dict`, ... or the key you name), or a
`.safetensors` file, whatever the file is called. It strips a prefix from the keys (the one you name,
or `module.`, `model.`, `_orig_mod.` when only that makes the keys fit), and when the keys or shapes
do not fit the model it says which, with the number of classes the file holds when that is the
difference. Files are read with `weights_only=True`: a pickle of Python objects is refused, never run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.config import HarnessError, MissingFile, first_line

# Keys under which checkpoints commonly hold the state dict, tried in this order.
STATE_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "state_dict_ema",
    "model_ema",
    "net",
    "network",
    "module",
)
# Prefixes that wrappers add to every key: DataParallel, Lightning modules, torch.compile, ...
AUTO_PREFIXES = ("module.", "model.", "_orig_mod.", "net.", "network.")
SUFFIXES = ".pt, .pth, .ckpt, .bin, .safetensors"


def _short(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _is_state(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def read_file(path: str, what: str = "model.weights") -> Any:
    """The object saved in `path` (tensors and containers only), or one clear `HarnessError`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingFile(f"{what}={path!r}: no such file; expected a checkpoint ({SUFFIXES})")
    if not p.is_file():
        raise HarnessError(f"{what}={path!r} is a folder; expected a checkpoint file ({SUFFIXES})")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise HarnessError(
                f"{what}={path!r} is a .safetensors file; pip install safetensors to read it"
            ) from None
        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 (the library raises several types)
            raise HarnessError(f"{what}={path!r} is not a safetensors file ({first_line(e, 200)})") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle and zip errors of many types)
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if "Weights only load failed" in text:
            obj = f" ({found.group(1)})" if found else ""
            raise HarnessError(
                f"{what}={path!r} holds Python objects besides tensors{obj}, which are not loaded "
                "(weights_only); save the model's state dict instead: torch.save(model.state_dict(), path)"
            ) from None
        detail = first_line(e, 200) if isinstance(e, RuntimeError) else "it does not read as one"
        raise HarnessError(
            f"{what}={path!r} is not a PyTorch checkpoint ({detail}); expected a file written by torch.save"
        ) from None


def state_dict_of(
    obj: Any, path: str, key: str | None = None, what: str = "model.weights"
) -> dict[str, torch.Tensor]:
    """The state dict in a loaded checkpoint: `obj` itself, or `obj[key]`, or the first of
    `STATE_KEYS` that holds one.
    """
    if not isinstance(obj, Mapping):
        raise HarnessError(
            f"{what}={path!r} holds a {type(obj).__name__}; expected a state dict (names to tensors) or a "
            "dict holding one under a key such as state_dict"
        )
    if key is not None:
        if key not in obj:
            raise HarnessError(
                f"model.weights_key={key!r} is not in {path!r}; its keys: {_short(sorted(map(str, obj)), 8)}"
            )
        if not _is_state(obj[key]):
            raise HarnessError(
                f"model.weights_key={key!r} of {path!r} holds a {type(obj[key]).__name__}, not a state dict"
            )
        return dict(obj[key])
    if _is_state(obj):
        return dict(obj)
    for k in STATE_KEYS:
        if _is_state(obj.get(k)):
            return dict(obj[k])
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(obj) / 2:  # a state dict with a few extra entries (epoch, ...)
        return tensors
    raise HarnessError(
        f"{what}={path!r} holds no state dict under any of {', '.join(STATE_KEYS)}; its keys: "
        f"{_short(sorted(map(str, obj)), 8)}; name the key with model.weights_key=<key>"
    )


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def fit_keys(
    state: dict[str, torch.Tensor], expected: set[str], path: str, prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """The state with `prefix` stripped (and keys without it dropped); with no prefix given, the
    prefix among `AUTO_PREFIXES` that makes the most keys fit, if stripping one does.
    """
    if prefix:
        stripped = _strip(state, prefix)
        if not stripped:
            heads = sorted({k.split(".")[0] + "." for k in state})
            raise HarnessError(
                f"model.weights_prefix={prefix!r}: no key of {path!r} starts with it; its keys start with "
                f"{_short(heads, 6)}"
            )
        return stripped
    best, fit = state, len(expected & set(state))
    for p in AUTO_PREFIXES:
        stripped = _strip(state, p)
        n = len(expected & set(stripped))
        if n > fit:
            best, fit = stripped, n
    return best


def load_weights(
    module: nn.Module,
    path: str,
    *,
    key: str | None = None,
    prefix: str | None = None,
    name: str = "the model",
    classes_setting: str = "model.num_classes",
) -> None:
    """Load the weights in `path` into `module` (strictly), or raise one `HarnessError` line naming the
    file, what the model expects and what the file holds.

    Args:
        module: the model, built with its architecture's settings.
        path: the file (any name).
        key: the checkpoint's key that holds the state dict; None: the file itself, or a usual key.
        prefix: stripped from every key (keys without it are dropped); None: strip a usual wrapper
            prefix (`module.`, `model.`, ...) only when that makes the keys fit.
        name: the model, for messages.
        classes_setting: the setting that sets the number of classes, for the hint of a size mismatch.
    """
    state = state_dict_of(read_file(path), path, key)
    own = module.state_dict()
    state = fit_keys(state, set(own), path, prefix)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    sizes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or sizes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys of the model missing from the file ({_short(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} keys the model does not have ({_short(unexpected)})")
        for k in sizes[:2]:
            parts.append(f"{k} is {list(state[k].shape)} in the file, {list(own[k].shape)} in the model")
        hint = _classes_hint(module, own, state, sizes, classes_setting)
        raise HarnessError(f"model.weights={path!r} does not fit {name}: {'; '.join(parts)}{hint}")
    module.load_state_dict(state)


def _classes_hint(
    module: nn.Module,
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    sizes: list[str],
    setting: str,
) -> str:
    """`; the file has N classes: set <setting>=N` when the mismatch is the classifier's width."""
    out = _output_width(module)
    for k in sizes:
        if own[k].dim() >= 1 and own[k].shape[0] == out and state[k].shape[1:] == own[k].shape[1:]:
            n = state[k].shape[0]
            return f"; the file has {n} classes, the model {out}: set {setting}={n}"
    return ""


def _output_width(module: nn.Module) -> int | None:
    """The number of outputs of the last linear or convolution layer, in registration order."""
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
        elif isinstance(m, nn.Conv2d):
            last = m.out_channels
    return last
