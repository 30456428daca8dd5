"""Which job folders hold complete results, and setting the others aside before a job runs again.

A job's results are complete when its `run.json` parses, carries the hash of the job's resolved
config, and every file it lists in `files` exists with the size listed there. Each file is written
through a temporary and renamed into place, `run.json` last, so a job killed at any moment leaves
either complete results or a folder that this module calls partial and sets aside.

This module imports no torch: `python -m harness resume=true` decides to skip a finished job in
milliseconds, without loading a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("harness")
ROW_FILE = "run.json"
MAPS_FILE = "attributions.npz"
# What a job writes; anything else in its folder (Hydra's `.hydra/`, the log) is not its results.
RESULT_FILES = ("curves.csv", "scores.csv", "kernels.csv", MAPS_FILE, ROW_FILE)
# Keys that say how to run a job, not what it computes: they are left out of its hash.
NOT_HASHED = ("resume", "progress")


def digest(value: Any) -> str:
    """A short stable hash of a JSON-like value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Model settings that name a file of weights: its content, not its name, identifies the model.
WEIGHT_KEYS = ("weights", "weights_path")
_SHA256: dict[tuple[str, int, int], str] = {}


def cache_root() -> Path:
    """Where the harness caches what it computed once (trained models, checkpoints' hashes):
    `$HARNESS_CACHE`, else `~/.cache/attribution-harness`.
    """
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "attribution-harness")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, cached by (absolute path, size, modification time) in the
    process and in `$HARNESS_CACHE/sha256.json`, so a large checkpoint is read once, and again only
    when it changes.
    """
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _SHA256:
        return _SHA256[key]
    cache_key = f"{key[0]}|{key[1]}|{key[2]}"
    cache = cache_root() / "sha256.json"
    try:
        saved = json.loads(cache.read_text()) if cache.is_file() else {}
    except (ValueError, OSError):
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    if cache_key not in saved:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        saved[cache_key] = h.hexdigest()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(saved))
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only cache: the hash is computed again next time
    _SHA256[key] = saved[cache_key]
    return _SHA256[key]


def weights_sha256(model: Any) -> str | None:
    """The SHA-256 of the weights file that a model config names (`weights` or `weights_path`),
    or None when it names none (random weights, an enum name, a package's own file).
    """
    for key in WEIGHT_KEYS:
        value = model.get(key) if isinstance(model, dict) else None
        if isinstance(value, str) and Path(value).expanduser().is_file():
            return file_sha256(value)
    return None


def config_hash(cfg: DictConfig) -> str:
    """Hash of the job's resolved config, less the keys in `NOT_HASHED`, and of the content of the
    model's weights file (`weights_sha256`): a checkpoint overwritten at the same path is another
    config.

    Example:
        >>> a = OmegaConf.create({"seed": 0, "resume": False, "method": {"steps": "${seed}"}})
        >>> b = OmegaConf.create({"seed": 0, "resume": True, "method": {"steps": 0}})
        >>> config_hash(a) == config_hash(b)
        True
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    what = {k: v for k, v in plain.items() if k not in NOT_HASHED}
    sha = weights_sha256(plain.get("model"))
    return digest(what if sha is None else what | {"weights_sha256": sha})


@dataclass
class JobState:
    """What a job folder holds.

    Attributes:
        row: the results row when the results are complete, else None.
        problem: why the folder's results cannot be used (partial, corrupt, another config), or
            None when they are complete or when there are none.
        kept: whether the job asks to resume and the results are complete and its own, so the job
            is not run again (set by `job_state`).
    """

    row: dict[str, Any] | None
    problem: str | None
    kept: bool = False

    @property
    def complete(self) -> bool:
        """Whether the folder holds complete results."""
        return self.row is not None


def read_job(folder: Path, config: str | None = None) -> JobState:
    """Check a job folder's results; with `config` (a `config_hash`), also that they are that job's."""
    present = [name for name in RESULT_FILES if (folder / name).is_file()]
    if ROW_FILE not in present:
        problem = f"has {', '.join(present)} but no {ROW_FILE} (killed while writing?)" if present else None
        return JobState(None, problem)
    try:
        row = json.loads((folder / ROW_FILE).read_text())
    except (ValueError, OSError) as e:
        return JobState(None, f"{ROW_FILE} cannot be read ({e}): truncated or corrupt")
    if not isinstance(row, dict) or not isinstance(row.get("files"), dict):
        return JobState(None, f"{ROW_FILE} lists no result files (corrupt, or written by an older version)")
    for name, size in row["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            return JobState(None, f"{name} is {found}, {ROW_FILE} says {size} bytes")
    if config is not None and row.get("config_hash") != config:
        return JobState(None, f"results of another config (hash {row.get('config_hash')}, this job {config})")
    return JobState(row, None)


# What the log says of a job that a resume skips.
SKIPPED = "complete results of the same config, skipped (resume=true)"


def job_state(cfg: DictConfig, folder: Path) -> JobState:
    """What `folder` holds for the job composed as `cfg` (its config hash checked), and whether
    `resume=true` keeps it. The one place that decides a skip, whether the sweeper asks before
    launching (`hydra_plugins.harness_sweeper`) or the job itself (`harness.app.prepare`).
    """
    state = read_job(folder, config_hash(cfg))
    if not (state.complete and cfg.get("resume")):
        return state
    return replace(state, kept=True)


def remove_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries (`.<name>.*.tmp`) of writes that were killed, in `folder`; call it only
    when no write into `folder` can be under way. Returns what it removed.
    """
    stale = [p for p in folder.glob(".*.tmp") if p.is_file()]
    for path in stale:
        log.info("removed %s/%s, left by an interrupted write", folder.name, path.name)
        path.unlink(missing_ok=True)
    return stale


def set_aside(folder: Path, reason: str) -> Path | None:
    """Move the result files in `folder` (and temporaries of interrupted writes) into a new
    `stale-<time>/` subfolder with `reason.txt`, so that nothing is lost or merged. Returns it, or
    None when there was nothing to move.
    """
    files = [folder / n for n in RESULT_FILES if (folder / n).is_file()]
    files += [p for p in folder.glob(".*.tmp") if p.is_file()]
    if not files:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = folder / f"stale-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = folder / f"stale-{stamp}-{n}"
    aside.mkdir()
    for path in files:
        os.replace(path, aside / path.name)
    (aside / "reason.txt").write_text(reason + "\n")
    return aside


def complete_jobs(sweep: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The complete job folders of a sweep (or the folder itself, for a single run), by name, with
    their rows. Folders with partial or corrupt results are reported in the log and left out.
    """
    folders = {p.parent for name in RESULT_FILES for p in sweep.glob(f"*/{name}")}
    if (sweep / ROW_FILE).is_file():
        folders.add(sweep)
    jobs = []
    for folder in sorted(folders, key=lambda p: p.name):
        state = read_job(folder)
        if state.row is None:
            if state.problem:
                log.warning("left out %s: %s", folder, state.problem)
            continue
        jobs.append((folder, state.row))
    return jobs
