"""Check a job's config against the functions it builds, before anything is built.

Every config node with a `_target_` (the model, the data, the method, each metric) names a function
whose signature says which settings exist and what type each takes; the device node's is
`harness.device.device_settings`. `check_config` refuses a
setting the function does not take (suggesting the closest one), a value of the wrong type
(`method.window=abc`), a required value left out (`data.root: ???`), and an empty metric list, each
with one line naming the bad value and what would be right. Ranges and allowed strings stay with
the functions' own checks, which run next (`harness.run.build`).
"""

from __future__ import annotations

import collections.abc
import difflib
import functools
import inspect
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from harness.errors import HarnessError

# Arguments that the harness passes itself when it builds a node (never settings of the config).
PASSED = {"data": ("size", "mean", "std", "class_names")}


def _describe(tp: Any) -> str:
    """A type as words: `int | None` -> `an integer or null`."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple, collections.abc.Sequence):
        return "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def matches(value: Any, tp: Any) -> bool:
    """Whether a plain config value (from `OmegaConf.to_container`) has the annotated type; types
    a config cannot hold (modules, callables) match anything.
    """
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or tp is object:
        return True
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and inner and Ellipsis not in args:
            return len(value) == len(inner) and all(matches(v, a) for v, a in zip(value, inner, strict=True))
        return not inner or all(matches(v, inner[0]) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


@functools.cache
def _signature(target: str) -> tuple[Any, dict[str, Any]]:
    """The parameters and annotations of the function a `_target_` names (once per process)."""
    try:
        fn = get_object(target)
    except Exception:  # noqa: BLE001 (the user's import errors of any type)
        return None, {}
    try:
        params = dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}, {}
    return params, _hints(fn)


def _hints(fn: Any) -> dict[str, Any]:
    """The function's parameter annotations, each evaluated on its own (one that names a type
    imported only for type checkers is left out, not an error).
    """
    target = fn.__init__ if inspect.isclass(fn) else fn
    raw = getattr(target, "__annotations__", {})
    space = {**vars(typing), **getattr(inspect.getmodule(target), "__dict__", {})}
    hints = {}
    for name, ann in raw.items():
        try:
            hints[name] = eval(ann, space) if isinstance(ann, str) else ann  # noqa: S307 (annotations)
        except Exception:  # noqa: BLE001, S112
            continue
    return hints


def check_node(node: DictConfig, where: str, target: str | None = None) -> None:
    """Check one node's settings against the signature of its `_target_`, or of `target` for a node
    that builds nothing (the device; see the module doc).
    """
    target = target or str(node.get("_target_"))
    params, hints = _signature(target)
    if params is None:
        raise HarnessError(
            f"{where}._target_={target!r} cannot be imported; expected a dotted path to a function"
        )
    open_ended = not params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    passed = PASSED.get(where, ())
    for key in node:
        key = str(key)
        if key.startswith("_"):
            continue
        if key not in params and not open_ended:
            settings = [
                n
                for n in known
                if n not in passed
                and (
                    n in node
                    or params[n].kind is params[n].KEYWORD_ONLY
                    or params[n].default is not params[n].empty
                )
            ]
            close = difflib.get_close_matches(key, settings, n=1)
            hint = f"did you mean {where}.{close[0]}? " if close else ""
            raise HarnessError(
                f"{where}.{key} is not a setting of {target.rsplit('.', 1)[-1]}; {hint}"
                f"its settings: {', '.join(settings)}"
            )
        if OmegaConf.is_missing(node, key):
            raise HarnessError(f"{where}.{key} is required; give {where}.{key}=<value>")
        if key not in hints or OmegaConf.is_interpolation(node, key):
            continue  # an interpolation (`${device.batch_size}`) is filled in later
        item = node[key]
        value = (
            OmegaConf.to_container(item, resolve=True) if isinstance(item, (DictConfig, ListConfig)) else item
        )
        if not matches(value, hints[key]):
            raise HarnessError(f"{where}.{key}={_show(value)}; expected {_describe(hints[key])}")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# Settings that name files or folders, checked to exist before anything is built: (node, key, what
# is expected, whether a folder).
PATHS = [
    ("model", "weights", "a checkpoint file", False),
    ("model", "weights_path", "a checkpoint file", False),
    ("model", "class_names", "a file of class names, one per line", False),
    ("data", "root", "a folder of class subfolders of images (root/<class>/<image>)", True),
    ("data", "classes", "a mapping file or {folder: class}", False),
    ("data", "boxes", "a folder of Pascal VOC XML files or a CSV file", None),
]


def names_a_file(text: str) -> bool:
    """Whether a `weights` value is meant as a file: it has a folder, a suffix or `~`, or exists
    (`IMAGENET1K_V1`, a torchvision weights name, has none of these).
    """
    return (
        "/" in text
        or "\\" in text
        or bool(Path(text).suffix)
        or text.startswith("~")
        or Path(text).expanduser().exists()
    )


def output_problem(path: Path) -> str | None:
    """Why `path` cannot be made or written as an output folder (`is a file`, `lies under the file
    ...`, `cannot be written (...)`), or None. Writing is tried: permission bits do not stop root,
    and a read-only or virtual file system stops everyone.
    """
    path = path.expanduser().absolute()
    up = next(p for p in [path, *path.parents] if p.exists())
    if not up.is_dir():
        return "is a file" if up == path else f"lies under the file {up}"
    try:
        with tempfile.TemporaryFile(dir=up):
            return None
    except OSError:
        return f"cannot be written ({up} is not writable)"


def check_paths(cfg: DictConfig) -> None:
    """Each file or folder the config names exists and is of the right kind (see `PATHS`)."""
    for node_name, key, expected, folder in PATHS:
        node = cfg.get(node_name)
        if not isinstance(node, DictConfig) or key not in node or OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        if not isinstance(value, str) or (key in ("weights", "weights_path") and not names_a_file(value)):
            continue
        path = Path(value).expanduser()
        if not path.exists():
            raise HarnessError(f"{node_name}.{key}={value!r}: no such file or folder; expected {expected}")
        if folder is not None and path.is_dir() != folder:
            kind = "a folder" if path.is_dir() else "a file"
            raise HarnessError(f"{node_name}.{key}={value!r} is {kind}; expected {expected}")
    if cfg.get("phase") == "evaluate" and cfg.get("maps_from"):
        if not Path(str(cfg.maps_from)).expanduser().is_dir():
            raise HarnessError(
                f"maps_from={cfg.maps_from}: no such folder; expected the folder of an earlier sweep"
            )


def check_config(cfg: DictConfig) -> None:
    """Check the job's model, data, method, metric and device settings and the paths they name (see
    the module doc).
    """
    if not cfg.get("metric"):
        raise HarnessError("no metric selected (metric is empty); use e.g. metric=[deletion,insertion]")
    for where in ("model", "data", "method"):
        node = cfg.get(where)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise HarnessError(
                f"no {where} selected; use e.g. {where}=<name> (python -m harness --help lists them)"
            )
        check_node(node, where)
    for name, node in cfg.metric.items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise HarnessError(
                f"metric.{name} is not a metric config; use metric=[{name}] with a name from conf/metric"
            )
        check_node(node, f"metric.{name}")
    check_node(cfg.device, "device", target="harness.device.device_settings")
    check_paths(cfg)
