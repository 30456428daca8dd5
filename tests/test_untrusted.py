"""Numbers that cannot be trusted never become a row, images are read as they are, a sweep folder is
never computed twice at once, and a report never half-writes.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import metrics
from harness.config import HarnessError, as_declared
from harness.data import image_folder
from harness.job import run_job
from harness.models import small_cnn
from harness.sweep.lock import hold
from metrics import Result
from tests.cli_server import CliServer
from tests.conftest import CONF

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # inputs are the pixels in [0, 1]
SMALL = ["model=small_cnn", "device=cpu", "data.num_images=2", "method=saliency", "metric=[deletion]"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    server = CliServer(tmp_path_factory.mktemp("cli"))
    yield server
    server.close()


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG reads as its 8-bit version (65535 -> 255, 32896 -> 128), not as 255 wherever
    a value exceeds 255 (99.6% of a full-range gradient).
    """
    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    (tmp_path / "cat").mkdir()
    Image.fromarray(ramp).save(tmp_path / "cat" / "deep.png")
    assert Image.open(tmp_path / "cat" / "deep.png").mode == "I;16"
    data = image_folder(str(tmp_path), size=32, mean=MEAN, std=STD)
    expected = torch.from_numpy(np.rint(ramp / 257.0)).float() / 255
    for channel in range(3):
        torch.testing.assert_close(data.images[0, channel], expected, atol=1 / 255 + 1e-6, rtol=0)
    assert float((data.images[0] == 1.0).float().mean()) < 0.01


def test_hidden_files_are_skipped_and_unreadable_images_are_named(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "cat" / "a.png")
    (tmp_path / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden" / "b.png")
    data = image_folder(str(tmp_path), size=8, mean=MEAN, std=STD)
    assert data.ids == ["cat/a.png"]
    (tmp_path / "cat" / "b.png").write_text("not a png")
    with pytest.raises(ValueError, match=f"cannot read image '{tmp_path / 'cat' / 'b.png'}'"):
        image_folder(str(tmp_path), size=8, mean=MEAN, std=STD)


def test_an_integer_where_a_float_is_meant_reaches_the_function_as_a_float():
    node = OmegaConf.create(
        {"_target_": "methods.gradient_shap", "_partial_": True, "stdevs": 1, "n_samples": 3}
    )
    declared = as_declared(node)
    assert isinstance(declared.stdevs, float) and declared.stdevs == 1.0
    assert isinstance(declared.n_samples, int) and node.stdevs == 1  # the config itself is not changed


def test_gradient_shap_with_an_integer_stdevs_runs(cli, tmp_path):
    r = cli.run("harness", "-m", *SMALL[:3], "method=gradient_shap", "method.stdevs=1", "method.n_samples=2",
                "metric=[deletion]", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert r.returncode == 0, r.output
    (row,) = [json.loads(p.read_text()) for p in tmp_path.glob("*/run.json")]
    assert row["method.stdevs"] == 1.0 and isinstance(row["method.stdevs"], float)


def test_a_nan_checkpoint_fails_its_job_and_the_report_of_the_sweep_says_there_is_nothing(cli, tmp_path):
    state = small_cnn(num_classes=10).module.state_dict()
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(nan, tmp_path / "nan.pt")
    sweep = tmp_path / "sweep"
    r = cli.run("harness", "-m", *SMALL, f"model.weights={tmp_path / 'nan.pt'}", f"hydra.sweep.dir={sweep}")
    assert r.returncode != 0 and "weights hold NaN or inf" in r.output, r.output
    assert "Traceback" not in r.output and not list(sweep.glob("*/run.json"))
    (error,) = sweep.glob("*/error.txt")
    assert "weights hold NaN or inf (features.0.weight" in error.read_text()
    out = tmp_path / "report"
    r = cli.run("harness.report", str(sweep), "--out", str(out))
    assert r.returncode == 1 and "no complete job" in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()


def test_a_model_with_one_logit_is_scored_by_its_logit(cli, tmp_path):
    """Refused with the softmax score (a table case of test_bad_inputs); with score=logit it runs."""
    (tmp_path / "one.py").write_text(
        "from torch import nn\n\nclass OneLogit(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(3, 1, 3)\n"
        "    def forward(self, x):\n        return self.conv(x).mean(dim=(2, 3))\n"
    )
    args = ["model=custom", "model.builder=one.OneLogit", "model.input_size=32", *SMALL[1:]]
    r = cli.run("harness", "-m", *args, "metric.deletion.score=logit", f"hydra.sweep.dir={tmp_path / 's'}",
                path=[str(tmp_path)])  # fmt: skip
    assert r.returncode == 0, r.output
    (row,) = [json.loads(p.read_text()) for p in (tmp_path / "s").glob("*/run.json")]
    assert np.isfinite(row["deletion_auc"]) and row["deletion.score"] == "logit"


def test_a_sweep_folder_in_use_by_another_sweep_is_refused(cli, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with hold(tmp_path):
        r = cli.run("harness", "-m", *SMALL, f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 2, r.output
    assert f"sweep folder '{tmp_path}' is in use by another running sweep (pid " in r.output
    assert not list(tmp_path.glob("*/run.json")) and "Traceback" not in r.output
    r = cli.run("harness", "-m", *SMALL, f"hydra.sweep.dir={tmp_path}")  # released: it runs
    assert r.returncode == 0, r.output


def test_a_report_that_fails_leaves_no_file_and_missing_values_are_named(cli, tmp_path, monkeypatch):
    import harness.report as report

    r = cli.run("harness", "-m", *SMALL[:4], "method=saliency,random", "metric=[deletion]",
                f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert r.returncode == 0, r.output
    for path in tmp_path.glob("*method=random*/run.json"):
        row = json.loads(path.read_text())
        path.write_text(json.dumps({**row, "deletion_auc": float("nan")}))
    out = tmp_path / "again"

    def broken(*args, **kwargs):
        raise RuntimeError("a plot failed")

    monkeypatch.setattr(report, "plot_time_vs_insertion", broken)
    monkeypatch.setattr(report, "plot_curves", broken)
    with pytest.raises(RuntimeError, match="a plot failed"):
        report.write_report(tmp_path, out=out)
    assert sorted(p.name for p in out.iterdir()) == []  # nothing half-written, no hidden folder left
    monkeypatch.undo()
    report.write_report(tmp_path, out=out)
    page = (out / "report.html").read_text()
    assert "Missing values (no number, left empty, not compared): deletion_auc of random." in page
    assert (out / "summary.csv").is_file() and not list(out.glob(".report-partial-*"))


@functools.wraps(metrics.infidelity)
def nan_infidelity(*args, **kwargs):
    """Infidelity (its signature and traits) whose every value is NaN."""
    result = metrics.infidelity(*args, **kwargs)
    return Result({k: torch.full_like(v, float("nan")) for k, v in result.values.items()})


def test_a_metric_that_returns_nan_fails_the_job_naming_it(tmp_path):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", [*SMALL[:4], "metric=[infidelity]", "metric.infidelity.n_samples=1"])
    OmegaConf.update(cfg, "metric.infidelity._target_", "tests.test_untrusted.nan_infidelity")
    with pytest.raises(
        HarnessError, match=r"metric infidelity returned NaN or inf as infidelity for 2 of 2 images"
    ):
        run_job(cfg, tmp_path / "job")
    assert not (tmp_path / "job" / "run.json").exists()
