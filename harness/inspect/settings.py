"""The settings of `python -m harness.inspect`, checked against `conf/inspect.yaml` before any model
work: every key must be one the file has (a `+actmax.step=5` is refused with the closest key, not
ignored), and every value of the type of the file's default (`actmax.channels=3` where a list goes is
refused); ranges and names are checked by the app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.config import HarnessError, describe, matches, unknown_setting

# The file's own keys; the model, data and device nodes are checked against their functions.
NODES = ("model", "data", "device")
TYPES = {bool: bool, int: int, float: float, str: str, list: list}


def _expected(default: Any) -> Any:
    """The type a value must have, from the file's default (None: any)."""
    return TYPES.get(type(default)) if default is not None else None


def check_known(cfg: DictConfig, conf: Path) -> None:
    """Each key of `cfg` outside the model, data and device nodes is one of `conf`'s (the file), and
    each value has the type of the file's default; one `HarnessError` line naming the first bad one.
    """
    schema = OmegaConf.to_container(OmegaConf.load(conf), resolve=False)
    assert isinstance(schema, dict)
    schema = {k: v for k, v in schema.items() if k not in ("defaults", "hydra")}
    given = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(given, dict)
    _check_keys({k: v for k, v in given.items() if k not in NODES}, schema, "")


def _check_keys(given: dict[Any, Any], schema: dict[Any, Any], prefix: str) -> None:
    known = [str(k) for k in schema]
    for key, value in given.items():
        where = f"{prefix}{key}"
        if key not in schema:
            raise unknown_setting(str(key), known, prefix, "harness.inspect")
        default = schema[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise HarnessError(f"{where}={value!r}; expected a mapping of {', '.join(map(str, default))}")
            _check_keys(value, default, f"{where}.")
            continue
        tp = _expected(default)
        if tp is not None and not matches(value, tp):
            shown = repr(value) if isinstance(value, str) else str(value)
            raise HarnessError(f"{where}={shown}; expected {describe(tp)}")
