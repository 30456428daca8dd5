"""Every setting of every config node, set to a value of the wrong type and to one outside its declared
range, is refused by the config's check with one line naming it, before any model is built.

The cases are generated from the functions' signatures and the settings' dataclasses: a setting added
to a method, a metric, a model builder, a data loader or the device, timing or top-level settings is
covered as soon as it exists. A setting without an annotation that a wrong value can contradict fails
here, so that none is left unchecked.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from harness.config import DeviceSettings, HarnessError, JobSettings, TimingSettings, check_config, matches
from harness.config.checks import CHOSEN_BY_JOB, PASSED, bounds, signature
from tests.conftest import CONF

# What each node needs besides its own option for the config to pass the check unchanged.
BASE = ["model=small_cnn", "device=cpu", "method=saliency", "metric=[deletion]"]
NEEDS = {
    "model/custom": ["model.builder=harness.models.SmallCNN"],
    "data/image_folder": [f"data.root={Path(__file__).parent}"],  # a folder (its images are not read)
}
# Wrong values as the command line writes them, and what Hydra makes of each (the value the config
# then holds); the first that contradicts a setting's annotation is its wrong value.
WRONG = [("abc", "abc"), ("123", 123), ("1.5", 1.5), ("[1,2]", [1, 2]), ("{a:1}", {"a": 1}), ("true", True)]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", list(overrides))


def _compose(overrides: list[str], key: str | None = None, value: Any = None) -> DictConfig:
    """The config of `overrides` (composed once), with `key` set to `value` as an override sets it."""
    cfg = copy.deepcopy(_composed(tuple(overrides)))
    if key is not None:
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def _wrong(tp: Any) -> Any:
    """A value of the wrong type for annotation `tp` (as an override gives it); None when none is."""
    return next((value for _, value in WRONG if not matches(value, tp)), None)


def _outside(tp: Any) -> Any:
    """A value of the right type just outside the range `tp` declares, or None."""
    found = dict(bounds(_bare(tp)))
    # An open bound is itself outside; a closed one is passed by a step of the bound's own type.
    for op, step in ((">=", -1), (">", 0), ("<=", 1), ("<", 0)):
        if op in found:
            bound = found[op]
            return bound + (step if isinstance(bound, int) else step / 2)
    return None


def _bare(tp: Any) -> Any:
    """The `Annotated` part of `T | None`."""
    if get_origin(tp) is Annotated:
        return tp
    inner = [a for a in get_args(tp) if get_origin(a) is Annotated]
    return inner[0] if inner else tp


def _node_cases() -> list[tuple[str, str, list[str], Any]]:
    """(node, key, the option's overrides, annotation) for every setting of every option of every
    group that names a function: the keys its YAML sets, which the function's signature types.
    """
    cases = []
    for group in ("model", "data", "method", "metric"):
        for option in _options(group):
            chosen = f"{group}=[{option}]" if group == "metric" else f"{group}={option}"
            overrides = [*[o for o in BASE if not o.startswith(f"{group}=")], chosen]
            overrides += NEEDS.get(f"{group}/{option}", [])
            where = f"metric.{option}" if group == "metric" else group
            cfg = _compose(overrides)
            node = cfg.metric[option] if group == "metric" else cfg[group]
            _, hints = signature(str(node._target_))
            for key in map(str, node):
                if key.startswith("_") or key in PASSED.get(group, ()):
                    continue
                cases.append((where, key, overrides, hints.get(key)))
    return cases


def _settings_cases() -> list[tuple[str, str, list[str], Any]]:
    """The same for the device, timing and top-level settings, from their dataclasses."""
    cases = []
    for prefix, cls in (("device.", DeviceSettings), ("timing.", TimingSettings), ("", JobSettings)):
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            cases.append((prefix.rstrip("."), f.name, list(BASE), hints[f.name]))
    return cases


CASES = _node_cases() + _settings_cases()


def _check(overrides: list[str], key: str, value: Any) -> str:
    cfg = _compose(overrides, key, value)
    with pytest.raises(HarnessError) as e:
        check_config(cfg)
    return str(e.value)


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def test_every_option_passes_the_check_unchanged():
    for overrides in {tuple(o) for _, _, o, _ in CASES}:
        check_config(_compose(list(overrides)))


def test_the_cases_cover_every_node():
    nodes = {where.split(".")[0] for where, *_ in CASES}
    assert nodes == {"model", "data", "method", "metric", "device", "timing", ""}
    assert len(CASES) >= 150, len(CASES)


@pytest.mark.parametrize(
    "where, key, overrides, tp", CASES, ids=[f"{_key(w, k)}@{o[-1]}" for w, k, o, _ in CASES]
)
def test_a_value_of_the_wrong_type_is_refused_in_one_line(where, key, overrides, tp):
    assert tp is not None, f"{_key(where, key)} has no annotation: annotate it so that it is checked"
    wrong = _wrong(tp)
    assert wrong is not None, f"{_key(where, key)}: {tp} takes any value; give it a narrower type"
    message = _check(overrides, _key(where, key), wrong)
    assert message.startswith(f"{_key(where, key)}=") or message.startswith(f"{where}: {key}="), message
    assert "\n" not in message and "expected" in message, message


RANGED = [c for c in CASES if c[3] is not None and _outside(c[3]) is not None]


@pytest.mark.parametrize(
    "where, key, overrides, tp", RANGED, ids=[f"{_key(w, k)}@{o[-1]}" for w, k, o, _ in RANGED]
)
def test_a_value_outside_its_declared_range_is_refused(where, key, overrides, tp):
    message = _check(overrides, _key(where, key), _outside(tp))
    assert _key(where, key) in message and "expected" in message, message


def test_a_setting_left_to_the_job_may_be_null():
    cfg = _compose([*BASE, "method=integrated_gradients"])
    assert {"chunk_size"} <= set(CHOSEN_BY_JOB) and cfg.method.chunk_size is None
    check_config(cfg)
