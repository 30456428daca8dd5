"""The report of a sweep, rebuilt at any time from its job folders.

    python -m harness.report <sweep folder> [<sweep folder> ...] [--out <folder>]

writes, into the first sweep folder or `--out`:

- `summary.csv` (one row per job) and `summary.md`: the headline table (`tables`) and the verdict
  (`statistics`: each method against `random`, rank intervals, the metrics' agreement);
- `verdict.csv` and `pairwise.csv` (every pair of methods: P(better on an image), Wilcoxon, Holm);
- the plots (`plots`): `curves.png` (mean deletion and insertion curves per method with a 95% band),
  `road.png` (ROAD's most- and least-relevant-first curves), `grid_<model>_<data>.png` (images by
  methods, each map over its image), `time_vs_insertion.png`; the sanity checks' figures (`sanity`);
  the timing report (`timing.md` and the `speed_*.png` plots, `speed`);
- `report.html` (`page`): all of it in one self-contained page with an example browser, and a
  "Model" section with the pictures of `python -m harness.inspect out=<sweep>/inspect` when the
  sweep has them.

Several sweeps merge into one report and one verdict. At the end of every sweep,
`harness.sweep.ReportCallback` does the same.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from harness.report.page import write_page
from harness.report.plots import plot_curves, plot_grid, plot_time_vs_insertion
from harness.report.rows import load_rows
from harness.report.sanity import write_sanity
from harness.report.speed import write_timing
from harness.report.statistics import verdict
from harness.report.tables import GROUP, markdown
from harness.results import NOT_APPLICABLE_FILE, atomic_write, remove_temporaries

__all__ = ["write_report"]
log = logging.getLogger("harness.report")
# The curves of each plot: `<file>.png` shows these curves of curves.csv, where the rows have them.
CURVE_PLOTS = {"curves": ("deletion", "insertion"), "road": ("road_morf", "road_lerf")}
# The hidden folder a report is written into before it is moved into place.
STAGING = ".report-partial-"


def write_report(*sweeps: Path, out: Path | None = None) -> Path:
    """Write the tables, plots and page of one or more sweeps into `out` (default: the first sweep).

    Everything is written into a hidden folder inside `out` first and moved into place when all of
    it is written (`summary.csv` last), so that a report that fails leaves the old one (or none),
    never half of a new one.
    """
    rows = load_rows(*sweeps)
    if rows.empty:
        raise FileNotFoundError(f"no complete job (no */run.json) under {[str(s) for s in sweeps]}")
    out = Path(out or sweeps[0])
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)  # of a report killed while writing (a job's own go with set_aside)
    for old in out.glob(f"{STAGING}*"):  # of a report killed while writing
        shutil.rmtree(old, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=STAGING))
    try:
        _write(rows, sweeps, out, staging)
        written = sorted(p for p in staging.rglob("*") if p.is_file())
        for path in sorted(written, key=lambda p: p.name == "summary.csv"):  # summary.csv last
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("report of %d jobs written to %s", len(rows), out)
    return out


def _write(rows: pd.DataFrame, sweeps: tuple[Path, ...], out: Path, staging: Path) -> None:
    """Every file of the report into `staging`; `out` is where it will lie (its `inspect` pictures)."""
    rows = rows.sort_values(GROUP + ["method"], kind="stable").reset_index(drop=True)
    found = verdict(rows)
    atomic_write(staging / "verdict.csv", lambda p: found.table.to_csv(p, index=False))
    atomic_write(staging / "pairwise.csv", lambda p: found.pairwise.to_csv(p, index=False))
    summary = markdown(rows) + "\n" + found.markdown + _not_applicable(sweeps)
    atomic_write(staging / "summary.md", lambda p: p.write_text(summary))
    plots = []
    for name, wanted in CURVE_PLOTS.items():
        present = [c for c in wanted if f"{c}_auc" in rows.columns]
        if present:
            plot_curves(rows, present, staging / f"{name}.png")
            plots.append(staging / f"{name}.png")
    if "insertion_auc" in rows.columns:
        plot_time_vs_insertion(rows, staging / "time_vs_insertion.png")
        plots.append(staging / "time_vs_insertion.png")
    for (model, data), group in rows.groupby(["model", "data"]):
        for device, per_device in group.groupby("device"):
            suffix = f"_{device}" if group["device"].nunique() > 1 else ""
            plot_grid(per_device.drop_duplicates("method"), staging / f"grid_{model}_{data}{suffix}.png")
            plots.append(staging / f"grid_{model}_{data}{suffix}.png")
    if "method_bound_ratio" in rows.columns:
        plots += write_timing(rows, staging)
    plots += write_sanity(rows, staging)
    names = ", ".join(Path(s).resolve().name for s in sweeps)
    inspected = list(
        dict.fromkeys(f for f in [out / "inspect", *(Path(s) / "inspect" for s in sweeps)] if f.is_dir())
    )
    write_page(rows, found, plots, staging / "report.html", f"Attribution report: {names}", inspected)
    # Last: a summary.csv newer than every job means the whole report is (see report_is_current).
    atomic_write(staging / "summary.csv", lambda p: rows.drop(columns="job_dir").to_csv(p, index=False))


def _not_applicable(sweeps: tuple[Path, ...]) -> str:
    """The jobs whose method could not explain their model (`skip_inapplicable`), each with why."""
    said = sorted(p for sweep in sweeps for p in sweep.glob(f"*/{NOT_APPLICABLE_FILE}"))
    if not said:
        return ""
    lines = [f"- {p.read_text().strip()}" for p in said]
    return "\n## Not applicable\n\n" + "\n".join(lines) + "\n"
