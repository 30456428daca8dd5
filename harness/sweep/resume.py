"""The resume decision: whether a job's folder already holds its complete results, and what to do
with the results of a job that must run (again).

`job_state` is the one place that decides a skip, whether the sweeper asks before launching
(`hydra_plugins.harness_sweeper`) or the job itself (`harness.sweep.app.main`). With `resume=true` a
job whose complete results carry the same config hash is skipped before any model is loaded. Results
of any other kind already in the folder (partial, corrupt, of another config, or complete but not
resumed) are reported and moved to a `stale-<time>/` subfolder, never merged and never lost.

This module imports no torch: `python -m harness resume=true` decides to skip a finished job in
milliseconds, without loading a model.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from harness.config import config_hash
from harness.results import JobState, read_job, set_aside

log = logging.getLogger("harness")
# What the log says of a job that a resume skips.
SKIPPED = "complete results of the same config, skipped (resume=true)"


def job_state(cfg: DictConfig, folder: Path) -> JobState:
    """What `folder` holds for the job composed as `cfg` (its config hash checked), and whether
    `resume=true` keeps it.
    """
    state = read_job(folder, config_hash(cfg))
    if not (state.complete and cfg.get("resume") is True):  # resume=maybe is refused by the check
        return state
    return replace(state, kept=True)


def clear(folder: Path, state: JobState) -> None:
    """Before a job runs: move whatever results `folder` holds aside (`set_aside`), saying why."""
    reason = state.problem or "complete results, computed again because resume=false"
    aside = set_aside(folder, reason)
    if aside is not None:
        level = logging.INFO if state.complete else logging.WARNING
        log.log(level, "%s: %s; moved its results to %s and running the job", folder.name, reason, aside.name)
