"""The job's settings, each node checked once, into a typed object, before any model work.

`check_config(cfg)` checks every node of a job's config (the model, data, method and metric nodes
against their functions' signatures, the files they name) and returns `Settings`: the device node as
`DeviceSettings`, the `timing` node as `TimingSettings` and the top-level keys as `JobSettings`, each
with its types and ranges checked. The job, the runtime and the report read these objects, never the
nodes again; a bad value gives one line naming it and what would be right.

This module imports no torch: the sweep checks every job before it launches any.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from annotated_types import Ge
from omegaconf import DictConfig, OmegaConf

from harness.config.checks import check_declared, check_node, describe, matches, show, unknown_setting
from harness.config.errors import HarnessError
from harness.config.paths import check_paths

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PHASES = ("all", "evaluate")


def _plain(node: Any) -> dict[str, Any]:
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    assert isinstance(plain, dict)
    return {str(k): v for k, v in plain.items()}


def _check_types(cls: type, values: Mapping[str, Any], prefix: str) -> None:
    """Each value against its field's annotation in `cls` (a dataclass)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for key, value in values.items():
        if key in hints and not matches(value, hints[key]):
            raise HarnessError(f"{prefix}{key}={show(value)}; expected {describe(hints[key])}")


def _positive_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class SpeedSettings:
    """How the model runs; every value goes into the row. All but `precision` and `compile` are exact
    in fp32 up to the order of floating-point sums.

    Attributes:
        precision: `fp32` (no autocast), `bf16` or `fp16` autocast around every model call.
        channels_last: NHWC memory format for the model and its inputs.
        cudnn_benchmark: let cuDNN time its convolution algorithms per input shape (CUDA only).
        tf32: TensorFloat-32 matmuls and convolutions on Ampere and later GPUs (CUDA only).
        compile: a `torch.compile` mode, or None for eager execution.
        fold_batchnorm: fold each eval-mode BatchNorm into the convolution before it.
        fold_padding: make a convolution's own symmetric zero-padding module its padding.
    """

    precision: str = "fp32"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    tf32: bool = False
    compile: str | None = None
    fold_batchnorm: bool = False
    fold_padding: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise HarnessError(f"device.precision={self.precision!r}; expected one of {PRECISIONS}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise HarnessError(f"device.compile={self.compile!r}; expected null or one of {COMPILE_MODES}")


@dataclass(frozen=True)
class DeviceSettings(SpeedSettings):
    """Where and how a job runs (`conf/device/*.yaml`): the speed settings, and the following.

    Attributes:
        name: `auto` (cuda when torch sees a GPU, else cpu), `cpu` or `cuda`.
        memory_budget: the fraction of the free memory (GPU) or available RAM (CPU) one chunk may use.
        batch_sizes: candidate chunk sizes to time, or None for the device's defaults.
        batch_size: images per plain forward, or None to choose it (`harness.runtime.calibration`).
        grad_batch_size: images per forward+backward, or None to choose it.
    """

    name: str = "auto"
    memory_budget: float = 0.5
    batch_sizes: tuple[int, ...] | None = None
    batch_size: int | None = None
    grad_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.name not in DEVICES:
            raise HarnessError(f"device.name={self.name!r}; expected one of {DEVICES}")
        super().__post_init__()
        budget = self.memory_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise HarnessError(
                f"device.memory_budget={budget!r}; expected a fraction of free memory in (0, 1]"
            )
        for key in ("batch_size", "grad_batch_size"):
            value = getattr(self, key)
            if value is not None and not _positive_count(value):
                raise HarnessError(
                    f"device.{key}={value!r}; expected null (chosen) or a positive number of images"
                )
        sizes = self.batch_sizes
        if sizes is not None and (not sizes or not all(_positive_count(b) for b in sizes)):
            raise HarnessError(
                f"device.batch_sizes={list(sizes)!r}; expected null or a list of positive image counts"
            )

    @classmethod
    def from_config(cls, node: Any) -> DeviceSettings:
        """From a device node: its keys and types checked against this class's fields, then its
        ranges; missing keys take the defaults.
        """
        node = node if isinstance(node, DictConfig) else OmegaConf.create(dict(node or {}))
        check_node(node, "device", target=f"{cls.__module__}.{cls.__qualname__}")
        values = _plain(node)
        if values.get("batch_sizes") is not None:
            values["batch_sizes"] = tuple(values["batch_sizes"])
        return cls(**values)


@dataclass(frozen=True)
class TimingSettings:
    """How calls are timed (the `timing` node of the config; each value goes in the row).

    Attributes:
        budget_s: repeat a call while its timed calls have taken less than this (at least once).
        max_repeats: timed calls at most.
        warmup_passes: model passes of the warm-up (the whole call when it makes fewer).
        profile: whether to profile each call with `torch.profiler`.
        profile_s: profile a call's first passes until this many seconds have passed.
    """

    budget_s: Annotated[float, Ge(0)] = 2.0
    max_repeats: Annotated[int, Ge(1)] = 5
    warmup_passes: Annotated[int, Ge(0)] = 1
    profile: bool = True
    profile_s: Annotated[float, Ge(0)] = 0.1

    def __post_init__(self) -> None:
        _check_types(type(self), dataclasses.asdict(self), "timing.")

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> TimingSettings:
        """From the config's `timing` node; missing keys take the defaults."""
        values = _plain(node)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise HarnessError(
                f"timing.{unknown[0]} is not a timing setting; expected one of {', '.join(sorted(known))}"
            )
        _check_types(cls, values, "timing.")
        return cls(**values)


@dataclass(frozen=True)
class JobSettings:
    """The config's top-level keys: what a job computes and how it runs.

    Attributes:
        seed: seeds every random draw of the job (methods, metrics, random weights).
        phase: `all` (attribute and score) or `evaluate` (score the maps saved in `maps_from`).
        maps_from: the folder of a sweep run with `save_maps=true`, for `phase=evaluate`.
        save_maps: keep the maps as the method returned them (else a float16 channel sum for display).
        resume: skip a job whose folder holds complete results of the same config.
        progress: a progress bar per job; None shows it only when stderr is a terminal.
        skip_inapplicable: in a sweep, a job whose method cannot explain its model (an attention
            method on a CNN) records that and the sweep goes on, instead of failing.
    """

    seed: int = 0
    phase: Literal["all", "evaluate"] = "all"
    maps_from: str | None = None
    save_maps: bool = True
    resume: bool = False
    progress: bool | None = None
    skip_inapplicable: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise HarnessError(f"phase={self.phase!r}; expected one of {', '.join(PHASES)}")

    @classmethod
    def from_config(cls, cfg: Any) -> JobSettings:
        """From the config's top-level keys (the nodes left aside); missing keys take the defaults."""
        names = [f.name for f in dataclasses.fields(cls)]
        values = {k: cfg.get(k) for k in names if k in cfg}
        _check_types(cls, values, "")
        return cls(**values)


@dataclass(frozen=True)
class Settings:
    """A job's typed settings: the top-level keys, the device and the timing."""

    job: JobSettings
    device: DeviceSettings
    timing: TimingSettings

    @classmethod
    def from_config(cls, cfg: Any) -> Settings:
        """Each node read and checked once (see the module's docstring)."""
        return cls(
            JobSettings.from_config(cfg),
            DeviceSettings.from_config(cfg.get("device") or {}),
            TimingSettings.from_config(cfg.get("timing")),
        )


# The config's nodes; with `JobSettings`' fields, every top-level key a job's config may hold (the
# sweeper's copy holds Hydra's own node too).
NODES = ("model", "data", "method", "metric", "device", "timing")


def _check_top_level(cfg: DictConfig) -> None:
    """No top-level key but the nodes and the job's settings: `+modle=small_cnn` and `+seeed=3` add a
    key that nothing reads, and are refused with the closest valid key.
    """
    known = [*NODES, *(f.name for f in dataclasses.fields(JobSettings))]
    for key in map(str, cfg):
        if key not in known and key != "hydra":
            error = unknown_setting(key, known, owner="the harness")
            close = difflib.get_close_matches(key, list(NODES), n=1)
            group = f" ({close[0]}=<name> chooses a {close[0]} config)" if close else ""
            raise HarnessError(f"{error}{group}")


def _check_nodes(cfg: DictConfig) -> None:
    _check_top_level(cfg)
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


def _check_functions(cfg: DictConfig, phase: str) -> None:
    """The method's and metrics' own checks of their settings (`check_declared`), and no metric that
    re-runs the method with `phase=evaluate`, which runs none.
    """
    check_declared(cfg.method, "method")
    for name, node in cfg.metric.items():
        needs = getattr(check_declared(node, f"metric.{name}"), "needs", ())
        if {"explain", "explain_with"} & set(needs) and phase == "evaluate":
            raise HarnessError(
                f"metric {name} re-runs the method, which phase=evaluate does not run; use phase=all"
            )


def check_config(cfg: DictConfig) -> Settings:
    """Check everything about a job that needs no model: its model, data, method and metric nodes
    against their functions, the device, timing and top-level settings, the method's and metrics' own
    checks of their settings, and the files the config names; returns the typed settings.
    """
    _check_nodes(cfg)
    settings = Settings.from_config(cfg)
    _check_functions(cfg, settings.job.phase)
    check_paths(cfg, settings.job.maps_from if settings.job.phase == "evaluate" else None)
    return settings
