"""Results: the flat row of a job, its files, written atomically, and loading them back.

A job folder holds `run.json` (the row), `curves.csv` (metric, image, point, fraction, score),
`scores.csv` (one row per image: id, label, target, each metric's AUC), `kernels.csv` (the top
kernels, or CPU ops, of the method and of each metric, from the profiler) and `attributions.pt` (the
maps summed over channels, with the display images). `run.json` is written last, so a folder with a
`run.json` is complete.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

ROW_FILE = "run.json"


def bootstrap_ci(
    values: torch.Tensor, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over images.

    Example:
        >>> lo, hi = bootstrap_ci(torch.tensor([0.2, 0.4, 0.6, 0.8]))
        >>> 0.2 <= lo < 0.5 < hi <= 0.8
        True
    """
    v = values.detach().double().cpu()
    if len(v) < 2:
        return float(v.mean()), float(v.mean())
    g = torch.Generator().manual_seed(seed)
    means = v[torch.randint(len(v), (resamples, len(v)), generator=g)].mean(dim=1)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(lo), float(hi)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def atomic_write(path: Path, write: Any) -> None:
    """Write a file through a temporary in the same folder and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_job(
    folder: Path,
    row: Mapping[str, Any],
    tables: Mapping[str, pd.DataFrame],
    maps: Mapping[str, Any],
) -> None:
    """Write a job's files, each atomically, `run.json` last.

    Args:
        folder: the job's folder.
        row: the results row.
        tables: file name (`curves.csv`, ...) to table.
        maps: what `attributions.pt` holds.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        atomic_write(folder / name, lambda p, t=table: t.to_csv(p, index=False))
    atomic_write(folder / "attributions.pt", lambda p: torch.save(dict(maps), p))
    text = json.dumps({k: _json_value(v) for k, v in row.items()}, indent=1, sort_keys=False)
    atomic_write(folder / ROW_FILE, lambda p: p.write_text(text + "\n"))


def metric_names(rows: pd.DataFrame) -> list[str]:
    """The metrics scored in a table of rows: every `<metric>_auc` column."""
    return [c[: -len("_auc")] for c in rows.columns if c.endswith("_auc")]


def job_folders(sweep: Path) -> list[Path]:
    """Job folders of a sweep (or the folder itself for a single run), in job order."""
    folders = [p.parent for p in sweep.glob(f"*/{ROW_FILE}")]
    if (sweep / ROW_FILE).is_file():
        folders.append(sweep)
    return sorted(folders, key=lambda p: (len(p.name), p.name))


def load_rows(*sweeps: Path) -> pd.DataFrame:
    """One row per complete job of the given sweep folders."""
    rows = []
    for sweep in sweeps:
        for folder in job_folders(Path(sweep)):
            row = json.loads((folder / ROW_FILE).read_text())
            row["job_dir"] = str(folder)
            rows.append(row)
    return pd.DataFrame(rows)
