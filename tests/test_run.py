"""End to end: `python -m harness` sweeps, the report, and bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

import harness.job.row as harness_rows
from harness.config import HarnessError
from harness.job import check_attributions
from tests.conftest import run_cli

RESULT_FILES = ("run.json", "curves.csv", "scores.csv", "attributions.npz", "summary.csv")


def harness(*args: str, module: str = "harness") -> subprocess.CompletedProcess:
    return run_cli(module, *args)


def result_files(folder: Path) -> list[Path]:
    return [p for name in RESULT_FILES for p in folder.rglob(name)]


@pytest.mark.slow
def test_sweep_writes_rows_tables_and_plots(tmp_path):
    sweep = tmp_path / "sweep"
    r = harness(
        "-m",
        "model=small_cnn",
        "method=saliency,occlusion",
        "seed=0,1",
        "device=cpu",
        "data.num_images=3",
        f"hydra.sweep.dir={sweep}",
    )
    assert r.returncode == 0, r.stderr
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 4 and sorted(summary["method"].unique()) == ["occlusion", "saliency"]
    # Clean output when stderr is not a terminal: the sweep's size first, a line per job start and
    # end, no progress bars, and none of the profiler's (Kineto's) lines.
    lines = r.stderr.splitlines()
    assert f"sweep of 4 job(s) into {sweep}: 4 to run" in lines[0]
    assert sum(ln.endswith("(cpu, 3 images): started") for ln in lines) == 4
    assert sum("% of it overhead" in ln for ln in lines) == 4
    assert not [ln for ln in lines if "ERROR" in ln or "USDT" in ln or "\r" in ln]
    for col in [
        "model",
        "pretrained",
        "data",
        "method",
        "device",
        "precision",
        "n_images",
        "seed",
        "deletion_auc",
        "deletion_auc_low",
        "deletion_auc_high",
        "insertion_auc",
        "insertion_auc_low",
        "insertion_auc_high",
        "insertion_auc_better",
        "road_morf_auc",
        "road_lerf_auc_low",
        "road_combined",
        "road.percentages",
        "road_forwards_per_image",
        "sparseness",
        "sparseness_better",
        "method_ms_per_image",
        "deletion_ms_per_image",
        "method_bound_ratio",
        "deletion_bound_ratio",
        "insertion_bound_ratio",
        "peak_mem_mb",
        "job_s",
        "method_s",
        "metrics_s",
        "overhead_s",
        "calibration",
        "model_seed",
        "timing.profile",
        "gpu_name",
        "torch_version",
        "torchvision_version",
        "captum_version",
        "git_commit",
        "method.window",
        "deletion.steps",
        "insertion.substrate",
    ]:
        assert col in summary.columns, col
    assert (summary["n_images"] == 3).all() and (~summary["pretrained"]).all()
    assert (summary["model_seed"] == summary["seed"]).all()  # random weights drawn from the job's seed
    # Measured by the sweep's first job, reused by the others; the breakdown adds up.
    assert sorted(summary["calibration"]) == ["measured", "reused", "reused", "reused"]
    calls = summary["method_s"] + summary["metrics_s"]
    assert ((calls + summary["overhead_s"] - summary["job_s"]).abs() < 1e-9).all()
    parts = summary.filter(regex=r"^overhead_.+_s$")
    assert list(parts.columns) == [f"overhead_{k}_s" for k in harness_rows.OVERHEAD + ("other",)]
    assert ((parts.sum(axis=1) - summary["overhead_s"]).abs() < 1e-9).all()
    assert (summary["overhead_calibration_s"][summary["calibration"] == "reused"] < 0.05).all()
    assert (summary["deletion_auc_low"] <= summary["deletion_auc"]).all()
    assert (summary["deletion_auc"] <= summary["deletion_auc_high"]).all()
    occ = summary[summary["method"] == "occlusion"].iloc[0]
    assert occ["method_forwards_per_image"] == 2  # one 32x32 window + the clean image
    assert occ["deletion_forwards_per_image"] == 29  # 28 steps + 1
    assert (summary["road_forwards_per_image"] == 18).all()  # 9 percentages, both orders
    assert (summary["deletion_auc_better"] == "lower").all() and (
        summary["road_lerf_auc_better"] == "higher"
    ).all()
    for name in [
        "summary.md",
        "curves.png",
        "road.png",
        "time_vs_insertion.png",
        "grid_small_cnn_photos.png",
        "report.html",
    ]:
        assert (sweep / name).stat().st_size > 0, name

    # per job: the row, per-image scores agree with it
    job = next(p.parent for p in sweep.glob("*/run.json"))
    row = json.loads((job / "run.json").read_text())
    scores = pd.read_csv(job / "scores.csv")
    assert abs(scores["deletion_auc"].mean() - row["deletion_auc"]) < 1e-6
    # the top-5 predictions, for the page: the first is the explained class, probabilities descending
    top = scores[[f"top{k}_prob" for k in range(1, 6)]].to_numpy()
    assert (scores["top1"] == scores["target"]).all() and (top[:, :-1] >= top[:, 1:]).all()
    assert (scores["top1_prob"] - scores["target_prob"]).abs().max() < 1e-6 and top.sum(
        axis=1
    ).max() <= 1 + 1e-6
    assert (job / ".hydra" / "config.yaml").is_file()

    # the report is rebuilt from the job folders alone
    (sweep / "summary.csv").unlink()
    rebuilt = harness(str(sweep), "--out", str(tmp_path / "again"), module="harness.report")
    assert rebuilt.returncode == 0, rebuilt.stderr
    again = pd.read_csv(tmp_path / "again" / "summary.csv")
    pd.testing.assert_frame_equal(again[summary.columns], summary, check_exact=False)


@pytest.mark.slow
def test_speed_sweep_reports_kernels_and_what_each_option_does(tmp_path):
    sweep = tmp_path / "speed"
    r = harness(
        "-m",
        "model=small_cnn",
        "method=saliency,occlusion",
        "device=cpu",
        "data.num_images=3",
        "device.precision=fp32,fp16",
        "device.channels_last=true,false",
        "metric=[deletion,insertion]",
        f"hydra.sweep.dir={sweep}",
    )
    assert r.returncode == 0, r.stderr
    rows = pd.read_csv(sweep / "summary.csv")
    assert len(rows) == 8
    for col in ["method_kernel_ms_per_image", "method_busy", "method_chunk_size", "method_oom_retries"]:
        assert rows[col].notna().all(), col
    saliency = rows[rows["method"] == "saliency"]
    assert (saliency["method_kernel_backward_ms_per_image"] > 0).all()
    assert (saliency["method_chunk_size"] == saliency["grad_batch_size"]).all()
    job = next(p.parent for p in sweep.glob("*/run.json"))
    kernels = pd.read_csv(job / "kernels.csv")
    assert set(kernels["phase"]) == {"method", "deletion", "insertion"}
    assert (kernels["ms_per_image"] > 0).all() and (kernels["share"] <= 1).all()

    text = (sweep / "timing.md").read_text()
    assert "## What each speed option does" in text
    effects = text.split("## What each speed option does")[1]
    lines = [ln for ln in effects.splitlines() if ln.startswith("| small_cnn")]
    assert len(lines) == 8  # every job against its plain (fp32, channels_last) job, itself included
    # fp32 without channels_last computes the same AUCs: a change of 0 and "safe".
    plain_layout = [ln for ln in lines if "precision=fp32, channels_last=False" in ln]
    assert len(plain_layout) == 2 and all(ln.rstrip(" |").endswith("yes") for ln in plain_layout)
    for name in ["speed_throughput.png", "speed_kernels.png", "speed_bound.png", "speed_memory.png"]:
        assert (sweep / name).stat().st_size > 0, name


@pytest.mark.slow
def test_single_run_with_image_folder(tmp_path):
    from PIL import Image

    for cls, colour in (("0", (250, 20, 20)), ("3", (20, 20, 250))):
        (tmp_path / "data" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40), colour).save(tmp_path / "data" / cls / "x.png")
    out = tmp_path / "run"
    r = harness(
        "hydra.mode=RUN",
        "model=small_cnn",
        "method=grad_cam",
        "data=image_folder",
        f"data.root={tmp_path / 'data'}",
        "metric=[deletion]",
        "device=cpu",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 0, r.stderr
    row = json.loads((out / "run.json").read_text())
    assert row["data"] == "image_folder" and row["n_images"] == 2 and "insertion_auc" not in row


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["method=sailency"],
            "unknown method 'sailency'; available: ablation_cam, attention_rollout, attn_lrp, blur_ig,",
        ),
        (["method=saliency,rise,occlusions"], "unknown method 'occlusions'"),
        (["model=resnet19"], "unknown model 'resnet19'; available: alexnet, custom, efficientnet_lite0,"),
        (
            ["metric=[deletions]"],
            "unknown metric 'deletions'; available: complexity, deletion, energy_pointing_game, infidelity,",
        ),
        (["data=imagefolder"], "unknown data 'imagefolder'; available: image_folder, photos"),
        (["data=image_folder", "data.root=/no/such/folder"], "/no/such/folder"),
        (["method=occlusion", "method.window=8", "method.stride=5"], "window=8, stride=5"),
        (["device.precision=fp8"], "device.precision='fp8'"),
        (["timing.max_repeats=0"], "timing.max_repeats=0; expected an integer >= 1"),
        (
            ["metric=[max_sensitivity]", "metric.max_sensitivity.n_samples=0"],
            "metric.max_sensitivity: n_samples=0",
        ),
        (["metric=[infidelity]", "metric.infidelity.std=-1"], "metric.infidelity: std=-1"),
        (["metric.road.percentages=[10,100]"], "metric.road: percentages=[10, 100]"),
        (["metric.road.orders=[morf,middle]"], "metric.road: orders=['morf', 'middle']"),
        (["metric.road.imputation=gain"], "metric.road: imputation='gain'; expected one of ('linear',"),
        (["metric.road.noise_std=-0.1"], "metric.road: noise_std=-0.1; expected a finite number >= 0"),
        (["+timing.repeats=3"], "timing.repeats is not a timing setting; expected one of budget_s,"),
        (["method=saliency", "metric=[pointing_game]"], "metric pointing_game needs ground truth"),
        (["method=oracle", "metric=[deletion]"], "method oracle needs ground truth, which data photos"),
        (
            [
                "method=saliency",
                "metric=[model_randomisation]",
                "metric.model_randomisation.blocks=[features.0,layer9]",
            ],
            "metric.model_randomisation: block 'layer9' is not a module of the model; "
            "its top-level modules: features,",
        ),
        (
            ["method=saliency", "metric=[model_randomisation]", "metric.model_randomisation.blocks=[]"],
            "metric.model_randomisation: blocks=[]; expected a non-empty list",
        ),
    ],
)
def test_bad_input_exits_nonzero_with_one_message_and_no_results(tmp_path, overrides, message):
    r = harness(
        "-m",
        "model=small_cnn",
        "device=cpu",
        "data.num_images=1",
        *overrides,
        f"hydra.sweep.dir={tmp_path}",
    )
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert result_files(tmp_path) == []


def _boxed_folder(tmp_path: Path, rows: list[str]) -> Path:
    from PIL import Image

    (tmp_path / "data" / "0").mkdir(parents=True)
    Image.new("RGB", (40, 30), (250, 20, 20)).save(tmp_path / "data" / "0" / "x.png")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,class,xmin,ymin,xmax,ymax\n" + "\n".join(rows) + "\n")
    return boxes


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            ["0/x.png,0,5,5,41,20"],
            "box (xmin 5, ymin 5, xmax 41, ymax 20) of '0/x.png' lies outside the image (40x30;",
        ),
        (["0/x.png,0,5,5,20,20", "0/y.png,0,1,1,2,2"], "line 3: image '0/y.png' is not in data.root"),
    ],
)
def test_bad_boxes_exit_nonzero_with_one_message_and_no_results(tmp_path, rows, message):
    boxes = _boxed_folder(tmp_path, rows)
    r = harness(
        "-m", "model=small_cnn", "device=cpu", "method=saliency", "metric=[relevance_mass]",
        "data=image_folder",
        f"data.root={tmp_path / 'data'}", f"data.boxes={boxes}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert result_files(tmp_path / "sweep") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_says_so(tmp_path):
    r = harness("-m", "model=small_cnn", "device=cuda", "method=saliency", f"hydra.sweep.dir={tmp_path}")
    assert r.returncode != 0 and "device=cuda but torch" in r.stderr and "sees no CUDA GPU" in r.stderr
    assert result_files(tmp_path) == []


def test_method_output_is_checked():
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(HarnessError, match=r"shape \(2, 8, 8\); expected \[2, 1 or 3, 8, 8\]"):
        check_attributions(torch.zeros(2, 8, 8), x, "bad")
    nan = torch.zeros(2, 1, 8, 8)
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(HarnessError, match="NaN or inf in 1 values"):
        check_attributions(nan, x, "bad")


def test_report_of_an_empty_folder_fails_clearly(tmp_path):
    r = harness(str(tmp_path), module="harness.report")
    assert r.returncode != 0 and "no complete job" in r.stderr
