"""Files and folders that a config names, checked before anything is built; output folders; and the
files of names that settings point at (class names, folder-to-class mappings).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.config.errors import HarnessError, MissingFile

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


def check_paths(cfg: DictConfig, maps_from: str | None = None) -> None:
    """Each file or folder the config's nodes name exists and is of the right kind (see `PATHS`), and
    `maps_from` (the sweep whose maps `phase=evaluate` scores) is a folder when given.
    """
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
    if maps_from and not Path(maps_from).expanduser().is_dir():
        raise HarnessError(f"maps_from={maps_from}: no such folder; expected the folder of an earlier sweep")


def read_listing(path: str | Path, what: str, expected: str) -> Any:
    """A file of names that a setting points at: a `.json` file's value, or any other file's non-blank
    lines (stripped). One clear error for a missing file and for JSON that does not parse.

    Args:
        path: the file.
        what: the setting, e.g. `model.class_names`.
        expected: what the file should hold, for the message of a missing file.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFile(f"{what}={str(path)!r}: no such file; expected {expected}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        return json.loads(text)
    except ValueError as e:
        raise HarnessError(f"{what}={str(path)!r} is not JSON ({e})") from None
