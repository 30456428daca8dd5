"""What identifies a job's results and its maps: hashes of its config and of its weights file.

`config_hash` names a job's complete results (resume keeps them when it matches), `explain_key` the
maps a method made (`phase=evaluate` finds them through it). Both hash the resolved config, so a
checkpoint is identified by its content (`file_sha256`), not by its path.

This module imports no torch: the resume decision runs before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys that say how to run a job, not what it computes: they are left out of its hash.
NOT_HASHED = ("resume", "progress")
# Model settings that name a file of weights: its content, not its name, identifies the model.
WEIGHT_KEYS = ("weights", "weights_path")
_SHA256: dict[tuple[str, int, int], str] = {}


def digest(value: Any) -> str:
    """A short stable hash of a JSON-like value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root() -> Path:
    """Where the harness caches what it computed once (trained models, checkpoints' hashes):
    `$HARNESS_CACHE`, else `~/.cache/attribution-harness`.
    """
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "attribution-harness")


def _read_cache(cache: Path) -> dict[str, str]:
    try:
        saved = json.loads(cache.read_text()) if cache.is_file() else {}
    except (ValueError, OSError):
        saved = {}
    return saved if isinstance(saved, dict) else {}


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
    saved = _read_cache(cache)
    if cache_key not in saved:
        saved[cache_key] = _sha256_of(p)
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


def explain_key(cfg: DictConfig, device_type: str, weights: bool = True) -> str:
    """Hash of what determines a job's maps: the model, data and method settings (less the chunk
    size and the model's `blocks`, which change no map), the content of the model's weights file
    (unless `weights` is false), the seed, the device type (`cpu`, `cuda`) and the precision.
    `phase=evaluate` finds the maps saved by an earlier sweep through it.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    method = {k: v for k, v in plain["method"].items() if k != "chunk_size"}
    model = {k: v for k, v in plain["model"].items() if k != "blocks"}  # the sanity checks' stages
    what = {"model": model, "data": plain["data"], "method": method, "seed": plain["seed"]}
    sha = weights_sha256(plain["model"]) if weights else None
    what |= {} if sha is None else {"weights_sha256": sha}
    return digest(what | {"device": device_type, "precision": plain["device"]["precision"]})
