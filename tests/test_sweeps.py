"""Sweeps at scale, end to end: Hydra's launchers, resume after a kill, corrupt job folders, and
re-scoring saved maps. Every sweep is the same 2x2x2 (the small CNN and a torchvision ResNet-18, both
with random weights drawn from the job's seed; saliency and RISE; seeds 0 and 1), compared with one
run of it by the basic launcher.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from harness.results import RESULT_FILES, read_job
from tests.conftest import CONF, REPO, run_cli

SWEEP = [
    "model=small_cnn,resnet18", "model.input_size=32", "method=saliency,rise", "seed=0,1", "device=cpu",
    "data.num_images=3", "timing.profile=false", "timing.max_repeats=1",
]  # fmt: skip
JOBS = 8
SEED0 = ["seed=0" if a == "seed=0,1" else a for a in SWEEP]  # half the sweep, where the whole is not needed
# A quarter (the small CNN's two jobs of seed 0), where a launcher only has to give the same rows.
SMALL0 = ["model=small_cnn" if a == "model=small_cnn,resnet18" else a for a in SEED0]
AUCS = ["deletion_auc", "insertion_auc", "road_morf_auc", "road_lerf_auc", "sparseness"]
pytestmark = pytest.mark.slow


def harness(*args: str, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    if not python:
        return run_cli("harness", "-m", *args)
    return subprocess.run(
        [sys.executable, *python, "-m", "harness", "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def by_job(folder: Path) -> pd.DataFrame:
    rows = pd.read_csv(folder / "summary.csv")
    return rows.set_index(["model", "method", "seed"]).sort_index()


def snapshot(job: Path) -> dict[str, tuple[int, bytes]]:
    """Each result file's modification time and bytes."""
    return {n: ((job / n).stat().st_mtime_ns, (job / n).read_bytes()) for n in RESULT_FILES}


@pytest.fixture(scope="module")
def basic(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("basic") / "sweep"
    r = harness(*SWEEP, f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    rows = by_job(sweep)
    assert len(rows) == JOBS and (rows["model_seed"] == rows.index.get_level_values("seed")).all()
    assert rows.loc["resnet18", "deletion_auc"].nunique() == 4  # random weights differ with the seed
    return sweep


def assert_same_aucs(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.index) == list(b.index)
    for col in AUCS:
        assert (a[col] - b[col]).abs().max() <= 1e-6, col


@pytest.mark.parametrize(
    "launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], ["hydra/launcher=submitit_local"]]
)
def test_launchers_give_the_rows_of_the_basic_launcher(basic, tmp_path, launcher):
    """The small CNN's jobs of seed 0 (2 jobs, two processes at once): submitit's local executor starts
    every job's process at once, and 8 of them, each with torch's threads, took 3 minutes of this
    2-core machine.
    """
    sweep = tmp_path / "sweep"
    r = harness(*SMALL0, *launcher, f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    rows = by_job(sweep)  # written by the report callback at the end of the sweep
    assert len(rows) == JOBS // 4 and (sweep / "summary.md").is_file() and (sweep / "curves.png").is_file()
    expected = by_job(basic)
    seed, model = (expected.index.get_level_values(k) for k in ("seed", "model"))
    assert_same_aucs(rows, expected[(seed == 0) & (model == "small_cnn")])


@pytest.mark.parametrize("method", ["smoothgrad", "rise"])
def test_a_job_run_twice_in_separate_processes_gives_identical_aucs(tmp_path, method):
    """A torchvision model with random weights and a stochastic method: all drawn from the job's seed."""
    job = [
        "model=resnet18",
        "model.input_size=32",
        f"method={method}",
        "seed=3",
        "device=cpu",
        "data.num_images=2",
        "timing.max_repeats=1",
        "timing.profile=false",
    ]
    rows = []
    for run in ("a", "b"):
        r = subprocess.run(
            [sys.executable, "-m", "harness", "hydra.mode=RUN", *job, f"hydra.run.dir={tmp_path / run}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr
        rows.append(json.loads((tmp_path / run / "run.json").read_text()))
    a, b = rows
    assert a["model_seed"] == 3 and not a["pretrained"]
    assert (a["deletion_auc"], a["insertion_auc"]) == (b["deletion_auc"], b["insertion_auc"])
    scores = [pd.read_csv(tmp_path / run / "scores.csv") for run in ("a", "b")]
    pd.testing.assert_frame_equal(scores[0], scores[1], check_exact=True)


def test_a_sweep_killed_after_its_first_job_resumes_without_redoing_it(basic, tmp_path):
    sweep = tmp_path / "sweep"
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "-m", *SWEEP, f"hydra.sweep.dir={sweep}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not list(sweep.glob("*/run.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = [p.parent for p in sweep.glob("*/run.json")]
    assert done, "no job finished before the deadline"
    first = done[0]
    assert read_job(first).complete
    before = snapshot(first)
    assert not (sweep / "summary.csv").exists()

    r = harness(*SWEEP, "resume=true", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    assert f"{first.name}: complete results of the same config, skipped" in r.stderr
    first_line = next(line for line in r.stderr.splitlines() if "[harness]" in line or "[HYDRA]" in line)
    assert (
        f"sweep of {JOBS} job(s) into {sweep}: {JOBS - len(done)} to run, {len(done)} skipped" in first_line
    )
    assert snapshot(first) == before  # not recomputed: the same bytes, the same modification times
    rows = by_job(sweep)
    assert len(rows) == JOBS
    assert_same_aucs(rows, by_job(basic))


@pytest.mark.parametrize("sweeper", ["basic_resume", "basic"])
def test_resuming_a_finished_sweep_skips_every_job_and_keeps_the_report(basic, tmp_path, sweeper):
    sweep = tmp_path / "sweep"
    shutil.copytree(basic, sweep)  # keeps modification times
    jobs = sorted(p.parent for p in sweep.glob("*/run.json"))
    before = {job: snapshot(job) for job in jobs}
    report = (sweep / "summary.csv").stat().st_mtime_ns

    args = (*SWEEP, "resume=true", f"hydra/sweeper={sweeper}", f"hydra.sweep.dir={sweep}")
    r = harness(*args, python=("-X", "importtime"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("skipped (resume=true)") == JOBS
    if sweeper == "basic_resume":  # the harness's sweeper launches none of them
        assert f"sweep of {JOBS} job(s) into {sweep}: 0 to run, {JOBS} skipped" in r.stderr
        assert "Launching" not in r.stderr
    else:  # any other sweeper launches them all, and each job skips itself
        assert f"Launching {JOBS} jobs locally" in r.stderr
    assert "is up to date" in r.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "import time:" in line}
    assert "hydra" in imported and not {"torch", "pandas", "matplotlib"} & imported  # no model work
    assert {job: snapshot(job) for job in jobs} == before
    assert (sweep / "summary.csv").stat().st_mtime_ns == report


def test_a_truncated_run_json_is_reported_set_aside_and_run_again(basic, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(basic, sweep)
    broken = sorted(p.parent for p in sweep.glob("*/run.json"))[0]
    text = (broken / "run.json").read_text()
    (broken / "run.json").write_text(text[: len(text) // 2])

    listed = run_cli("harness.report", str(sweep), "--out", str(tmp_path / "report"))
    assert listed.returncode == 0, listed.stderr
    assert f"left out {broken}: run.json cannot be read" in listed.stderr
    assert len(pd.read_csv(tmp_path / "report" / "summary.csv")) == JOBS - 1  # never merged

    r = harness(*SWEEP, "resume=true", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    assert f"{broken.name}: run.json cannot be read" in r.stderr and "truncated or corrupt" in r.stderr
    assert r.stderr.count("skipped (resume=true)") == JOBS - 1
    assert read_job(broken).complete
    (aside,) = broken.glob("stale-*")
    assert (aside / "run.json").read_text() == text[: len(text) // 2]  # kept, not lost
    assert "truncated or corrupt" in (aside / "reason.txt").read_text()
    assert_same_aucs(by_job(sweep), by_job(basic))


def test_rescoring_saved_maps_gives_the_aucs_of_the_sweep_without_running_the_methods(basic, tmp_path):
    sweep = tmp_path / "evaluate"
    r = harness(*SWEEP, "phase=evaluate", f"maps_from={basic}", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    rows, original = by_job(sweep), by_job(basic)
    assert_same_aucs(rows, original)
    assert (rows["phase"] == "evaluate").all() and rows["maps_from"].str.startswith(str(basic)).all()
    # The method did not run: its timings are the earlier job's, and no method kernels were profiled.
    assert (rows["method_ms_per_image"] == original["method_ms_per_image"]).all()
    for job in sweep.glob("*/kernels.csv"):
        assert "method" not in set(pd.read_csv(job)["phase"])
    merged = tmp_path / "merged"
    r = run_cli("harness.report", str(basic), str(sweep), "--out", str(merged))
    assert r.returncode == 0, r.stderr
    both = pd.read_csv(merged / "summary.csv")
    assert len(both) == 2 * JOBS and sorted(both["phase"].unique()) == ["all", "evaluate"]
    # One verdict over the merged sweeps: each method's jobs of both sweeps, averaged per image.
    verdict = pd.read_csv(merged / "verdict.csv")
    assert (
        set(verdict["method"]) == set(both["method"]) and "## Verdict" in (merged / "summary.md").read_text()
    )
    assert (merged / "pairwise.csv").is_file()
    page = (merged / "report.html").read_text()
    table = page.split('id="summary-table">', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + 2 * JOBS  # one page over both sweeps: heading and every job

    # New metric settings: the same AUCs as a sweep that computes the maps again with them.
    changed = ["metric=[deletion]", "metric.deletion.steps=7", "metric.deletion.substrate=mean"]
    again = tmp_path / "again"
    r = harness(*SEED0, *changed, "phase=evaluate", f"maps_from={basic}", f"hydra.sweep.dir={again}")
    assert r.returncode == 0, r.stderr
    fresh = tmp_path / "fresh"
    r = harness(*SEED0, *changed, f"hydra.sweep.dir={fresh}")
    assert r.returncode == 0, r.stderr
    a, b = by_job(again), by_job(fresh)
    assert len(a) == JOBS // 2 and (a["deletion.steps"] == 7).all()
    assert (a["deletion_auc"] - b["deletion_auc"]).abs().max() <= 1e-6


def test_a_failed_job_leaves_the_others_running_and_the_sweep_exits_nonzero(tmp_path):
    r = harness(
        "model=small_cnn", "method=occlusion", "method.window=8", "method.stride=5,8", "device=cpu",
        "data.num_images=1", "metric=[deletion]", f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    bad = "data.num_images=1,device=cpu,method.stride=5,method.window=8,method=occlusion"
    assert f"failed: {bad}" in r.stderr and "window=8, stride=5 do not tile" in r.stderr
    assert "1 job(s) failed; after fixing, run the same command with resume=true" in r.stderr
    rows = pd.read_csv(tmp_path / "summary.csv")  # the report of the jobs that ended well
    assert list(rows["method.stride"]) == [8]
    (failed,) = [p.parent for p in tmp_path.glob("*/error.txt")]
    assert not read_job(failed).complete and not read_job(failed).problem  # no result files at all


def test_evaluate_without_matching_maps_says_what_the_folder_holds(basic, tmp_path):
    r = harness(
        "model=small_cnn", "method=occlusion", "device=cpu", "data.num_images=3", "phase=evaluate",
        f"maps_from={basic}", f"hydra.sweep.dir={tmp_path / 'x'}",
    )  # fmt: skip
    assert r.returncode != 0
    assert "holds no maps of small_cnn/photos/occlusion seed 0" in r.stderr
    assert "small_cnn/photos/rise seed 1" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "x").glob("*/run.json"))


def readme_commands(section: str) -> list[list[str]]:
    """The `python -m harness` commands in a section of the README, as argument lists."""
    text = (REPO / "README.md").read_text().split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    return [shlex.split(line)[3:] for line in text.splitlines() if line.startswith("python -m harness")]


def sweep_values(overrides: list[str]) -> list[list[str]]:
    """One job's overrides per value of each swept key (`k=a,b`), the others at their first value."""
    plain = [o for o in overrides if o not in ("-m", "--multirun")]
    swept = [i for i, o in enumerate(plain) if "," in o and "[" not in o]
    first = [o.split(",")[0] if i in swept else o for i, o in enumerate(plain)]
    jobs = [first]
    for i in swept:
        key, values = plain[i].split("=", 1)
        jobs += [first[:i] + [f"{key}={v}"] + first[i + 1 :] for v in values.split(",")[1:]]
    return jobs


def test_the_readme_slurm_example_composes():
    import harness.sweep  # noqa: F401  (registers the resolvers that the configs use)

    commands = readme_commands("On a Slurm cluster")
    assert len(commands) == 2
    for overrides in commands:
        for job in sweep_values(overrides):
            with initialize_config_dir(str(CONF), version_base="1.3"):
                cfg = compose("config", job, return_hydra_config=True)
            launcher = cfg.hydra.launcher
            assert launcher._target_.endswith("SlurmLauncher")
            assert (launcher.partition, launcher.gpus_per_node) == ("gpu", 1)
            assert launcher.timeout_min in (60, 720) and cfg.device.name == "cuda"
            instantiate(cfg.model, _partial_=True)
            instantiate(cfg.method)
            json.dumps(OmegaConf.to_container(launcher, resolve=True))  # what submitit passes to sbatch


def test_the_gpus_preset_has_a_worker_per_visible_gpu():
    import torch

    import harness.sweep  # noqa: F401  (registers gpu_count)

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=gpus"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == max(1, torch.cuda.device_count())
