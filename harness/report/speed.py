"""The timing side of a sweep's report: where the time goes and what each speed option does.

`write_timing(rows, out)` writes `timing.md` (a row per job: time per image, ratio to the bound,
kernel time split forward and backward, busy fraction, chunk size, peak memory; where each job's
wall time goes, calls against overhead, with the sweep's total; and, when the sweep
varies the speed options, what each option does to time and to the AUCs against the plain fp32 eager
path) and four plots: `speed_throughput.png` (model images per second against the chunk size),
`speed_kernels.png` (kernel time per method, forward, backward and the rest), `speed_bound.png`
(each call's time over its forward bound) and `speed_memory.png` (peak memory per job).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from harness.report.plots import save_figure  # noqa: E402
from harness.report.rows import metric_names, value_fields  # noqa: E402
from harness.results import atomic_write  # noqa: E402

# Options a speed sweep varies; the plain path is fp32, eager, no TF32.
OPTIONS = ["precision", "channels_last", "cudnn_benchmark", "tf32", "compile", "memory_budget"]
PLAIN = {"precision": "fp32", "compile": None, "tf32": False}
# An option is safe when it moves no mean AUC by more than this.
SAFE_AUC = 0.005
CELL = ["model", "data", "device", "method", "n_images", "seed"]


def _options(rows: pd.DataFrame) -> list[str]:
    return [c for c in OPTIONS if c in rows.columns]


def varying_options(rows: pd.DataFrame) -> list[str]:
    """The speed options that take more than one value across the sweep."""
    return [c for c in _options(rows) if rows[c].astype(str).nunique() > 1]


def _option_label(row: pd.Series, varying: list[str]) -> str:
    parts = []
    for c in varying:
        v = row[c]
        parts.append(f"{c}={'eager' if c == 'compile' and _missing(v) else v}")
    return ", ".join(parts) or "defaults"


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _is_plain(row: pd.Series) -> bool:
    for key, value in PLAIN.items():
        if key not in row:
            continue
        if value is None:
            if not _missing(row[key]):
                return False
        elif row[key] != value:
            return False
    return True


def _reference(rows: pd.DataFrame) -> pd.Series:
    """For each job, the index of its plain-path job: same cell, fp32 eager without TF32, and of those
    the one with channels_last and the largest memory budget (the defaults).
    """
    ref = pd.Series(pd.NA, index=rows.index, dtype="object")
    keys = [c for c in CELL if c in rows.columns]
    for _, cell in rows.groupby(keys, dropna=False):
        plain = cell[cell.apply(_is_plain, axis=1)]
        if plain.empty:
            continue
        order = [c for c in ("channels_last", "memory_budget") if c in plain.columns]
        best = plain.sort_values(order, ascending=False).index[0] if order else plain.index[0]
        ref[cell.index] = best
    return ref


def timing_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per job: cost, bound ratio, kernel split, busy fraction, chunk size, peak memory."""
    varying = varying_options(rows)
    t = pd.DataFrame({"model": rows["model"], "method": rows["method"], "device": rows["device"]})
    t["options"] = [_option_label(r, varying) for _, r in rows.iterrows()]
    t["chunk"] = rows.get("method_chunk_size")
    t["ms/image"] = rows["method_ms_per_image"]
    t["/ bound"] = rows["method_bound_ratio"]
    t["kernel fwd ms"] = rows.get("method_kernel_forward_ms_per_image")
    t["kernel bwd ms"] = rows.get("method_kernel_backward_ms_per_image")
    t["busy"] = rows.get("method_busy")
    for m in metric_names(rows):
        t[f"{m} ms/image"] = rows[f"{m}_ms_per_image"]
        t[f"{m} / bound"] = rows[f"{m}_bound_ratio"]
        t[f"{m} busy"] = rows.get(f"{m}_busy")
    t["peak MiB"] = rows.get("peak_mem_mb")
    return t


def option_effects(rows: pd.DataFrame) -> pd.DataFrame:
    """Each job against its plain-path job: speed-up of the method and change of every mean AUC."""
    ref = _reference(rows)
    varying = varying_options(rows)
    lines = []
    for i, r in rows.iterrows():
        j = ref[i]
        if pd.isna(j):
            continue
        base = rows.loc[j]
        line: dict[str, Any] = {
            "model": r["model"],
            "method": r["method"],
            "device": r["device"],
            "options": _option_label(r, varying),
            "speed-up": base["method_ms_per_image"] / r["method_ms_per_image"],
        }
        moved = []
        for f in value_fields(rows):
            d = r[f] - base[f]
            line[f"Δ {f}"] = d
            moved.append(abs(d))
        line["safe"] = "yes" if max(moved, default=0.0) <= SAFE_AUC else "no"
        lines.append(line)
    return pd.DataFrame(lines)


# The parts of a job's overhead, in the order of the row's overhead_<part>_s fields (harness.job.run).
OVERHEAD_PARTS = ("build", "calibration", "warmup", "bound_loops", "profile", "write", "other")


def overhead_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Where each job's wall time goes: the method and metric calls, and the overhead by part, with a
    last line for the whole sweep.
    """
    t = pd.DataFrame({"model": rows["model"], "method": rows["method"], "device": rows["device"]})
    t["calibration"] = rows.get("calibration")
    t["job s"] = rows["job_s"]
    t["calls s"] = rows["job_s"] - rows["overhead_s"]
    t["overhead s"] = rows["overhead_s"]
    for part in OVERHEAD_PARTS:
        t[f"{part} s"] = rows.get(f"overhead_{part}_s")
    total = t.select_dtypes("number").sum().to_frame().T
    total[["model", "method", "device", "calibration"]] = ["all", f"{len(t)} jobs", "", ""]
    t = pd.concat([t, total], ignore_index=True)
    t.insert(t.columns.get_loc("overhead s") + 1, "overhead share", t["overhead s"] / t["job s"])
    return t


def _fmt(table: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    return table.map(cell).to_markdown(index=False)


def plot_throughput(rows: pd.DataFrame, path: Path) -> None:
    """Model images per second against the chunk size, plain forward and forward+backward."""
    varying = [c for c in varying_options(rows) if c != "memory_budget"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    seen = set()  # one line per model and options in each panel (forward-only jobs time no backward)
    for _, r in rows.iterrows():
        options = f", {_option_label(r, varying)}" if varying else ""
        label = f"{r['model']} ({r['device']}{options})"
        for ax, key in zip(axes[0], ("forward_ms_by_batch", "forward_backward_ms_by_batch"), strict=True):
            by_batch = r.get(key)
            if not isinstance(by_batch, dict) or not by_batch or (label, key) in seen:
                continue
            seen.add((label, key))
            sizes = sorted(by_batch, key=int)
            ax.plot([int(s) for s in sizes], [1e3 / by_batch[s] for s in sizes], "o-", label=label)
    for ax, title in zip(axes[0], ("plain forward", "forward+backward"), strict=True):
        ax.set(xscale="log", xlabel="images per chunk (log)", ylabel="images per second", title=title)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _job_labels(rows: pd.DataFrame) -> list[str]:
    varying = varying_options(rows)
    group = [c for c in ("model", "device") if rows[c].nunique() > 1]
    return [
        "/".join([*(str(r[c]) for c in group), str(r["method"])])
        + (f" [{_option_label(r, varying)}]" if varying else "")
        for _, r in rows.iterrows()
    ]


def plot_kernels(rows: pd.DataFrame, path: Path) -> None:
    """Per job, the method's time per image: forward kernels, backward kernels and the rest."""
    if "method_kernel_forward_ms_per_image" not in rows:
        return
    labels = _job_labels(rows)
    fwd = rows["method_kernel_forward_ms_per_image"].fillna(0)
    bwd = rows["method_kernel_backward_ms_per_image"].fillna(0)
    rest = (rows["method_ms_per_image"] - fwd - bwd).clip(lower=0)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    y = range(len(rows))
    kind = "GPU kernels" if (rows.get("kernel_kind") == "cuda_kernels").any() else "CPU ops"
    ax.barh(y, fwd, label=f"forward {kind}")
    ax.barh(y, bwd, left=fwd, label=f"backward {kind}")
    ax.barh(y, rest, left=fwd + bwd, label="the rest (host, launches, idle)", color="0.8")
    ax.set(
        yticks=list(y),
        xlabel="method ms per image",
        xscale="log" if _wide(rows["method_ms_per_image"]) else "linear",
    )
    ax.set_yticklabels(labels, fontsize=7)
    ax.legend(fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def _wide(values: pd.Series) -> bool:
    v = values[values > 0]
    return len(v) > 1 and v.max() / v.min() > 50


def plot_bound(rows: pd.DataFrame, path: Path) -> None:
    """Each call's time over its forward (or forward+backward) bound: 1 is the model's own cost."""
    calls = ["method", *metric_names(rows)]
    labels = _job_labels(rows)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) * len(calls) / 2 + 1.5))
    height = 0.8 / len(calls)
    for k, call in enumerate(calls):
        ratio = rows[f"{call}_bound_ratio"].astype(float)
        ax.barh([i + k * height for i in range(len(rows))], ratio, height=height, label=call)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(1.1, color="k", lw=0.8, ls=":")
    ax.set(
        yticks=[i + 0.4 - height / 2 for i in range(len(rows))],
        xlabel="time / bound (1: the model's own cost)",
    )
    ax.set_yticklabels(labels, fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_memory(rows: pd.DataFrame, path: Path) -> None:
    """Peak memory per job (CUDA allocator peak, or the process's resident high-water mark)."""
    labels = _job_labels(rows)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ax.barh(range(len(rows)), rows["peak_mem_mb"])
    kind = str(rows["peak_mem_kind"].iloc[0]) if "peak_mem_kind" in rows else "peak"
    ax.set(yticks=list(range(len(rows))), xlabel=f"peak memory, MiB ({kind})")
    ax.set_yticklabels(labels, fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_timing(rows: pd.DataFrame, out: Path) -> list[Path]:
    """Write `timing.md` and the speed plots for the sweep's rows; returns the plots' paths."""
    text = ["# Timing\n", _fmt(timing_table(rows)), ""]
    text.append(
        "ms/image: median wall time per image; / bound: best ratio of a call to its own forward "
        "(+backward) bound; kernel fwd/bwd ms: profiler kernel time (GPU) or ATen op time (CPU) per "
        "image inside and outside autograd's backward; busy: that time over the wall time."
    )
    if "job_s" in rows.columns:
        text += [
            "\n## Where each job's time goes\n",
            "Seconds of wall time per job: in the timed method and metric calls, and the rest "
            "(overhead): building the job, measuring its calibration (once per sweep, then reused), "
            "warm-ups, the bound loops, profiling, writing results, and other work (imports in a "
            "process's first job, the top-1 forward).\n",
            _fmt(overhead_table(rows)),
        ]
    if varying_options(rows):
        effects = option_effects(rows)
        if not effects.empty:
            text += [
                "\n## What each speed option does\n",
                f"Against the plain path (fp32, eager, no TF32) of the same model, method and images. "
                f"Safe: no mean AUC moves by more than {SAFE_AUC}.\n",
                _fmt(effects),
            ]
    atomic_write(out / "timing.md", lambda p: p.write_text("\n".join(text) + "\n"))
    plots = {
        "throughput": plot_throughput,
        "kernels": plot_kernels,
        "bound": plot_bound,
        "memory": plot_memory,
    }
    for name, plot in plots.items():
        plot(rows, out / f"speed_{name}.png")
    return [out / f"speed_{name}.png" for name in plots]
