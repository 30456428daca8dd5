"""Check a config node against the function it builds (or the typed settings it becomes).

Every config node with a `_target_` (the model, the data, the method, each metric) names a function
whose signature says which settings exist and what type each takes; the device and timing nodes
are read against their dataclasses (`harness.config.settings`). `check_node` refuses a setting the
function does not take (suggesting the closest one), a value of the wrong type (`method.window=abc`)
and a required value left out (`data.root: ???`), each with one line naming the bad value and what
would be right. A setting's range is part of its annotation (`Annotated[int, Ge(1)]`, with the
`annotated_types` markers `Ge`, `Gt`, `Le`, `Lt`, `Interval`), so that `method.n_steps=0` is refused
here too; what ties several settings together stays with the functions' own checks (`check_declared`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import inspect
import math
import types
import typing
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from harness.config.errors import HarnessError

# Arguments that the harness passes itself when it builds a node (never settings of the config).
PASSED = {"data": ("size", "mean", "std", "class_names")}
# Settings of a method or metric that a null (or `auto`) value leaves to the job, which chooses them
# from the model and the calibration (`harness.job.builder.filled`).
CHOSEN_BY_JOB = ("chunk_size", "layer", "layout", "blocks", "pixel_range", "prefix_tokens", "grid")


def bounds(tp: Any) -> Iterator[tuple[str, Any]]:
    """The bounds an `Annotated` type declares, as `(operator, value)` pairs: `(">=", 1)`."""
    for mark in get_args(tp)[1:] if get_origin(tp) is Annotated else ():
        for one in mark if isinstance(mark, at.GroupedMetadata) else [mark]:
            for name, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                if isinstance(one, at.BaseMetadata) and getattr(one, name, None) is not None:
                    yield op, getattr(one, name)


def _within(value: Any, op: str, bound: Any) -> bool:
    checks = {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}
    return bool(checks[op])


def describe(tp: Any) -> str:
    """A type as words: `int | None` -> `an integer or null`; `Annotated[int, Ge(1)]` -> `an integer
    >= 1`.

    Example:
        >>> describe(Annotated[float, at.Interval(gt=0, le=1)] | None)
        'a number in (0, 1] or null'
    """
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return f"{describe(args[0])} {_limits(dict(bounds(tp)))}".strip()
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple and args and Ellipsis not in args:
        return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
    if origin in (list, tuple, collections.abc.Sequence):
        inner = [a for a in args if a is not Ellipsis]
        return f"a list of ({describe(inner[0])})" if inner and inner[0] is not Any else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    names = {
        int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null",
        list: "a list", tuple: "a list", dict: "a mapping",
    }  # fmt: skip
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _limits(limits: dict[str, Any]) -> str:
    low = [op for op in (">", ">=") if op in limits]
    high = [op for op in ("<", "<=") if op in limits]
    if low and high:
        left, right = "(" if low[0] == ">" else "[", ")" if high[0] == "<" else "]"
        return f"in {left}{limits[low[0]]}, {limits[high[0]]}{right}"
    return " and ".join(f"{op} {b}" for op, b in limits.items())


def matches(value: Any, tp: Any) -> bool:
    """Whether a plain config value (from `OmegaConf.to_container`) has the annotated type, within
    its declared bounds; a number must be finite. Types a config cannot hold (modules, callables)
    match anything.

    Example:
        >>> matches(1, float), matches(0, Annotated[int, at.Ge(1)]), matches(float("nan"), float)
        (True, False, False)
    """
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or tp is object:
        return True
    if origin is Annotated:
        return matches(value, args[0]) and all(_within(value, op, b) for op, b in bounds(tp))
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
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if tp in (list, tuple, dict):
        return isinstance(value, (list, tuple) if tp is not dict else dict)
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
def signature(target: str) -> tuple[Any, dict[str, Any]]:
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
    """The function's parameter annotations (a dataclass's fields', its bases' included), each
    evaluated on its own (one that names a type imported only for type checkers is left out, not an
    error).
    """
    if dataclasses.is_dataclass(fn):
        return typing.get_type_hints(fn, include_extras=True)
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
    """Check one node's settings against the signature of its `_target_`, or of `target` (a dotted
    path to a function or dataclass) for a node that has none (the device).
    """
    target = target or str(node.get("_target_"))
    params, hints = signature(target)
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
            raise unknown_setting(key, settings, f"{where}.", target.rsplit(".", 1)[-1])
        if OmegaConf.is_missing(node, key):
            raise HarnessError(f"{where}.{key} is required; give {where}.{key}=<value>")
        if key not in hints or OmegaConf.is_interpolation(node, key):
            continue  # an interpolation (`${model.cam_layer}`) is checked where it points
        if key in CHOSEN_BY_JOB and node[key] in (None, "auto"):
            continue
        item = node[key]
        value = (
            OmegaConf.to_container(item, resolve=True) if isinstance(item, (DictConfig, ListConfig)) else item
        )
        if not matches(value, hints[key]):
            raise HarnessError(f"{where}.{key}={show(value)}; expected {describe(hints[key])}")


def unknown_setting(key: str, known: list[str], prefix: str = "", owner: str = "") -> HarnessError:
    """The one error for a setting that nothing takes, with the closest valid one.

    Example:
        >>> print(unknown_setting("widht", ["width", "seed"], "model.", "small_cnn"))
        model.widht is not a setting of small_cnn; did you mean model.width? its settings: width, seed
    """
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    of = f" of {owner}" if owner else ""
    return HarnessError(f"{prefix}{key} is not a setting{of}; {hint}its settings: {', '.join(known)}")


def check_declared(node: DictConfig, where: str) -> Any:
    """Run the check that a method's or metric's function declares on itself (`fn.traits.check`, a
    callable raising `ValueError`) on the node's settings, less those left to the job (null or `auto`,
    `CHOSEN_BY_JOB`); returns the function's traits, or None when it declares none.
    """
    traits = getattr(get_object(str(node._target_)), "traits", None)
    check = getattr(traits, "check", None)
    if callable(check):
        plain = OmegaConf.to_container(node, resolve=True)
        assert isinstance(plain, dict)
        given = {
            str(k): v
            for k, v in plain.items()
            if not str(k).startswith("_") and not (k in CHOSEN_BY_JOB and v in (None, "auto"))
        }
        try:
            check(**given)
        except ValueError as e:
            raise HarnessError(f"{where}: {e}") from None
    return traits


def _wants_float(tp: Any) -> bool:
    """Whether an annotation takes a float and no int (`float`, `float | None`, `Annotated[float, ...]`)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _wants_float(args[0])
    if origin in (Union, types.UnionType):
        return any(_wants_float(a) for a in args) and int not in args
    return tp is float


def as_declared(node: DictConfig) -> DictConfig:
    """A copy of a node whose integers are floats where its function takes a float (`stdevs=1` ->
    `1.0`), as YAML and the command line cannot tell `1` from `1.0`; libraries that assert a float
    (Captum's `stdevs`) get one.
    """
    _, hints = signature(str(node.get("_target_")))
    copy = node.copy()
    for key, tp in hints.items():
        if key in copy and not OmegaConf.is_interpolation(copy, key) and _wants_float(tp):
            value = copy[key]
            if isinstance(value, int) and not isinstance(value, bool):
                copy[key] = float(value)
    return copy


def show(value: Any) -> str:
    """A config value as a message shows it: strings quoted."""
    return repr(value) if isinstance(value, str) else str(value)
