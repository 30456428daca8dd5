"""What the harness learns about a model on a device before any attribution, once per sweep.

For a model config on a device, with its speed options, memory budget, candidate chunk sizes and
thread count, on one kind of machine, a calibration holds: the memory one image needs in a plain
forward and in a forward+backward pass, the budget in bytes, and for each kind of pass the time per
image of sustained loops at every candidate size that fits the budget. The chunk sizes follow from
those (`ModelSpeed.adopt`: of the sizes within 5% of the best speed, the largest on a GPU and the
smallest on a CPU).

Measuring this takes seconds to minutes (three rounds over every size, see `ModelSpeed.calibrate`),
and a chunk size chosen from a few loops in a noisy minute can slow a whole job several times over.
So the first job of a sweep that needs a calibration measures it and writes it to
`<sweep>/.calibration/<key>.json` (atomically, under a file lock, so that jobs started side by side
by joblib or Slurm wait for one measurement instead of all measuring at once); every other job of
the sweep with the same settings reads it, whichever launcher runs it, and a resumed sweep reuses it
too. A job that needs a kind of pass that the file lacks (the first gradient job after a forward-only
one) measures that kind and adds it. The row says which happened (`calibration`: `measured` or
`reused`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from harness.config import DeviceSettings, digest
from harness.results import atomic_write
from harness.runtime.clock import machine_id
from harness.runtime.memory import DEFAULT_BATCH_SIZES, MemoryModel, fitting_sizes, image_memory
from harness.runtime.model_speed import KINDS, ModelSpeed
from harness.runtime.speed import SpeedOptions

log = logging.getLogger("harness")
CALIBRATION_DIR = ".calibration"
# Rounds over all (kind, size) pairs; the best of each is kept.
ROUNDS = 3
# Model settings that do not change its speed: random weights drawn from another seed.
NOT_SPEED = ("seed",)


@dataclass
class Calibration:
    """A model's memory and speed on a device, and where they came from.

    Attributes:
        key: hash of `settings`; the file name in the sweep's `.calibration/` folder.
        settings: everything the figures depend on (model config, device, machine, options, ...).
        budget: bytes one chunk may use (`memory_budget` times the memory free when measured).
        memory: per kind of pass (`forward`, `forward_backward`), what a batch needs.
        per_batch_ms: per kind, the best time per image of loops at each candidate size.
        source: `measured` (in this job) or `reused` (read from the sweep's file).
        path: the file, or None when the job has no sweep folder to share it through.
    """

    key: str
    settings: dict[str, Any]
    budget: float
    memory: dict[str, MemoryModel]
    per_batch_ms: dict[str, dict[int, float]]
    source: str
    path: Path | None

    def to_json(self) -> dict[str, Any]:
        """The file's content."""
        return {
            "key": self.key,
            "settings": self.settings,
            "budget_bytes": self.budget,
            "kinds": {
                kind: {
                    "memory": vars(self.memory[kind]),
                    "per_batch_ms": {str(b): ms for b, ms in self.per_batch_ms[kind].items()},
                }
                for kind in self.memory
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> Calibration:
        """Read back what `to_json` wrote."""
        kinds = data["kinds"]
        return cls(
            key=data["key"],
            settings=data["settings"],
            budget=float(data["budget_bytes"]),
            memory={k: MemoryModel(**v["memory"]) for k, v in kinds.items()},
            per_batch_ms={
                k: {int(b): float(ms) for b, ms in v["per_batch_ms"].items()} for k, v in kinds.items()
            },
            source="reused",
            path=path,
        )


def calibration_facts(model: DictConfig, device: torch.device, settings: DeviceSettings) -> dict[str, Any]:
    """What a calibration depends on: the model config (less its random-init seed), the device and
    the machine (CPU model, cores, GPU name), the speed options, the memory budget, the candidate
    and fixed chunk sizes, torch's thread count (joblib workers get fewer threads) and version.
    """
    plain = OmegaConf.to_container(model, resolve=True)
    assert isinstance(plain, dict)
    return {
        "model": {k: v for k, v in plain.items() if k not in NOT_SPEED},
        "device": device.type,
        "machine": machine_id(),
        "options": SpeedOptions.from_settings(settings).row(),
        "memory_budget": float(settings.memory_budget),
        "batch_sizes": list(settings.batch_sizes or DEFAULT_BATCH_SIZES[device.type]),
        "batch_size": settings.batch_size,
        "grad_batch_size": settings.grad_batch_size,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`.lock for the block (released by the system when the holder
    exits, however it exits). On a file system without locks, go on unlocked: jobs may then measure
    the same calibration twice, nothing worse.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as f:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _read(path: Path) -> Calibration | None:
    if not path.is_file():
        return None
    try:
        return Calibration.from_json(json.loads(path.read_text()), path)
    except (ValueError, KeyError, TypeError) as e:
        log.warning("calibration %s cannot be read (%s); measuring it again", path, e)
        return None


def calibrate(
    speed: ModelSpeed,
    module: torch.nn.Module,
    facts: dict[str, Any],
    kinds: Sequence[str],
    available: float,
    folder: Path | None = None,
) -> Calibration:
    """The calibration for `facts` (see `calibration_facts`) covering `kinds`: read from `folder` when an
    earlier job wrote it there, else measured (the missing kinds only) and written there. `speed`
    adopts its loop speeds either way, and so chooses the chunk sizes.

    Args:
        speed: the job's model speed (its model, possibly compiled, runs the loops).
        module: the eager model, whose activations the memory estimate reads.
        facts: what the calibration depends on (`calibration_facts`).
        kinds: the kinds of pass the job runs (`forward`, and `forward_backward` unless forward-only).
        available: bytes free on the device now; the budget is `memory_budget` times this.
        folder: the sweep's folder, shared by its jobs; None measures without writing.
    """
    key = digest(facts)
    if folder is None:
        return _measure(speed, module, facts, kinds, None, key, facts["memory_budget"] * available)
    path = folder / CALIBRATION_DIR / f"{key}.json"
    with _locked(path):
        known = _read(path)
        missing = [k for k in kinds if known is None or k not in known.memory]
        if not missing:
            assert known is not None
            speed.adopt({k: known.per_batch_ms[k] for k in kinds})
            return known
        budget = known.budget if known else facts["memory_budget"] * available
        found = _measure(speed, module, facts, missing, known, key, budget)
        found.path = path
        text = json.dumps(found.to_json(), indent=1) + "\n"
        atomic_write(path, lambda p: p.write_text(text))
    speed.adopt({k: found.per_batch_ms[k] for k in kinds})
    return found


def _measure(
    speed: ModelSpeed,
    module: torch.nn.Module,
    facts: dict[str, Any],
    kinds: Sequence[str],
    known: Calibration | None,
    key: str,
    budget: float,
) -> Calibration:
    """Estimate the memory of `kinds`, keep the candidate sizes that fit `budget` (or the size the
    user fixed), and time loops at each; merged into `known`.
    """
    t0 = time.perf_counter()
    fixed = {"forward": facts["batch_size"], "forward_backward": facts["grad_batch_size"]}
    memory: dict[str, MemoryModel] = {}
    sizes: dict[str, list[int]] = {}
    for kind in kinds:
        grad = kind == "forward_backward"
        memory[kind] = image_memory(module, speed.sample, speed.device, grad, speed.memory_format)
        if fixed[kind]:
            sizes[kind] = [fixed[kind]]
        else:
            sizes[kind] = fitting_sizes(facts["batch_sizes"], memory[kind], budget, kind)
    per_batch = speed.calibrate(sizes, rounds=ROUNDS)
    chosen = {"forward": speed.batch_size, "forward_backward": speed.grad_batch_size}
    sizes_text = ", ".join(f"{kind} {chosen[kind]}" for kind in kinds)
    log.info("calibration %s: measured %s in %.1f s; chunk sizes %s", key, ", ".join(kinds),
             time.perf_counter() - t0, sizes_text)  # fmt: skip
    merged_memory = (known.memory if known else {}) | memory
    merged_speed = (known.per_batch_ms if known else {}) | per_batch
    order = [k for k in KINDS if k in merged_memory]
    return Calibration(
        key,
        facts,
        budget,
        {k: merged_memory[k] for k in order},
        {k: merged_speed[k] for k in order},
        "measured",
        None,
    )
