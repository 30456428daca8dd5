"""Calibration: measured once per sweep, reused by its other jobs, whatever the machine does meanwhile."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from hydra import compose, initialize_config_dir

import harness.runtime.model_speed
from harness.config import DeviceSettings
from harness.job import run_job
from harness.runtime import CALIBRATION_DIR, ModelSpeed, calibrate, calibration_facts
from tests.conftest import CONF


def job_config(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        base = ["model=small_cnn", "device=cpu", "data.num_images=2", "metric=[deletion]"]
        return compose("config", [*base, *overrides])


def calibration_file(folder):
    (path,) = (folder / CALIBRATION_DIR).glob("*.json")
    return json.loads(path.read_text())


def test_the_first_job_measures_and_the_others_reuse(tmp_path):
    first = run_job(job_config(), tmp_path / "a", calibration_dir=tmp_path)
    second = run_job(job_config("method=grad_cam", "seed=3"), tmp_path / "b", calibration_dir=tmp_path)
    assert (first["calibration"], second["calibration"]) == ("measured", "reused")
    assert first["calibration_key"] == second["calibration_key"]  # the model's seed changes no speed
    saved = calibration_file(tmp_path)
    assert set(saved["kinds"]) == {"forward", "forward_backward"}
    assert second["forward_ms_by_batch"] == saved["kinds"]["forward"]["per_batch_ms"]
    for row in (first, second):
        assert (row["batch_size"], row["grad_batch_size"]) == (first["batch_size"], first["grad_batch_size"])
    assert second["overhead_calibration_s"] < first["overhead_calibration_s"]


def test_a_job_on_a_noisy_machine_still_gets_the_chunk_sizes_of_the_sweeps_measurement(tmp_path, monkeypatch):
    """The sweep's first job measured the chunk sizes; then the machine turns noisy (every model pass
    of the next job's first 40 takes 50 ms longer). The next job reads the sweep's figures instead of
    choosing from its own noisy loops.
    """
    first = run_job(job_config(), tmp_path / "a", calibration_dir=tmp_path)
    passes = {"n": 0}

    def noisy(step):
        def slow(model, x):
            passes["n"] += 1
            if passes["n"] <= 40:
                time.sleep(0.05)
            return step(model, x)

        return slow

    speed = harness.runtime.model_speed
    monkeypatch.setattr(speed, "forward_step", noisy(speed.forward_step))
    monkeypatch.setattr(speed, "forward_backward_step", noisy(speed.forward_backward_step))
    second = run_job(job_config("seed=1"), tmp_path / "b", calibration_dir=tmp_path)
    assert second["calibration"] == "reused"
    assert (second["batch_size"], second["grad_batch_size"]) == (
        first["batch_size"],
        first["grad_batch_size"],
    )
    assert (
        second["deletion_chunk_size"] == first["batch_size"]
        and second["method_chunk_size"] == first["grad_batch_size"]
    )


def test_a_forward_only_job_then_a_gradient_job_each_measure_only_their_kind(tmp_path):
    occlusion = run_job(
        job_config("method=occlusion", "method.window=16"), tmp_path / "o", calibration_dir=tmp_path
    )
    assert set(calibration_file(tmp_path)["kinds"]) == {"forward"}
    saliency = run_job(job_config(), tmp_path / "s", calibration_dir=tmp_path)
    assert set(calibration_file(tmp_path)["kinds"]) == {"forward", "forward_backward"}
    again = run_job(job_config("seed=2"), tmp_path / "s2", calibration_dir=tmp_path)
    assert [r["calibration"] for r in (occlusion, saliency, again)] == ["measured", "measured", "reused"]
    assert occlusion["forward_ms_by_batch"] == saliency["forward_ms_by_batch"]  # the forward part was kept


def test_what_changes_speed_changes_the_key_and_nothing_else_does():
    cpu = torch.device("cpu")

    def key(*overrides: str) -> dict:
        cfg = job_config(*overrides)
        return calibration_facts(cfg.model, cpu, DeviceSettings.from_config(cfg.device))

    base = key()
    assert key("seed=5") == base and key("method=rise", "metric=[deletion]") == base
    for change in ("device.memory_budget=0.25", "device.channels_last=false", "device.batch_sizes=[1,2]",
                   "device.grad_batch_size=2", "model.width=8", "model.input_size=16"):  # fmt: skip
        assert key(change) != base, change
    torch.set_num_threads(max(1, torch.get_num_threads() - 1) if torch.get_num_threads() > 1 else 2)
    try:
        assert key() != base  # a joblib worker with fewer threads runs at another speed
    finally:
        torch.set_num_threads(base["torch_threads"])


def small_speed(loop_s: float = 0.0) -> tuple[ModelSpeed, torch.nn.Module, list[int]]:
    from harness.models import small_cnn

    module = small_cnn(width=4).module
    speed = ModelSpeed(module, torch.randn(2, 3, 32, 32), torch.device("cpu"), min_images=2)
    loops: list[int] = []

    def loop_ms(kind, bs):
        loops.append(bs)
        time.sleep(loop_s)
        return 1.0 / bs

    speed.loop_ms = loop_ms  # type: ignore[method-assign]
    return speed, module, loops


FACTS = {"memory_budget": 0.5, "batch_sizes": [1, 2, 4], "batch_size": None, "grad_batch_size": None}


def test_a_corrupt_file_is_measured_again_and_replaced(tmp_path, caplog):
    speed, module, loops = small_speed()
    calibrate(speed, module, FACTS, ["forward"], 2**30, tmp_path)
    (path,) = (tmp_path / CALIBRATION_DIR).glob("*.json")
    path.write_text(path.read_text()[:20])
    speed, module, loops = small_speed()
    found = calibrate(speed, module, FACTS, ["forward"], 2**30, tmp_path)
    assert found.source == "measured" and loops and "cannot be read" in caplog.text
    assert json.loads(path.read_text())["kinds"]["forward"]["per_batch_ms"] == {"1": 1.0, "2": 0.5, "4": 0.25}


def test_jobs_started_side_by_side_wait_for_one_measurement(tmp_path):
    """Four jobs start at once (as joblib or a Slurm array starts them): one measures, under the
    file's lock, and the three others read what it wrote.
    """
    results, loops = [], []

    def job() -> None:
        speed, module, mine = small_speed(loop_s=0.02)
        results.append(calibrate(speed, module, FACTS, ["forward"], 2**30, tmp_path).source)
        loops.append(len(mine))

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == ["measured", "reused", "reused", "reused"]
    assert sorted(loops) == [0, 0, 0, 9]  # 3 rounds over 3 sizes, in one job only


@pytest.mark.parametrize(
    "fixed", [("device.batch_size=2",), ("device.batch_size=2", "device.grad_batch_size=3")]
)
def test_chunk_sizes_fixed_by_the_user_skip_the_choice(tmp_path, fixed):
    row = run_job(job_config(*fixed), tmp_path / "job", calibration_dir=tmp_path)
    assert row["batch_size"] == 2 and list(row["forward_ms_by_batch"]) == ["2"]
    if len(fixed) == 2:
        assert row["grad_batch_size"] == 3 and list(row["forward_backward_ms_by_batch"]) == ["3"]
