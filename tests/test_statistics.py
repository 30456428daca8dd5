"""The verdict's statistics on scores built in the test, whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.report.statistics import agreement, holm, pairwise, ranks, verdict, versus_random


def long_table(values: dict[str, np.ndarray], field: str = "insertion_auc") -> pd.DataFrame:
    """The long per-image table of one (model, data) and one field: method -> values per image."""
    rows = [
        {"model": "m", "data": "d", "method": k, "field": field, "image_id": f"i{j}", "value": float(v)}
        for k, vs in values.items()
        for j, v in enumerate(vs)
    ]
    return pd.DataFrame(rows)


RNG = np.random.default_rng(0)
BASE = RNG.uniform(0.2, 0.4, 12)


def test_holm_equals_a_hand_computation():
    p = [0.01, 0.04, 0.03, 0.005, np.nan]
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    expected = [0.03, 0.06, 0.06, 0.02, np.nan]
    np.testing.assert_allclose(holm(p), expected, equal_nan=True)
    assert holm([0.5, 0.6]).tolist() == [1.0, 1.0]  # capped at 1


@pytest.mark.parametrize("better", ["higher", "lower"])
def test_a_method_better_on_every_image_is_significant_and_an_equal_one_is_not(better):
    sign = 1 if better == "higher" else -1
    values = {"random": BASE, "good": BASE + sign * RNG.uniform(0.05, 0.1, 12), "same": BASE.copy()}
    result = versus_random(long_table(values), {"insertion_auc": better}).set_index("method")
    assert bool(result.loc["good", "beats_random"]) and result.loc["good", "median_gain"] > 0.04
    assert result.loc["good", "gain_low"] > 0
    assert not bool(result.loc["same", "beats_random"]) and result.loc["same", "p"] == 1.0
    # The exact one-sided Wilcoxon p of 12 positive differences, times Holm's 2 tests.
    assert result.loc["good", "p"] == pytest.approx(0.5**12)
    assert result.loc["good", "p_holm"] == pytest.approx(2 * 0.5**12)


def test_a_worse_method_does_not_beat_random():
    values = {"random": BASE, "bad": BASE - 0.1}
    result = versus_random(long_table(values), {"insertion_auc": "higher"}).set_index("method")
    assert not bool(result.loc["bad", "beats_random"]) and result.loc["bad", "median_gain"] < 0


def test_wide_margins_give_the_known_ranking_with_probability_one():
    values = {"a": BASE + 2.0, "b": BASE + 1.0, "c": BASE, "random": BASE - 1.0}
    result = ranks(long_table(values), {"insertion_auc": "higher"}, n_boot=200).set_index("method")
    assert result["rank"].to_dict() == {"a": 1, "b": 2, "c": 3, "random": 4}
    assert result.loc["a", "p_best"] == 1.0 and result["p_best"].drop("a").eq(0).all()
    assert (result["rank_low"] == result["rank"]).all() and (result["rank_high"] == result["rank"]).all()
    flipped = ranks(long_table(values, "deletion_auc"), {"deletion_auc": "lower"}, n_boot=50)
    assert flipped.set_index("method")["rank"].to_dict() == {"a": 4, "b": 3, "c": 2, "random": 1}


def test_pairwise_effect_size_and_test():
    values = {"a": BASE + 0.1, "b": BASE}
    values["a"][0] = BASE[0] - 0.1  # b better on one image of 12
    result = pairwise(long_table(values), {"insertion_auc": "higher"}).iloc[0]
    assert (result["method"], result["other"]) == ("a", "b")
    assert result["p_better"] == pytest.approx(11 / 12)
    assert result["p"] == pytest.approx(stats.wilcoxon(values["a"] - values["b"]).pvalue)


def test_krippendorffs_alpha_is_one_for_identical_rankings_and_tau_between_metrics():
    values = {"a": BASE + 2.0, "b": BASE + 1.0, "c": BASE}
    table = pd.concat([long_table(values, "insertion_auc"), long_table(values, "deletion_auc")])
    within, between = agreement(table, {"insertion_auc": "higher", "deletion_auc": "lower"})
    assert within["krippendorff_alpha"].tolist() == [1.0, 1.0]
    assert between["kendall_tau"].tolist() == [-1.0]  # deletion (lower is better) ranks them reversed


def _rows(tmp_path, methods: list[str]) -> pd.DataFrame:
    """Job rows whose folders hold a scores.csv each, as a sweep writes them."""
    rows = []
    for k, method in enumerate(methods):
        folder = tmp_path / method
        folder.mkdir(parents=True)
        pd.DataFrame({"image_id": [f"i{j}" for j in range(12)], "insertion_auc": BASE + k}).to_csv(
            folder / "scores.csv", index=False
        )
        rows.append(
            {
                "model": "m",
                "data": "d",
                "method": method,
                "job_dir": str(folder),
                "insertion_auc_better": "higher",
            }
        )
    return pd.DataFrame(rows)


def test_one_method_or_no_random_is_reported_as_not_applicable(tmp_path):
    one = verdict(_rows(tmp_path / "one", ["saliency"]))
    table, text = one.table, one.markdown
    assert table.empty and "Not applicable: the sweep has fewer than two methods" in text
    two = verdict(_rows(tmp_path / "two", ["saliency", "grad_cam"]))
    table, text = two.table, two.markdown
    assert "Tests against random: not applicable" in text
    assert table.set_index("method")["rank"].to_dict() == {"grad_cam": 1, "saliency": 2}
    assert "not applicable: the sweep has no random baseline" in set(table["note"])


def test_the_verdict_counts_the_metrics_a_method_beats_random_on(tmp_path):
    found = verdict(_rows(tmp_path, ["random", "saliency"]))
    table, text, pairs = found.table, found.markdown, found.pairwise
    assert pairs[["method", "other", "p_better"]].values.tolist() == [["random", "saliency", 0.0]]
    row = table[table["method"] == "saliency"].iloc[0]
    assert bool(row["beats_random"]) and row["rank"] == 1
    assert "| saliency | 1 of 1" in text.replace("  ", " ").replace("  ", " ")
