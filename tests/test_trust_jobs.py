"""End to end: sweeps scored by the sanity checks, and by localisation on the generated shapes with the
model the harness trains on them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_run import harness

TINY_SHAPES = [
    "model=shapes_cnn", "data=shapes", "data.num_images=8", "model.input_size=32", "model.width=8",
    "model.train_images=256", "model.val_images=64", "model.epochs=1", "model.min_accuracy=0",
]  # fmt: skip
LOCALISATION = ["pointing_game", "energy_pointing_game", "relevance_mass", "relevance_rank"]


@pytest.mark.slow
def test_localisation_sweep_on_shapes_with_a_trained_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    sweep = tmp_path / "sweep"
    r = harness(
        "-m", *TINY_SHAPES, "method=oracle,saliency", f"metric=[{','.join(LOCALISATION)},deletion]",
        "device=cpu", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("shapes_cnn: training on 256 generated images") == 1  # once, then cached
    rows = pd.read_csv(sweep / "summary.csv").set_index("method")
    for m in LOCALISATION:
        assert rows.loc["oracle", m] == 1.0 and rows.loc["oracle", f"{m}_better"] == "higher"
        assert rows.loc["saliency", m] < 1.0
    assert rows["model_held_out_accuracy"].nunique() == 1 and rows["ground_truth"].all()
    job = next(sweep.glob("*method=oracle*"))
    arrays = np.load(job / "attributions.npz")
    assert np.array_equal(arrays["maps"][:, 0] > 0, arrays["truth_mask"])
    assert (sweep / "grid_shapes_cnn_shapes.png").is_file()


@pytest.mark.slow
def test_sanity_sweep_writes_similarities_curves_and_figures(tmp_path):
    sweep = tmp_path / "sweep"
    r = harness(
        "-m", "model=small_cnn", "method=saliency,random", "metric=[model_randomisation,random_logit]",
        "data.num_images=2", "device=cpu", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = pd.read_csv(sweep / "summary.csv").set_index("method")
    for f in ("model_randomisation_spearman_abs", "model_randomisation_ssim", "random_logit_spearman"):
        assert rows.loc["random", f] == pytest.approx(1.0)  # a map that ignores the model
        assert rows.loc["saliency", f] < 1.0 and rows.loc["saliency", f"{f}_better"] == "lower"
    # One method call per block, each counted on the randomised copy: saliency's one backward per image.
    assert rows.loc["saliency", "model_randomisation_backwards_per_image"] == 3
    assert rows.loc["saliency", "random_logit_backwards_per_image"] == 1
    job = next(sweep.glob("*method=saliency*"))
    row = json.loads((job / "run.json").read_text())
    assert row["model_randomisation.blocks"] == ["features.0", "features.3", "classifier"]
    curves = pd.read_csv(job / "curves.csv")
    assert curves[curves.metric == "model_randomisation_ssim"]["point"].max() == 3
    assert np.load(job / "attributions.npz")["model_randomisation_maps"].shape == (2, 3, 32, 32)
    assert (sweep / "sanity_curves_small_cnn_photos.png").is_file()
    assert len(list(sweep.glob("sanity_maps_small_cnn_photos_*.png"))) == 2


def test_explain_with_runs_a_prepared_copy_and_leaves_the_metrics_model_as_it_is():
    """BatchNorm folding (the CPU default) must not reach the model a cascading randomisation goes on
    re-initialising: its next block must still have its BatchNorm and a conv without bias.
    """
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf
    from torch import nn

    import methods
    from harness.job import explainer_with
    from harness.runtime import SpeedOptions
    from tests.conftest import CONF

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()
    model[1].running_mean.uniform_(-1, 1)
    job = SimpleNamespace(
        options=SpeedOptions.from_config(OmegaConf.load(CONF / "device" / "cpu.yaml")),
        model=nn.Identity(),  # the timing's hooks live on the job's model; none here
        classifier=SimpleNamespace(cam_layer=""),  # no layer whose output is read
        method=lambda m, x, t: methods.saliency(m, x, t, chunk_size=4),
        seed=0,
    )
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    maps = explainer_with(job)(model, x, t)
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].bias is None  # not folded in place
    torch.testing.assert_close(maps, methods.saliency(model, x, t, chunk_size=4))  # the same function


TINY_VIT = [
    "model=shapes_vit", "data=shapes", "data.num_images=4", "model.input_size=32", "model.dim=32",
    "model.depth=2", "model.train_images=256", "model.val_images=64", "model.epochs=1",
    "model.min_accuracy=0",
]  # fmt: skip


@pytest.mark.slow
def test_attention_methods_sweep_on_the_shapes_transformer(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    sweep = tmp_path / "sweep"
    r = harness(
        "-m", *TINY_VIT, "method=attention_rollout,attn_lrp,generic_attention,grad_cam,oracle",
        "metric=[relevance_mass,deletion]", "device=cpu", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("shapes_vit: training on 256 generated images") == 1  # once, then cached
    rows = pd.read_csv(sweep / "summary.csv").set_index("method")
    assert set(rows.index) == {"attention_rollout", "attn_lrp", "generic_attention", "grad_cam", "oracle"}
    assert rows.loc["oracle", "relevance_mass"] == 1.0
    for name in ("attention_rollout", "generic_attention"):
        row = json.loads((next(sweep.glob(f"*method={name}*")) / "run.json").read_text())
        assert row["method.prefix_tokens"] == 1 and row["method.grid"] == [4, 4]  # bound from the model
        assert row["method_bound_ratio"] > 0 and 0 <= row["relevance_mass"] <= 1


def test_an_attention_method_on_a_cnn_is_refused_naming_the_methods_it_can_use(tmp_path):
    r = harness("model=small_cnn", "method=attention_rollout", "data.num_images=2", "device=cpu",
                f"hydra.run.dir={tmp_path / 'run'}", "hydra.mode=RUN")  # fmt: skip
    assert r.returncode != 0
    assert "method attention_rollout on model small_cnn: SmallCNN shows no attention" in r.stderr
    assert "methods for it: " in r.stderr and "saliency" in r.stderr


@pytest.mark.slow
def test_a_sweep_that_skips_the_inapplicable_records_why_and_goes_on(tmp_path):
    """With skip_inapplicable=true an attention method on a CNN leaves not_applicable.txt (no error,
    no results) and the report names it; without it, the same job fails like any bad input.
    """
    sweep = tmp_path / "sweep"
    common = ["-m", "model=small_cnn", "method=attention_rollout,saliency", "data.num_images=2",
              "metric=[deletion]", "device=cpu", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    r = harness(*common, "skip_inapplicable=true")
    assert r.returncode == 0, r.stderr
    skipped = next(sweep.glob("*method=attention_rollout*"))
    said = (skipped / "not_applicable.txt").read_text()
    assert said.startswith("method attention_rollout on model small_cnn: SmallCNN shows no attention")
    assert not (skipped / "error.txt").exists() and not (skipped / "run.json").exists()
    assert "1 job(s) not applicable" in r.stderr
    assert list(pd.read_csv(sweep / "summary.csv")["method"]) == ["saliency"]
    assert "## Not applicable" in (sweep / "summary.md").read_text()
    r = harness(*common)  # the same sweep, not skipping: the job fails and says why
    assert r.returncode != 0
    assert not (skipped / "not_applicable.txt").exists()
    assert "SmallCNN shows no attention" in (skipped / "error.txt").read_text()


def test_a_patch_grid_that_does_not_split_the_images_is_refused_before_any_model_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    r = harness(*TINY_VIT, "method=patch_occlusion", "method.grid=[5,4]", "metric=[deletion]", "device=cpu",
                f"hydra.run.dir={tmp_path / 'run'}", "hydra.mode=RUN")  # fmt: skip
    assert r.returncode != 0
    assert "method patch_occlusion: patch_occlusion: grid=[5, 4] does not split 32x32 images" in r.stderr
    assert "calibration" not in r.stderr and "started" not in r.stderr
