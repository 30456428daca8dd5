"""Tables and plots of a sweep, rebuilt at any time from its job folders.

    python -m harness.report <sweep folder> [<sweep folder> ...] [--out <folder>]

writes `summary.csv` (one row per job), `summary.md` (with the verdict of `harness.statistics`:
each method against `random`, rank intervals, the metrics' agreement), `verdict.csv`,
`pairwise.csv` (every pair of methods: P(better on an image), Wilcoxon, Holm), the plots
`curves.png` (mean deletion and insertion curves per method with a 95% band), `road.png` (ROAD's
most- and least-relevant-first curves), `grid_<model>_<data>.png` (images by methods, each map over
its image), `time_vs_insertion.png`, the sanity checks' figures (`harness.sanity_report`) and the
timing report (`timing.md` and the `speed_*.png` plots, see `harness.speed_report`). At the end of
every sweep, `harness.app.ReportCallback` does the
same.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from harness.results import atomic_write, load_rows, metric_names, read_maps, value_fields  # noqa: E402
from harness.sanity_report import write_sanity  # noqa: E402
from harness.speed_report import save_figure, write_timing  # noqa: E402
from harness.statistics import verdict  # noqa: E402

log = logging.getLogger("harness.report")
GROUP = ["model", "data", "device"]
ARROW = {"higher": "↑", "lower": "↓"}
# The curves of each plot: `<file>.png` shows these curves of curves.csv, where the rows have them.
GRID_IMAGES = 8  # rows of the grid: a figure to look at, not every image of a large sweep
CURVE_PLOTS = {"curves": ("deletion", "insertion"), "road": ("road_morf", "road_lerf")}


def _label(rows: pd.DataFrame) -> pd.Series:
    """Method name, prefixed by what varies across the sweep (model, data, device)."""
    varying = [c for c in GROUP if rows[c].nunique() > 1]
    return rows[varying + ["method"]].astype(str).agg("/".join, axis=1)


def markdown(rows: pd.DataFrame) -> str:
    """The headline table: each metric value with its 95% interval and direction (as the metric
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
    table = table.loc[order]
    note = _settings_note(rows, metrics)
    return table.to_markdown(index=False) + "\n\n" + note + "\n"


def _value(v: float) -> str:
    """Three decimals, or three significant digits for values too small for them (infidelity)."""
    return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.2e}"


def _ratio(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _settings_note(rows: pd.DataFrame, metrics: list[str]) -> str:
    """The evaluation settings, which must match for scores to be comparable."""
    parts = []
    for m in metrics:
        cols = sorted(c for c in rows.columns if c.startswith(f"{m}.") and c != f"{m}.chunk_size")
        values = ", ".join(f"{c.split('.', 1)[1]}={_one(rows[c])}" for c in cols)
        parts.append(f"{m}: {values}" if values else m)
    device = ", ".join(
        f"{c}={_one(rows[c])}"
        for c in ["precision", "channels_last", "batch_size", "torch_threads", "gpu_name", "machine", "cpu"]
        if c in rows.columns  # runs of older versions lack some
    )
    return (
        "Settings: " + "; ".join(parts) + f"; {device}; torch {_one(rows['torch_version'])}, "
        f"captum {_one(rows['captum_version'])}, commit {_one(rows['git_commit'])}. "
        "Intervals: 95% bootstrap over images. Bound: the model's own forward (+backward) time for "
        "the images the call forwarded, at its best batch size, at the speed of the faster of the loops "
        "timed just before and after the call; the ratio is the best over repeats."
    )


def _one(col: pd.Series) -> str:
    values = col.dropna().astype(str).unique()
    return values[0] if len(values) == 1 else "{" + ", ".join(values) + "}" if len(values) else "-"


def plot_curves(rows: pd.DataFrame, curves: list[str], path: Path) -> None:
    """Mean curve over images per job, with a 95% band (normal approximation over images), one panel
    per curve of `curves.csv` (`deletion`, `road_morf`, ...), jobs ordered best first by the curve's
    `<curve>_auc`.
    """
    fields = value_fields(rows)
    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 5), squeeze=False)
    colours = [plt.get_cmap("tab20")(i) for i in range(20)]
    labels = _label(rows)
    curves_of = {i: pd.read_csv(Path(d) / "curves.csv") for i, d in rows["job_dir"].items()}
    for ax, m in zip(axes[0], curves, strict=True):
        metric = next(n for n in metric_names(rows) if m == n or m.startswith(f"{n}_"))
        # Probabilities live in [0, 1]; logits do not.
        probability = f"{metric}.score" not in rows or bool(
            rows[f"{metric}.score"].isin(["softmax", "accuracy"]).all()
        )
        order = rows[f"{m}_auc"].sort_values(ascending=fields[f"{m}_auc"] == "lower").index
        for rank, i in enumerate(order):
            job, table = rows.loc[i], curves_of[i]
            sub = table[table["metric"] == m]
            c = sub.pivot(index="image_id", columns="point", values="score")
            x = sub.groupby("point")["fraction"].first()
            mean, sem = c.mean(), c.std(ddof=1).fillna(0) / math.sqrt(len(c))
            colour = colours[rank % len(colours)]
            ax.plot(x, mean, color=colour, label=f"{labels[i]} ({job[f'{m}_auc']:.3f})")
            low, high = mean - 1.96 * sem, mean + 1.96 * sem
            if probability:
                low, high = low.clip(lower=0), high.clip(upper=1)
            ax.fill_between(x, low, high, color=colour, alpha=0.06)
        ax.set(
            title=f"{m}: mean over images, 95% band (AUC, {fields[f'{m}_auc']} is better)",
            xlabel="fraction of pixels changed",
            ylabel=str(_one(rows[f"{metric}.score"])) if f"{metric}.score" in rows else "score",
            xlim=(0, 1),
        )
        if probability:
            ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _display(a: torch.Tensor) -> tuple[torch.Tensor, str, float]:
    """Map scaled for display: non-negative maps from their minimum to their 99th percentile,
    signed maps by the 99th percentile of their magnitude (a few extreme pixels set no scale).
    """
    if a.min() >= 0:
        lo, hi = a.min(), torch.quantile(a.flatten(), 0.99)
        return ((a - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1), "inferno", 0.0
    scale = torch.quantile(a.abs().flatten(), 0.99).clamp_min(1e-12)
    return (a / scale).clamp(-1, 1), "bwr", -1.0


def plot_grid(rows: pd.DataFrame, path: Path) -> None:
    """Images (rows, the first `GRID_IMAGES`) by methods (columns), each map over its image (signed
    maps: red +, blue -), the object's mask outlined in green where the data knows it.
    """
    jobs = [read_maps(Path(d)) for d in rows["job_dir"]]
    n = min(len(jobs[0]["ids"]), GRID_IMAGES)
    fig, axes = plt.subplots(n, len(jobs) + 1, figsize=(1.6 * (len(jobs) + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        image = jobs[0]["images"][i].transpose(1, 2, 0)
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(f"{jobs[0]['ids'][i]}\n{jobs[0]['target_names'][i]}", fontsize=6)
        grey = image.mean(axis=2)
        for j, (job, method) in enumerate(zip(jobs, rows["method"], strict=True), start=1):
            a, cmap, vmin = _display(torch.from_numpy(job["maps"][i]).float().sum(dim=0))
            axes[i, j].imshow(grey, cmap="gray")
            axes[i, j].imshow(a.numpy(), cmap=cmap, vmin=vmin, vmax=1, alpha=0.6)
            if "truth_mask" in job:  # the known evidence, outlined
                axes[i, j].contour(job["truth_mask"][i], levels=[0.5], colors="lime", linewidths=0.6)
            if i == 0:
                axes[i, j].set_title(method, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=72)  # a dozen methods by eight images: keep the file small


def plot_time_vs_insertion(rows: pd.DataFrame, path: Path) -> None:
    """Cost per image against insertion AUC, with the 95% interval."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (_, r), label in zip(rows.iterrows(), _label(rows), strict=True):
        y, lo, hi = r["insertion_auc"], r["insertion_auc_low"], r["insertion_auc_high"]
        ax.errorbar(r["method_ms_per_image"], y, yerr=[[y - lo], [hi - y]], fmt="o", capsize=3)
        ax.annotate(
            label, (r["method_ms_per_image"], y), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.set(xscale="log", xlabel="method time per image (ms, log)", ylabel="insertion AUC (higher is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def write_report(*sweeps: Path, out: Path | None = None) -> Path:
    """Write the tables and plots of one or more sweeps into `out` (default: the first sweep)."""
    rows = load_rows(*sweeps)
    if rows.empty:
        raise FileNotFoundError(f"no complete job (no */run.json) under {[str(s) for s in sweeps]}")
    out = Path(out or sweeps[0])
    out.mkdir(parents=True, exist_ok=True)
    rows = rows.sort_values(GROUP + ["method"], kind="stable").reset_index(drop=True)
    verdict_table, verdict_section, pairs = verdict(rows)
    atomic_write(out / "verdict.csv", lambda p: verdict_table.to_csv(p, index=False))
    atomic_write(out / "pairwise.csv", lambda p: pairs.to_csv(p, index=False))
    atomic_write(out / "summary.md", lambda p: p.write_text(markdown(rows) + "\n" + verdict_section))
    for name, wanted in CURVE_PLOTS.items():
        present = [c for c in wanted if f"{c}_auc" in rows.columns]
        if present:
            plot_curves(rows, present, out / f"{name}.png")
    if "insertion_auc" in rows.columns:
        plot_time_vs_insertion(rows, out / "time_vs_insertion.png")
    for (model, data), group in rows.groupby(["model", "data"]):
        for device, per_device in group.groupby("device"):
            suffix = f"_{device}" if group["device"].nunique() > 1 else ""
            plot_grid(per_device.drop_duplicates("method"), out / f"grid_{model}_{data}{suffix}.png")
    if "method_bound_ratio" in rows.columns:
        write_timing(rows, out)
    write_sanity(rows, out)
    # Last: a summary.csv newer than every job means the whole report is (harness.app.report_is_current).
    atomic_write(out / "summary.csv", lambda p: rows.drop(columns="job_dir").to_csv(p, index=False))
    log.info("report of %d jobs written to %s", len(rows), out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: rebuild the report of sweep folders."""
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep folders (or single job folders)")
    parser.add_argument("--out", type=Path, help="where to write (default: the first sweep folder)")
    args = parser.parse_args(argv)
    missing = [str(s) for s in args.sweeps if not s.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    try:
        out = write_report(*args.sweeps, out=args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"results: {out}/summary.md")


if __name__ == "__main__":
    main()
