"""The end of a sweep: its tables, plots and page once every job has ended, whichever launcher ran
them, then the jobs that failed, each named, and a non-zero exit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness.config import first_line
from harness.results import ERROR_FILE, NOT_APPLICABLE_FILE, ROW_FILE, remove_temporaries

log = logging.getLogger("harness")
# The sweep folder of the running sweep (ReportCallback sets it), for the line that a Ctrl-C prints.
RUNNING: dict[str, str] = {}


def report_is_current(sweep: Path) -> bool:
    """Whether the sweep's `summary.csv` is newer than every job folder and every job's row: then
    no job was added, re-run or set aside since the report was written.
    """
    summary = sweep / "summary.csv"
    if not summary.is_file():
        return False
    jobs = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    stamps = [p.stat().st_mtime_ns for p in jobs] + [
        (p / ROW_FILE).stat().st_mtime_ns for p in jobs if (p / ROW_FILE).is_file()
    ]
    return all(t < summary.stat().st_mtime_ns for t in stamps)


class ReportCallback(Callback):
    """Hydra callback: the sweep's tables, plots and page once every job has ended (any launcher), then
    the jobs that failed with a message, if any, each named, and a non-zero exit.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        RUNNING["sweep"] = str(config.hydra.sweep.dir)
        for old in Path(config.hydra.sweep.dir).glob(f"*/{ERROR_FILE}"):  # of an earlier run
            old.unlink()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        sweep = Path(config.hydra.sweep.dir)
        # Every job of the sweep has ended: a temporary left in a job folder is of a write killed in
        # an earlier run (jobs that a resume skipped never start, so nothing else removes it).
        for job in {p.parent for p in sweep.glob("*/.*.tmp")}:
            remove_temporaries(job)
        if any(sweep.glob(f"*/{ROW_FILE}")):
            if report_is_current(sweep):
                log.info("report of %s is up to date: no job ran since it was written", sweep)
            else:
                from harness.report import write_report  # matplotlib and pandas: only when needed

                write_report(sweep)
            print(f"results: {sweep}/summary.md, {sweep}/report.html")
        skipped = sorted(sweep.glob(f"*/{NOT_APPLICABLE_FILE}"))
        if skipped:
            log.info(
                "%d job(s) not applicable (skip_inapplicable=true), each said in %s: %s",
                len(skipped), NOT_APPLICABLE_FILE, ", ".join(p.parent.name for p in skipped),
            )  # fmt: skip
        failed = sorted(sweep.glob(f"*/{ERROR_FILE}"))
        by_message: dict[str, list[str]] = {}
        for path in failed:
            by_message.setdefault(first_line(path.read_text()), []).append(path.parent.name)
        for text, jobs in by_message.items():
            more = f" and {len(jobs) - 1} more" if len(jobs) > 1 else ""
            log.error("failed: %s%s: %s", jobs[0], more, text)
        if failed:
            log.error("%d job(s) failed; after fixing, run the same command with resume=true", len(failed))
            raise SystemExit(1)
