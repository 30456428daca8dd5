"""Whether a ranking of methods holds: paired tests against `random`, pairwise effect sizes, bootstrap
rank intervals and the metrics' agreement, from the per-image scores every job writes (`scores.csv`).

Per (model, data) and metric value (its direction read from the row's `<field>_better`):

- `versus_random`: each method against `random` on the same images: the one-sided Wilcoxon
  signed-rank test (SciPy) of the paired differences, oriented so that positive is better; the
  median difference with a 95% bootstrap interval; the verdict, p below 0.05 after Holm's
  correction over every test of the sweep (Gevaert et al. 2024, attribench);
- `pairwise`: every pair of methods: the probability that the first scores better than the
  second on an image (common-language effect size, ties counted half) and a two-sided Wilcoxon
  test, Holm-corrected over the sweep's pairs;
- `ranks`: each method's rank (1 = best) under a bootstrap over images: the probability of being
  best and a 95% rank interval;
- `agreement` (Tomsett et al. 2020): within a metric, Krippendorff's alpha (ordinal) of the
  per-image rankings of the methods (images as raters); between metrics, Kendall's tau of their
  rankings of the methods' means.

A statistic that needs `random` or two methods is reported as not applicable (`note`), not raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
KEYS = ["model", "data"]


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): the k-th smallest of m is multiplied by
    m - k + 1, made non-decreasing in that order, capped at 1; NaN stays NaN and does not count.

    Example:
        >>> holm([0.01, 0.04, 0.03]).round(4).tolist()
        [0.03, 0.06, 0.06]
    """
    values = np.asarray(p, dtype=float)
    out = np.full_like(values, np.nan)
    known = np.flatnonzero(~np.isnan(values))
    order = known[np.argsort(values[known], kind="stable")]
    m = len(order)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * values[order]) if m else np.array([])
    out[order] = np.minimum(adjusted, 1.0)
    return out


def per_image(rows: pd.DataFrame) -> pd.DataFrame:
    """Long table (model, data, method, image_id, field, value) of every job's per-image values;
    jobs of the same (model, data, method) (several seeds or devices) are averaged per image.
    """
    fields = [c[: -len("_better")] for c in rows.columns if c.endswith("_better")]
    parts = []
    for _, row in rows.iterrows():
        scores = pd.read_csv(Path(row["job_dir"]) / "scores.csv")
        present = [f for f in fields if f in scores.columns]
        long = scores.melt(id_vars="image_id", value_vars=present, var_name="field", value_name="value")
        parts.append(long.assign(model=row["model"], data=row["data"], method=row["method"]))
    if not parts:
        return pd.DataFrame(columns=[*KEYS, "method", "image_id", "field", "value"])
    table = pd.concat(parts, ignore_index=True).dropna(subset=["value"])
    return table.groupby([*KEYS, "method", "field", "image_id"], as_index=False)["value"].mean()


def _oriented(table: pd.DataFrame, better: dict[str, str]) -> pd.DataFrame:
    """Images by methods, per (model, data, field), signed so that higher is better."""
    sign = table["field"].map(lambda f: 1.0 if better[f] == "higher" else -1.0)
    return table.assign(value=table["value"] * sign)


def _wide(group: pd.DataFrame) -> pd.DataFrame:
    """Images (rows, only those every method scored) by methods (columns)."""
    return group.pivot(index="image_id", columns="method", values="value").dropna()


def _bootstrap_median(d: np.ndarray, rng: np.random.Generator, n: int = 2000) -> tuple[float, float]:
    idx = rng.integers(0, len(d), (n, len(d)))
    medians = np.median(d[idx], axis=1)
    return float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))


def versus_random(table: pd.DataFrame, better: dict[str, str], seed: int = 0) -> pd.DataFrame:
    """Each method against `random` per (model, data, field); see the module's docstring."""
    rng = np.random.default_rng(seed)
    out = []
    for (model, data, field), group in _oriented(table, better).groupby([*KEYS, "field"]):
        wide = _wide(group)
        for method in sorted(set(wide.columns) - {"random"}):
            base = {"model": model, "data": data, "field": field, "better": better[field], "method": method}
            if "random" not in wide.columns:
                out.append(base | {"note": "not applicable: the sweep has no random baseline"})
                continue
            d = (wide[method] - wide["random"]).to_numpy()
            if len(d) < 2 or not np.any(d):
                note = (
                    "not applicable: fewer than 2 images" if len(d) < 2 else "equal to random on every image"
                )
                out.append(base | {"n_images": len(d), "p": np.nan if len(d) < 2 else 1.0, "note": note})
                continue
            low, high = _bootstrap_median(d, rng)
            p = float(stats.wilcoxon(d, alternative="greater").pvalue)
            out.append(base | {"n_images": len(d), "median_gain": float(np.median(d)), "gain_low": low,
                               "gain_high": high, "p": p})  # fmt: skip
    result = pd.DataFrame(out)
    if result.empty:
        return result
    result["p_holm"] = holm(result.get("p", pd.Series(np.nan, index=result.index)).to_numpy())
    result["beats_random"] = result["p_holm"] < ALPHA
    return result


def pairwise(table: pd.DataFrame, better: dict[str, str]) -> pd.DataFrame:
    """Every pair of methods per (model, data, field): P(first better on an image) and Wilcoxon."""
    out = []
    for (model, data, field), group in _oriented(table, better).groupby([*KEYS, "field"]):
        wide = _wide(group)
        methods = sorted(wide.columns)
        for i, a in enumerate(methods):
            for b in methods[i + 1 :]:
                d = (wide[a] - wide[b]).to_numpy()
                cles = float(np.mean(d > 0) + 0.5 * np.mean(d == 0)) if len(d) else np.nan
                p = float(stats.wilcoxon(d).pvalue) if len(d) >= 2 and np.any(d) else np.nan
                out.append({"model": model, "data": data, "field": field, "method": a, "other": b,
                            "p_better": cles, "p": p})  # fmt: skip
    result = pd.DataFrame(out)
    if not result.empty:
        result["p_holm"] = holm(result["p"].to_numpy())
    return result


def ranks(table: pd.DataFrame, better: dict[str, str], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Each method's rank (1 = best by mean) per (model, data, field), under a bootstrap over images."""
    rng = np.random.default_rng(seed)
    out = []
    for (model, data, field), group in _oriented(table, better).groupby([*KEYS, "field"]):
        wide = _wide(group)
        if wide.empty:
            continue
        values = wide.to_numpy()
        idx = rng.integers(0, len(values), (n_boot, len(values)))
        means = values[idx].mean(axis=1)  # [n_boot, methods]
        rank = stats.rankdata(-means, axis=1, method="min")
        point = stats.rankdata(-values.mean(axis=0), method="min")
        for j, method in enumerate(wide.columns):
            out.append({"model": model, "data": data, "field": field, "method": method,
                        "rank": int(point[j]), "p_best": float(np.mean(rank[:, j] == 1)),
                        "rank_low": int(np.quantile(rank[:, j], 0.025, method="lower")),
                        "rank_high": int(np.quantile(rank[:, j], 0.975, method="higher"))})  # fmt: skip
    return pd.DataFrame(out)


def agreement(table: pd.DataFrame, better: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Krippendorff's alpha (ordinal) within each metric; Kendall's tau between metrics."""
    import krippendorff

    within, between = [], []
    oriented = _oriented(table, better)
    for (model, data), per_group in oriented.groupby(KEYS):
        means = {}
        for field, group in per_group.groupby("field"):
            wide = _wide(group)
            means[field] = wide.mean()
            alpha = np.nan
            if wide.shape[1] >= 2 and len(wide) >= 2:
                ranked = stats.rankdata(-wide.to_numpy(), axis=1)  # each image ranks the methods
                if len(np.unique(ranked)) > 1:
                    alpha = float(krippendorff.alpha(reliability_data=ranked, level_of_measurement="ordinal"))
            within.append({"model": model, "data": data, "field": field, "methods": wide.shape[1],
                           "images": len(wide), "krippendorff_alpha": alpha})  # fmt: skip
        fields = sorted(means)
        for i, a in enumerate(fields):
            for b in fields[i + 1 :]:
                common = means[a].index.intersection(means[b].index)
                tau = (
                    stats.kendalltau(means[a][common], means[b][common]).statistic
                    if len(common) > 1
                    else np.nan
                )
                between.append(
                    {"model": model, "data": data, "field": a, "other": b, "kendall_tau": float(tau)}
                )
    return pd.DataFrame(within), pd.DataFrame(between)


@dataclass
class Verdict:
    """What `verdict` finds: `table` (`verdict.csv`: one row per model, data, method and metric value,
    the test against random and the rank interval), `pairwise` (`pairwise.csv`), the agreement
    `within` each metric and `between` metrics, and `markdown`, the section of `summary.md`.
    """

    table: pd.DataFrame
    pairwise: pd.DataFrame
    within: pd.DataFrame
    between: pd.DataFrame
    markdown: str
    better: dict[str, str]


def verdict(rows: pd.DataFrame, seed: int = 0) -> Verdict:
    """The statistics of a sweep's rows, per (model, data); see the module's description."""
    better = {
        c[: -len("_better")]: str(rows[c].dropna().iloc[0]) for c in rows.columns if c.endswith("_better")
    }
    table = per_image(rows)
    if table.empty or table["method"].nunique() < 2:
        why = "no per-image metric values" if table.empty else "fewer than two methods"
        empty = pd.DataFrame(columns=[*KEYS, "method", "field"])
        text = f"## Verdict\n\nNot applicable: the sweep has {why}.\n"
        return Verdict(empty, empty, pd.DataFrame(), pd.DataFrame(), text, better)
    tests, rank = versus_random(table, better, seed), ranks(table, better, seed=seed)
    within, between = agreement(table, better)
    merged = rank.merge(tests, on=[*KEYS, "method", "field"], how="left") if not tests.empty else rank
    text = _markdown(merged, within, between, better)
    return Verdict(merged, pairwise(table, better), within, between, text, better)


def summary(group: pd.DataFrame, better: dict[str, str]) -> pd.DataFrame:
    """One (model, data)'s verdict as a table of methods by metric values: the rank interval (95%;
    1 = best) with a mark where the method beats `random`, and on how many values it does.
    """
    fields = [f for f in better if f in set(group["field"])]
    has_random = "beats_random" in group and (group["method"] == "random").any()
    wide = []
    for method, per in group.groupby("method"):
        line = {"method": method}
        if has_random:
            wins = per["beats_random"].fillna(False).astype(bool)
            line["beats random on"] = "-" if method == "random" else f"{int(wins.sum())} of {len(fields)}"
        for f in fields:
            r = per[per["field"] == f]
            if r.empty:
                continue
            r = r.iloc[0]
            mark = " ✓" if has_random and bool(r.get("beats_random") is True) else ""
            span = (
                f"{r['rank_low']}" if r["rank_low"] == r["rank_high"] else f"{r['rank_low']}-{r['rank_high']}"
            )
            line[f"{f} {'↑' if better[f] == 'higher' else '↓'}"] = span + mark
        wide.append(line)
    return pd.DataFrame(wide)


def against_random(group: pd.DataFrame, better: dict[str, str]) -> pd.DataFrame:
    """One (model, data)'s tests against `random` as a table of methods by metric values: the median
    paired gain over random (oriented: positive is better), the one-sided p and Holm's p.
    """
    if "p_holm" not in group or not (group["method"] == "random").any():
        return pd.DataFrame()
    fields = [f for f in better if f in set(group["field"])]
    wide = []
    for method, per in group[group["method"] != "random"].groupby("method"):
        line = {"method": method}
        for f in fields:
            r = per[per["field"] == f]
            if r.empty or pd.isna(r.iloc[0].get("p")):
                continue
            r = r.iloc[0]
            gain = "" if pd.isna(r.get("median_gain")) else f"{r['median_gain']:+.3f}, "
            line[f] = f"{gain}p {r['p']:.3f}, Holm {r['p_holm']:.2f}" + (" ✓" if r["beats_random"] else "")
        wide.append(line)
    return pd.DataFrame(wide)


def _markdown(
    merged: pd.DataFrame, within: pd.DataFrame, between: pd.DataFrame, better: dict[str, str]
) -> str:
    parts = ["## Verdict", ""]
    for (model, data), group in merged.groupby(KEYS):
        fields = [f for f in better if f in set(group["field"])]
        has_random = "beats_random" in group and (group["method"] == "random").any()
        parts.append(
            f"### {model} / {data}: {group['method'].nunique()} methods, {len(fields)} metric values"
        )
        parts.append("")
        if not has_random:
            parts.append("Tests against random: not applicable (the sweep has no `random` method).")
        else:
            parts.append(
                f"Each cell: the method's rank interval (95%, bootstrap over images; 1 = best) and a mark "
                f"where it beats `random` (one-sided Wilcoxon signed-rank, p < {ALPHA} after Holm's "
                "correction over the sweep's tests)."
            )
        parts.append("")
        parts += [summary(group, better).to_markdown(index=False), ""]
        tests = against_random(group, better)
        if not tests.empty:
            parts += ["Against random: the median paired gain (positive: better), the one-sided p and "
                      "Holm's p.", "", tests.fillna("").to_markdown(index=False), ""]  # fmt: skip
        w = within[(within["model"] == model) & (within["data"] == data)] if not within.empty else within
        if not w.empty:
            alphas = ", ".join(f"{r.field} {r.krippendorff_alpha:.2f}" for r in w.itertuples())
            parts += [
                "Agreement of the per-image rankings within each metric (Krippendorff's alpha, "
                f"ordinal): {alphas}.",
                "",
            ]
        b = between[(between["model"] == model) & (between["data"] == data)] if not between.empty else between
        if not b.empty:
            taus = b.pivot(index="field", columns="other", values="kendall_tau").round(2)
            parts += ["Agreement between metrics (Kendall's tau of their rankings of the methods):", "",
                      taus.fillna("").to_markdown(), ""]  # fmt: skip
    return "\n".join(parts) + "\n"
