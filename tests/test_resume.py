"""Job folders (complete, partial, corrupt), config hashes, folder names, GPU claims, progress, and
determinism of the stochastic methods across whole jobs.
"""

from __future__ import annotations

import json
import threading
import time

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.config import config_hash
from harness.job import run_job
from harness.results import read_job, set_aside, write_job
from harness.runtime import Progress, claimed_gpu
from harness.sweep import job_dir, report_is_current
from tests.conftest import CONF


def write(folder, **row):
    tables = {"curves.csv": pd.DataFrame({"a": [1, 2]}), "scores.csv": pd.DataFrame({"b": [3]})}
    write_job(folder, {"config_hash": "abc", **row}, tables, {"maps": torch.zeros(2, 1, 4, 4).numpy()})


def test_a_written_job_is_complete_and_of_its_config(tmp_path):
    write(tmp_path, method="x")
    state = read_job(tmp_path, "abc")
    assert state.complete and state.problem is None and state.row["method"] == "x"
    assert set(state.row["files"]) == {"curves.csv", "scores.csv", "attributions.npz"}
    other = read_job(tmp_path, "def")
    assert not other.complete and "another config (hash abc, this job def)" in other.problem
    assert read_job(tmp_path / "nothing") == read_job(tmp_path / "nothing")
    assert read_job(tmp_path / "nothing").problem is None  # no results at all: nothing to report


@pytest.mark.parametrize(
    "damage,problem",
    [
        (lambda f: (f / "run.json").unlink(), "has curves.csv, scores.csv, attributions.npz but no run.json"),
        (lambda f: (f / "run.json").write_text('{"method": "x", "fil'), "run.json cannot be read"),
        (lambda f: (f / "run.json").write_text('{"method": "x"}'), "run.json lists no result files"),
        (lambda f: (f / "scores.csv").write_text("b\n"), "scores.csv is 2 bytes, run.json says"),
        (lambda f: (f / "curves.csv").unlink(), "curves.csv is missing"),
    ],
)
def test_partial_and_corrupt_folders_are_named_with_their_problem(tmp_path, damage, problem):
    write(tmp_path)
    damage(tmp_path)
    state = read_job(tmp_path, "abc")
    assert not state.complete and problem in state.problem


def test_set_aside_moves_every_result_and_says_why(tmp_path):
    write(tmp_path)
    (tmp_path / ".scores.csv.x1.tmp").write_text("half")  # a write cut short
    (tmp_path / "harness.log").write_text("log")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "harness.log"}
    aside = set_aside(tmp_path, "because")
    assert {p.name: p.read_bytes() for p in aside.iterdir() if p.name != "reason.txt"} == before
    assert (aside / "reason.txt").read_text() == "because\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["harness.log"]
    assert set_aside(tmp_path, "again") is None  # nothing left to move
    write(tmp_path)
    assert set_aside(tmp_path, "twice") != aside  # a second set in a folder of its own


def test_config_hash_ignores_how_a_job_runs_but_not_what_it_computes():
    base = OmegaConf.create({"seed": 0, "resume": False, "progress": None, "metric": {"steps": 28}})
    assert config_hash(base) == config_hash(OmegaConf.merge(base, {"resume": True, "progress": True}))
    assert config_hash(base) != config_hash(OmegaConf.merge(base, {"seed": 1}))
    assert config_hash(base) != config_hash(OmegaConf.merge(base, {"metric": {"steps": 56}}))


def test_job_folder_names_are_escaped_overrides():
    assert job_dir("method=rise,seed=1") == "method=rise,seed=1"
    assert job_dir("data.root=/a/b,metric=[deletion]") == "data.root=%2Fa%2Fb,metric=[deletion]"
    assert job_dir("") == "job"
    long = job_dir("method.n_masks=" + ",".join(["1"] * 300))
    assert len(long) <= 200 and long != job_dir("method.n_masks=" + ",".join(["2"] * 300))


def test_report_is_current_until_a_job_changes(tmp_path):
    job = tmp_path / "method=a"
    write(job)
    assert not report_is_current(tmp_path)
    time.sleep(0.01)
    (tmp_path / "summary.csv").write_text("x\n")
    assert report_is_current(tmp_path)
    time.sleep(0.01)
    write(job)
    assert not report_is_current(tmp_path)


def test_gpu_claims_give_each_job_its_own_gpu_and_wait_when_all_are_held(tmp_path):
    got, order = [], []
    with claimed_gpu(2, tmp_path) as a, claimed_gpu(2, tmp_path) as b:
        got += [a, b]

        def third() -> None:
            with claimed_gpu(2, tmp_path, poll_s=0.01) as c:
                order.append(("third", c))

        t = threading.Thread(target=third)
        t.start()
        time.sleep(0.2)
        order.append(("released", None))
    t.join(timeout=5)
    assert got == [0, 1]
    assert order == [("released", None), ("third", 0)]  # waited until a GPU was free


def test_progress_counts_the_images_through_the_model(small_cnn):
    model = small_cnn.module
    x = torch.randn(6, 3, 32, 32)
    with Progress("job", enabled=True) as progress:
        with progress.call("method", model, 6):
            for i in range(0, 6, 4):
                model(x[i : i + 4])
            model(x)
        assert progress.bar.n == 12 and progress.bar.total is None
        assert progress.passes_per_image == {"method": 2.0}
        with progress.call("method", model, 3):
            model(x[:3])
        assert progress.bar.total == 6 and progress.bar.n == 3
    with Progress("quiet", enabled=False) as progress, progress.call("method", model, 6):
        assert model(x).shape[0] == 6  # no hook, no bar
    assert progress.passes_per_image == {}


@pytest.mark.parametrize("method", ["smoothgrad", "gradient_shap", "rise", "random"])
def test_two_runs_of_a_stochastic_job_give_identical_aucs(tmp_path, method):
    overrides = ["model=small_cnn", "device=cpu", "data.num_images=3", "timing.profile=false"]
    overrides += [f"method={method}", "seed=3"]
    if method == "rise":
        overrides.append("method.n_masks=200")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        rows = [run_job(compose("config", overrides), tmp_path / str(i)) for i in range(2)]
        other = run_job(compose("config", [*overrides[:-1], "seed=4"]), tmp_path / "seed4")
    for field in ("deletion_auc", "insertion_auc", "road_morf_auc", "road_lerf_auc"):
        assert rows[0][field] == rows[1][field], field
    # Each run chooses its own chunk sizes, which may regroup the noisy samples' sums: the maps then
    # move by float32 rounding, which rankings never see but the Gini index of the values does.
    assert rows[0]["sparseness"] == pytest.approx(rows[1]["sparseness"], abs=1e-6)
    scores = [pd.read_csv(tmp_path / str(i) / "scores.csv").drop(columns="sparseness") for i in range(2)]
    pd.testing.assert_frame_equal(scores[0], scores[1], check_exact=True)
    maps = [json.loads((tmp_path / str(i) / "run.json").read_text())["explain_key"] for i in range(2)]
    assert maps[0] == maps[1] != other["explain_key"]  # the seed is part of what a job computes
