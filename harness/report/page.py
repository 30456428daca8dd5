"""`report.html`: the whole report of a sweep in one self-contained page.

Images, styles, script and data are inline (no network, no server, nothing to build), so the file
opens from disk in any browser, in VS Code's or Jupyter's viewers, and can be mailed. It holds the
verdict and the headline table (sortable: click a column's heading), every metric's settings, the
plots, and an example browser in the spirit of Captum Insights: filter the images by predicted class
and by correct, incorrect or unlabelled; per image its top-5 predictions, its label, each chosen
method's map over it, its curves and its values.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from harness.report.examples import examples
from harness.report.rows import value_fields
from harness.report.statistics import ALPHA, KEYS, Verdict, against_random, summary
from harness.report.tables import headline, one, settings
from harness.results import atomic_write

PNG_LIMIT = 400_000  # bytes: a larger plot (a grid of photos) goes into the page as JPEG


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities as null (JSON has neither), tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _table(frame: pd.DataFrame, table_id: str | None = None, caption: str | None = None) -> str:
    """A DataFrame as a sortable HTML table (the page's script sorts on a heading's click)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    attrs = f' id="{table_id}"' if table_id else ""
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table class="sortable"{attrs}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(v: Any) -> str:
    if v is None or (pd.api.types.is_scalar(v) and not isinstance(v, str) and pd.isna(v)):
        return ""  # None, NaN of any float type, pandas' NA
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, float | np.floating):
        x = float(v)
        return f"{x:.3g}" if abs(x) < 0.001 and x != 0 else f"{x:.3f}"
    return str(v)


def _verdict_section(found: Verdict) -> str:
    parts = ['<section id="verdict"><h2>Verdict</h2>']
    if found.table.empty or "rank" not in found.table.columns:
        text = found.markdown.removeprefix("## Verdict").strip()
        return parts[0] + f"<p>{html.escape(text)}</p></section>"
    for (model, data), group in found.table.groupby(KEYS):
        has_random = "beats_random" in group and (group["method"] == "random").any()
        parts.append(f"<h3>{html.escape(f'{model} / {data}')}</h3>")
        parts.append(
            "<p>Each cell: the method's rank interval (95%, bootstrap over images; 1 = best)"
            + (
                f", ✓ where it beats <code>random</code> (one-sided Wilcoxon signed-rank test on the same "
                f"images, p &lt; {ALPHA} after Holm's correction over the sweep's tests).</p>"
                if has_random
                else ". Tests against random: not applicable (no <code>random</code> in the sweep).</p>"
            )
        )
        parts.append(_table(summary(group, found.better), caption="Verdict per method"))
        tests = against_random(group, found.better)
        if not tests.empty:
            parts.append(
                _table(tests, caption="Against random: median paired gain (positive: better), one-sided "
                       "Wilcoxon p, Holm's p over the sweep's tests")
            )  # fmt: skip
        within = _of(found.within, model, data)
        if not within.empty:
            alphas = within[["field", "methods", "images", "krippendorff_alpha"]]
            parts.append(_table(alphas, caption="Agreement of the per-image rankings (Krippendorff's alpha)"))
        between = _of(found.between, model, data)
        if not between.empty:
            taus = between.pivot(index="field", columns="other", values="kendall_tau").reset_index()
            parts.append(_table(taus, caption="Agreement between metrics (Kendall's tau of the rankings)"))
    parts.append(
        "<details><summary>Every test (verdict.csv)</summary>"
        + _table(found.table, "verdict-table")
        + "</details>"
    )
    if not found.pairwise.empty:
        parts.append(
            "<details><summary>Every pair of methods (pairwise.csv): P(better on an image), "
            "two-sided Wilcoxon, Holm</summary>" + _table(found.pairwise, "pairwise-table") + "</details>"
        )
    return "".join(parts) + "</section>"


def _of(frame: pd.DataFrame, model: str, data: str) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame[(frame["model"] == model) & (frame["data"] == data)]


def _settings_section(rows: pd.DataFrame) -> str:
    lines = [
        {"metric": metric, "setting": key, "value": value}
        for metric, values in settings(rows).items()
        for key, value in values.items()
    ]
    versions = ", ".join(
        f"{c.removesuffix('_version')} {one(rows[c])}"
        for c in ("torch_version", "captum_version")
        if c in rows
    )
    commit = one(rows["git_commit"]) if "git_commit" in rows else "-"
    return (
        '<section id="settings"><h2>Settings</h2><p>Scores are comparable only between runs with the same '
        f"settings. {html.escape(versions)}; commit {html.escape(commit)}. Intervals: 95% bootstrap over "
        "images.</p>"
        + _table(pd.DataFrame(lines, columns=["metric", "setting", "value"]), "settings-table")
        + "</section>"
    )


def _plot(path: Path) -> str:
    """A plot as an inline image; a large PNG (a grid of photos) as JPEG to keep the page small."""
    data, kind = path.read_bytes(), "png"
    if len(data) > PNG_LIMIT:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=85)
        data, kind = buffer.getvalue(), "jpeg"
    uri = f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")
    name = html.escape(path.name)
    return f'<figure><img src="{uri}" alt="{name}"><figcaption>{name}</figcaption></figure>'


ORDER = ("top_k", "saliency", "filters", "features", "actmax", "occlusion", "weights")


def _model_section(folders: list[Path]) -> str:
    """The pictures of `python -m harness.inspect` runs written into the sweep (`<sweep>/inspect`)."""
    pictures = [p for folder in folders for p in sorted(folder.glob("*.png"))]
    if not pictures:
        return ""

    def order(p: Path) -> tuple[int, str]:
        kind = p.stem.split("_", 1)[0].replace("top", "top_k")
        return (ORDER.index(kind) if kind in ORDER else len(ORDER), p.name)

    parts = []
    for p in sorted(pictures, key=order):
        about = p.with_suffix(".json")
        settings = json.loads(about.read_text()) if about.is_file() else {}
        keys = ("layer", "image", "target_name", "steps", "normalise", "window", "k")
        note = ", ".join(f"{k} {settings[k]}" for k in keys if settings.get(k) is not None)
        parts.append(
            _plot(p).replace("</figcaption>", f"{': ' + html.escape(note) if note else ''}</figcaption>")
        )
    where = ", ".join(html.escape(str(f)) for f in folders)
    return (
        '<section id="model"><h2>Model</h2><p>From <code>python -m harness.inspect</code> '
        f"({where}); each picture's arrays and settings are in the <code>.npz</code> and "
        f"<code>.json</code> beside it.</p>{''.join(parts)}</section>"
    )


def _missing(rows: pd.DataFrame, fields: dict[str, str]) -> str:
    """A note naming the jobs whose scores are missing (NaN, or a metric that a merged sweep's other
    jobs did not run), so that an empty cell is never read as a score.
    """
    notes = []
    for field in fields:
        if field in rows.columns:
            missing = rows.loc[rows[field].isna(), "method"].astype(str).tolist()
            if missing:
                notes.append(f"{field} of {', '.join(dict.fromkeys(missing))}")
    if not notes:
        return ""
    text = html.escape("; ".join(notes))
    return f'<p class="missing">Missing values (no number, left empty, not compared): {text}.</p>'


def render(
    rows: pd.DataFrame, found: Verdict, plots: list[Path], title: str, inspected: list[Path] | None = None
) -> str:
    """The page's HTML."""
    fields = value_fields(rows)
    data = json.dumps(_clean(examples(rows, fields)), allow_nan=False, separators=(",", ":"))
    data = data.replace("</", "<\\/")  # nothing in the data may close the script element
    assets = resources.files("harness.report")
    style, script = (assets / "page.css").read_text(), (assets / "page.js").read_text()
    facts = (
        f"{len(rows)} jobs: {rows['method'].nunique()} methods on "
        + ", ".join(sorted({f"{m} / {d}" for m, d in zip(rows["model"], rows["data"], strict=True)}))
        + f"; device {', '.join(sorted(rows['device'].astype(str).unique()))}"
        + f"; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC."
    )
    figures = "".join(_plot(p) for p in plots if p.exists())
    model = _model_section(inspected or [])
    model_link = '<a href="#model">Model</a> ' if model else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<style>{style}</style></head>
<body>
<header><h1>{html.escape(title)}</h1><p>{html.escape(facts)}</p>
<nav><a href="#verdict">Verdict</a> <a href="#summary">Table</a> <a href="#settings">Settings</a>
<a href="#plots">Plots</a> {model_link}<a href="#examples">Examples</a></nav></header>
<main>
{_verdict_section(found)}
<section id="summary"><h2>Per job</h2><p>Mean over images with its 95% interval (↑ higher is better,
↓ lower); cost per image and its ratio to the model's own forward (+backward) time.</p>
{_missing(rows, fields)}{_table(headline(rows), "summary-table")}</section>
{_settings_section(rows)}
<section id="plots"><h2>Plots</h2>{figures or "<p>No plots.</p>"}</section>
{model}
<section id="examples"><h2>Examples</h2>
<div id="controls"></div><p id="shown"></p><div id="legend"></div><div id="cards"></div></section>
</main>
<script type="application/json" id="examples-data">{data}</script>
<script>{script}</script>
</body></html>
"""


def write_page(
    rows: pd.DataFrame,
    found: Verdict,
    plots: list[Path],
    path: Path,
    title: str,
    inspected: list[Path] | None = None,
) -> None:
    """Write `report.html` (atomically) for the sweep's rows, its verdict, its plots and the model
    pictures in the `inspected` folders.
    """
    page = render(rows, found, plots, title, inspected)
    atomic_write(path, lambda p: p.write_text(page, encoding="utf-8"))
