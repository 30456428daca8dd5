"""Which job folders hold complete results, and setting the others aside before a job runs again.

A job's results are complete when its `run.json` parses, carries the hash of the job's resolved
config (`harness.config.config_hash`), and every file it lists in `files` exists with the size listed
there. Each file is written through a temporary and renamed into place, `run.json` last
(`harness.results.files`), so a job killed at any moment leaves either complete results or a folder
that this module calls partial and sets aside.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.results.files import RESULT_FILES, ROW_FILE

log = logging.getLogger("harness")


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
