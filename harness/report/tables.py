"""The tables of a sweep's report: the headline table of `summary.md` and the settings of every metric."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness.report.rows import metric_names, value_fields

GROUP = ["model", "data", "device"]
ARROW = {"higher": "↑", "lower": "↓"}
# Environment fields every row carries, shown beside the metrics' settings.
DEVICE_FIELDS = ["precision", "channels_last", "batch_size", "torch_threads", "gpu_name", "machine", "cpu"]


def label(rows: pd.DataFrame) -> pd.Series:
    """Method name, prefixed by what varies across the sweep (model, data, device)."""
    varying = [c for c in GROUP if rows[c].nunique() > 1]
    return rows[varying + ["method"]].astype(str).agg("/".join, axis=1)


def headline(rows: pd.DataFrame) -> pd.DataFrame:
    """The headline table, one row per job, best first by insertion AUC (or the first value) within
    (model, data, device): each metric value with its 95% interval and direction (as the metric
    declares it), cost per image and ratio to the forward bound.
    """
    metrics, fields = metric_names(rows), value_fields(rows)
    table = pd.DataFrame({"model": rows["model"], "data": rows["data"], "device": rows["device"]})
    table["method"] = rows["method"]
    table["images"] = rows["n_images"]
    for f, better in fields.items():
        table[f"{f} {ARROW[better]}"] = [
            f"{_value(a)} [{_value(lo)}, {_value(hi)}]"
            for a, lo, hi in zip(rows[f], rows[f"{f}_low"], rows[f"{f}_high"], strict=True)
        ]
    table["method ms/image"] = rows["method_ms_per_image"].map("{:.1f}".format)
    table["method / bound"] = rows["method_bound_ratio"].map(_ratio)
    for m in metrics:
        table[f"{m} / bound"] = rows[f"{m}_bound_ratio"].map(_ratio)
    key = "insertion_auc" if "insertion_auc" in fields else next(iter(fields))
    order = rows.sort_values(GROUP + [key], ascending=[True] * 3 + [fields[key] == "lower"]).index
    return table.loc[order]


def markdown(rows: pd.DataFrame) -> str:
    """The headline table in Markdown, with the settings under it."""
    return headline(rows).to_markdown(index=False) + "\n\n" + _settings_note(rows) + "\n"


def _value(v: float) -> str:
    """Three decimals, or three significant digits for values too small for them (infidelity)."""
    return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.2e}"


def _ratio(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def settings(rows: pd.DataFrame) -> dict[str, dict[str, str]]:
    """Each metric's settings (`<metric>.<param>` fields but the chunk size, which changes no score)
    and the device's, as text; a setting that differs between jobs shows every value, `{a, b}`.
    """
    out = {}
    for m in metric_names(rows):
        cols = sorted(c for c in rows.columns if c.startswith(f"{m}.") and c != f"{m}.chunk_size")
        out[m] = {c.split(".", 1)[1]: one(rows[c]) for c in cols}
    out["device"] = {c: one(rows[c]) for c in DEVICE_FIELDS if c in rows.columns}  # older runs lack some
    return out


def _settings_note(rows: pd.DataFrame) -> str:
    """The evaluation settings, which must match for scores to be comparable."""
    given = settings(rows)
    device = ", ".join(f"{k}={v}" for k, v in given.pop("device").items())
    parts = [
        f"{m}: {', '.join(f'{k}={v}' for k, v in values.items())}" if values else m
        for m, values in given.items()
    ]
    return (
        "Settings: " + "; ".join(parts) + f"; {device}; torch {one(rows['torch_version'])}, "
        f"captum {one(rows['captum_version'])}, commit {one(rows['git_commit'])}. "
        "Intervals: 95% bootstrap over images. Bound: the model's own forward (+backward) time for "
        "the images the call forwarded, at its best batch size, at the speed of the faster of the loops "
        "timed just before and after the call; the ratio is the best over repeats."
    )


def one(col: pd.Series) -> str:
    """A column's one value as text, `{a, b}` when the jobs differ, `-` when none has it."""
    values = col.dropna().astype(str).unique()
    return values[0] if len(values) == 1 else "{" + ", ".join(values) + "}" if len(values) else "-"
