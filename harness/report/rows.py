"""The rows of finished jobs, read back from their folders, and what the report needs to know of
their columns: the metric calls and each value's direction.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.results import complete_jobs


def metric_names(rows: pd.DataFrame) -> list[str]:
    """The metric calls of a table of rows: every `<metric>_bound_ratio` column but the method's."""
    return [
        c[: -len("_bound_ratio")]
        for c in rows.columns
        if c.endswith("_bound_ratio") and c != "method_bound_ratio"
    ]


def value_fields(rows: pd.DataFrame) -> dict[str, str]:
    """The metric values of a table of rows and their direction (`higher` or `lower` is better), as
    each row's `<field>_better` says; rows written before metrics declared it have `<metric>_auc`
    fields of deletion (lower) and insertion (higher) only.
    """
    declared = {c[: -len("_better")]: c for c in rows.columns if c.endswith("_better")}
    if declared:
        return {f: str(rows[c].dropna().iloc[0]) for f, c in declared.items() if rows[c].notna().any()}
    old = {"deletion_auc": "lower", "insertion_auc": "higher"}
    return {f: b for f, b in old.items() if f in rows.columns}


def load_rows(*sweeps: Path) -> pd.DataFrame:
    """One row per complete job of the given sweep folders; partial and corrupt job folders are
    reported in the log and left out.
    """
    rows = []
    for sweep in sweeps:
        for folder, row in complete_jobs(Path(sweep)):
            row.pop("files")
            rows.append({**row, "job_dir": str(folder)})
    return pd.DataFrame(rows)
