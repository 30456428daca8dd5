"""A job folder's files, each written atomically, and its maps read back.

A job folder holds `run.json` (the row), `curves.csv` (metric, image, point, fraction, score),
`scores.csv` (one row per image: id, label, target, each metric's value), `kernels.csv` (the top
kernels, or CPU ops, of the method and of each metric, from the profiler) and `attributions.npz`
(the maps with the image ids, targets, display images and method settings; see `save_maps`), or
`error.txt` when the job failed. Each file is written through a temporary and renamed; `run.json`
comes last and lists the others with their sizes, so a folder is complete exactly when
`harness.results.read_job` says so.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

ROW_FILE = "run.json"
MAPS_FILE = "attributions.npz"
# What a job writes; anything else in its folder (Hydra's `.hydra/`, the log) is not its results.
RESULT_FILES = ("curves.csv", "scores.csv", "kernels.csv", MAPS_FILE, ROW_FILE)
# A job of a sweep that failed with a message leaves it here (and no results).
ERROR_FILE = "error.txt"
# A job whose method cannot explain its model, in a sweep run with `skip_inapplicable=true`, says so here.
NOT_APPLICABLE_FILE = "not_applicable.txt"


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Any) -> None:
    """Write a file through a temporary in the same folder and rename it into place, so that
    readers (and a job killed mid-write) see the old file or the whole new one, never a part.
    The temporary is flushed to disk first: a lost node or a shared file system's client cache
    must not leave the rename without the data.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the results from the user's group
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_files(
    folder: Path, tables: Mapping[str, pd.DataFrame], maps: Mapping[str, np.ndarray]
) -> dict[str, int]:
    """Write a job's tables and maps, each atomically; returns each file's size for `write_row`.

    Args:
        folder: the job's folder.
        tables: file name (`curves.csv`, ...) to table.
        maps: the arrays of `attributions.npz` (compressed).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        atomic_write(folder / name, lambda p, t=table: t.to_csv(p, index=False))
    atomic_write(folder / MAPS_FILE, lambda p: _save_npz(p, maps))
    return {name: (folder / name).stat().st_size for name in [*tables, MAPS_FILE]}


def write_row(folder: Path, row: Mapping[str, Any], files: Mapping[str, int]) -> None:
    """Write `run.json`, last: the row and the sizes of the files written before it."""
    text = json.dumps({**{k: _json_value(v) for k, v in row.items()}, "files": dict(files)}, indent=1)
    atomic_write(folder / ROW_FILE, lambda p: p.write_text(text + "\n"))


def write_job(
    folder: Path,
    row: Mapping[str, Any],
    tables: Mapping[str, pd.DataFrame],
    maps: Mapping[str, np.ndarray],
) -> None:
    """Write a job's files (`write_files`), then `run.json` with the row and the files' sizes."""
    write_row(folder, row, write_files(folder, tables, maps))


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with path.open("wb") as f:  # a file object: np.savez would add `.npz` to a temporary's name
        np.savez_compressed(f, **dict(arrays))  # type: ignore[arg-type]


def read_maps(folder: Path) -> dict[str, np.ndarray]:
    """The arrays of a job's `attributions.npz` (see `harness.job.files.maps_arrays`)."""
    with np.load(folder / MAPS_FILE, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
