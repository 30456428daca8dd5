"""Hydra's own errors, from composing the config out of the command line, as one line each.

Hydra prints its composition errors over 6 to 15 lines (the override, the key, OmegaConf's
`full_key` and `object_type`, then a hint about `HYDRA_FULL_ERROR`) and suggests `+key=value` for a
mistyped key, which adds the typo instead. `hydra_errors_in_one_line` runs a Hydra app with Hydra's
errors raised rather than printed, and says each in one line that names the bad key, the closest
valid one and, for a setting of a metric that is not selected, how to select it; exit status 2.
With `HYDRA_FULL_ERROR=1` set by the user, Hydra's own report is left as it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from harness.config.checks import unknown_setting

FULL_ERROR = "HYDRA_FULL_ERROR"


def _keys(node: Any) -> list[str]:
    return [str(k) for k in node if not str(k).startswith("_")] if isinstance(node, DictConfig) else []


def composition_message(error: BaseException, argv: Sequence[str] = ()) -> str:
    """One line for an error Hydra raised while composing the config (`argv`: the command line's
    overrides, for the hint that a sweep over a group's options needs `++` for a setting that the
    group's default option lacks).

    Example:
        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"model": {"width": 16}})
        >>> OmegaConf.set_struct(cfg, True)
        >>> try:
        ...     cfg.model.widht = 8
        ... except Exception as e:
        ...     print(composition_message(e))
        model.widht is not a setting; did you mean model.width? its settings: width
    """
    if isinstance(error, OverrideParseException):
        override = getattr(error, "override", None) or str(error).splitlines()[0].partition(": ")[2]
        return (
            f"cannot read the override {override.strip()!r}; quote a value that starts with ~ or holds "
            "spaces, commas or brackets (key='~/folder'); see Hydra's override grammar"
        )
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    full_key = str(getattr(cause, "full_key", "") or "")
    parent = getattr(cause, "parent_node", None)
    if not full_key or not isinstance(parent, DictConfig):
        return " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    where, _, key = full_key.rpartition(".")
    if where == "metric":
        selected = _keys(parent)
        return (
            f"metric.{key} is set but metric {key} is not selected (metric=[{','.join(selected)}]); "
            f"select it with metric=[{','.join([*selected, key])}], or leave out its settings"
        )
    message = str(unknown_setting(key, _keys(parent), f"{where}." if where else ""))
    swept = [a for a in argv if a.startswith(f"{where}=") and "," in a] if where else []
    if swept:
        given = next(
            (a.partition("=")[2] for a in argv if a.partition("=")[0].lstrip("+") == full_key), "<value>"
        )
        message += (
            f"; a sweep over {swept[0]} composes its main config with the default {where}, so a setting "
            f"that it lacks needs ++{full_key}={given}"
        )
    return message


@contextmanager
def _hydra_raises() -> Iterator[bool]:
    """Make Hydra raise its errors instead of printing them; yields whether the user asked for
    Hydra's full report (then the errors are left to Hydra).
    """
    given = os.environ.get(FULL_ERROR)
    os.environ[FULL_ERROR] = "1"
    try:
        yield given not in (None, "", "0")
    finally:
        if given is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = given


def _from_ctrl_c(error: BaseException) -> bool:
    """Whether `error` was raised while a `KeyboardInterrupt` was being handled (or from one)."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        todo += [c for c in (e.__cause__, e.__context__) if c is not None and id(c) not in seen]
    return False


def hydra_errors_in_one_line(app: Callable[[], Any]) -> Any:
    """Run a `@hydra.main` app; an error of Hydra's (composition, overrides) exits 2 with one line."""
    with _hydra_raises() as full:
        try:
            return app()
        except (HydraException, OmegaConfBaseException) as e:
            if full:
                raise
            if _from_ctrl_c(e):  # OmegaConf turns a Ctrl-C landing in its code into an error of its own
                raise KeyboardInterrupt from None
            print(f"error: {composition_message(e, sys.argv[1:])}", file=sys.stderr)
            raise SystemExit(2) from None
