"""Every option of every config group composes and instantiates; the naming rule holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from harness.config import HarnessError
from harness.runtime import resolve_device
from methods import traits_of
from tests.conftest import CONF

GROUPS = ("model", "data", "method", "metric", "device", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def cfg_with(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(
            "config",
            ["model=small_cnn", "device=cpu", "device.batch_size=2", "device.grad_batch_size=3", *overrides],
        )


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), group


# shapes_cnn and shapes_vit train on the generated shapes: here a tiny schedule, cached in the test's folder.
TINY_SHAPES = [
    "data=shapes",
    "model.train_images=64",
    "model.val_images=32",
    "model.epochs=1",
    "model.min_accuracy=0",
]


@pytest.mark.parametrize("name", options("model"))
def test_model_options_instantiate(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    extra = {
        "shapes_cnn": TINY_SHAPES,
        "shapes_vit": TINY_SHAPES,
        "custom": ["model.builder=harness.models.SmallCNN", "model.input_size=32"],
    }
    cfg = cfg_with(f"model={name}", *extra.get(name, []))
    clf = instantiate(cfg.model)
    # naming rule: config stem == value in the row, but for the configs of many architectures
    assert clf.name == {"torchvision": "resnet18", "timm": "resnet18", "custom": "SmallCNN"}.get(name, name)
    assert not clf.module.training
    trained = ("efficientnet_lite0", "shapes_cnn", "shapes_vit")
    assert clf.pretrained == (name in trained)  # custom, torchvision: random
    clf.module.get_submodule(clf.cam_layer)
    from metrics.sanity import blocks_modules

    given = clf.blocks if cfg.model.blocks in ("auto", None) else cfg.model.blocks
    assert len(blocks_modules(clf.module, clf.blocks)) == len(given) >= 3  # names that exist
    with torch.no_grad():
        logits = clf.module(torch.zeros(1, 3, clf.input_size, clf.input_size))
    assert logits.shape == (1, len(clf.class_names))


@pytest.mark.parametrize("name", options("data"))
def test_data_options_instantiate(name, tmp_path: Path):
    from PIL import Image

    extra = []
    if name == "image_folder":
        (tmp_path / "cat").mkdir()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "cat" / "a.png")
        extra = [f"data.root={tmp_path}"]
    cfg = cfg_with(f"data={name}", "data.num_images=1", *extra)
    data = instantiate(cfg.data, size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert data.name == name and data.images.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("group", ["method", "metric"])
def test_functions_follow_the_naming_rule(group):
    import methods
    import metrics

    module = methods if group == "method" else metrics
    for name in options(group):
        cfg = cfg_with(f"{group}={name}" if group == "method" else f"metric=[{name}]")
        node = cfg.method if group == "method" else cfg.metric[name]
        assert node._target_ == f"{group}s.{name}"  # stem == function name
        fn = instantiate(node)
        assert fn.func is getattr(module, name)
        # The chunk size is the job's to choose (`harness.job.chunk_for`): null in every config.
        assert fn.keywords.get("chunk_size") is None, name


def test_the_job_fills_what_the_config_leaves_to_it():
    """Null chunk sizes get the model's batch size for plain forwards (forward-only methods, every
    metric) and its forward+backward batch size otherwise; `auto` layers and blocks the model's own;
    what the config sets stays, and no config node is written to.
    """
    from types import SimpleNamespace

    from harness.job import chunk_for, filled, settings_of

    speed = SimpleNamespace(batch_size=8, grad_batch_size=3)
    cfg = cfg_with(
        "method=grad_cam", "model=torchvision", "model.input_size=32", "metric=[model_randomisation]"
    )
    method, metric = instantiate(cfg.method), instantiate(cfg.metric.model_randomisation)
    assert [settings_of(method)[k] for k in ("layer", "layout")] == ["auto", "auto"]
    assert settings_of(metric)["blocks"] == "auto"
    facts = {"layer": "layer4", "layout": "nchw", "blocks": ["layer1", "fc"]}
    method = filled(filled(method, facts), {"chunk_size": chunk_for(speed, traits_of(method).forward_only)})
    metric = filled(filled(metric, facts), {"chunk_size": chunk_for(speed, forward_only=True)})
    assert settings_of(method) == {"layer": "layer4", "layout": "nchw", "chunk_size": 3}
    assert (settings_of(metric)["blocks"], settings_of(metric)["chunk_size"]) == (["layer1", "fc"], 8)
    assert cfg.method.layer == "auto" and cfg.method.chunk_size is None  # the config as composed
    occlusion = filled(
        instantiate(cfg_with("method=occlusion").method), {"chunk_size": chunk_for(speed, True)}
    )
    assert settings_of(occlusion)["chunk_size"] == 8
    given = filled(instantiate(cfg_with("method=saliency", "method.chunk_size=5").method), {"chunk_size": 3})
    assert settings_of(given)["chunk_size"] == 5


def test_several_metrics_per_run():
    cfg = cfg_with("metric=[insertion,deletion]")
    assert set(cfg.metric) == {"deletion", "insertion"}
    assert cfg.metric.deletion.substrate == "zero" and cfg.metric.insertion.substrate == "blur"


def test_cam_layer_comes_from_the_model():
    assert cfg_with("method=grad_cam", "model=resnet18").method.layer == "layer4"
    assert cfg_with("method=grad_cam", "model=efficientnet_lite0").method.layer == "head"


@pytest.mark.parametrize("name", options("device"))
def test_device_options(name):
    cfg = cfg_with(f"device={name}")
    assert cfg.device.name == name and cfg.device.precision == "fp32"
    if name == "cuda" and not torch.cuda.is_available():
        with pytest.raises(HarnessError, match="device=cuda but torch .* sees no CUDA GPU"):
            resolve_device(cfg.device.name)
    else:
        assert resolve_device(cfg.device.name).type in ("cpu", "cuda")


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_compose(name):
    cfg = cfg_with(f"experiment={name}")
    OmegaConf.resolve(cfg)


def test_experiment_methods_sweeps_every_method_and_the_default_comparison_most():
    """`experiment=methods` sweeps every method that needs neither ground truth nor a transformer's
    attention (the default model is a CNN). The default comparison
    leaves out the CAM family's members that cost a forward per channel (Score-CAM, Ablation-CAM: 10 s
    per photo on 2 cores) or localise as Grad-CAM does on the generated shapes (XGrad-CAM, LayerCAM,
    HiResCAM) or read no class (EigenCAM), which `experiment=cams` sweeps, SmoothGrad's other two
    readings (SmoothGrad-squared, VarGrad: SmoothGrad's cost again each), Expected Gradients (32
    forward+backward passes per image), LIME and KernelSHAP (1000 forwards per image each), Guided IG
    and Blur IG (200 and 100 forward+backward passes per image) and LRP (its rules pass every
    convolution two to five times more), so that it stays within its six minutes on 2 cores.
    """
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
        cams = compose("config", ["experiment=cams"], return_hydra_config=True)
        everything = compose("config", ["experiment=methods"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    traits = {m: traits_of(instantiate(cfg_with(f"method={m}").method)) for m in options("method")}
    every = [m for m in options("method") if not traits[m].ground_truth and not traits[m].attention]
    attention = {
        "attention_rollout",
        "attn_lrp",
        "generic_attention",
        "legrad",
        "patch_lime",
        "patch_occlusion",
        "patch_rise",
    }  # the default model is a CNN
    assert every == sorted(set(options("method")) - {"oracle"} - attention)
    swept = everything.hydra.sweeper.params.method.split(",")
    assert sorted(swept) == every and len(set(swept)) == len(swept)
    family = set(cams.hydra.sweeper.params.method.split(","))
    default = set(cfg.hydra.sweeper.params.method.split(","))
    assert family <= set(every) and "random" in family
    assert sorted(set(every) - default) == [
        "ablation_cam",
        "blur_ig",
        "eigen_cam",
        "expected_gradients",
        "guided_ig",
        "hires_cam",
        "kernel_shap",
        "layer_cam",
        "lime",
        "lrp",
        "score_cam",
        "smoothgrad_sq",
        "vargrad",
        "xgrad_cam",
    ]
    assert cfg.model._target_.endswith("efficientnet_lite0") and cfg.data._target_.endswith("photos")


def test_an_experiments_sweep_overrides_the_default_one():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        truth = compose("config", ["experiment=ground_truth"], return_hydra_config=True)
        speed = compose("config", ["experiment=speed"], return_hydra_config=True)
    methods = truth.hydra.sweeper.params.method.split(",")
    attention = {
        "attention_rollout",
        "attn_lrp",
        "generic_attention",
        "legrad",
        "patch_lime",
        "patch_occlusion",
        "patch_rise",
    }  # shapes_cnn has none
    assert methods[0] == "oracle" and sorted(methods) == sorted(set(options("method")) - attention)
    assert speed.hydra.sweeper.params.method == "saliency,integrated_gradients,occlusion,grad_cam"


def readme_groups() -> dict[str, list[str]]:
    """The README's table of config groups: each row's group and the options its second cell names."""
    import re

    text = (CONF.parent / "README.md").read_text()
    table = text[text.index("| group | options | what they are |") :].split("\n\n")[0]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    return {row[0].strip("| `"): re.findall(r"`([^`]+)`", row[1]) for row in rows}


def test_the_readme_lists_every_group_and_every_option():
    groups = sorted(str(p.parent.relative_to(CONF)) for p in CONF.glob("**/*.yaml") if p.parent != CONF)
    listed = readme_groups()
    assert sorted(listed) == sorted(set(groups))
    for group, names in listed.items():
        assert sorted(names) == options(group), group


def test_a_sweep_over_methods_is_told_to_use_plus_plus_for_a_setting_the_default_method_lacks():
    """`-m method=lime,kernel_shap method.n_samples=200`: Hydra composes the sweep's main config with
    the default method (saliency), which has no `n_samples`; `++method.n_samples=200` works.
    """
    from harness.config import composition_message

    argv = ["-m", "method=lime,kernel_shap", "method.n_samples=200"]
    with initialize_config_dir(str(CONF), version_base="1.3"), pytest.raises(Exception) as e:
        compose("config", ["method.n_samples=200"])
    said = composition_message(e.value, argv)
    assert said.startswith("method.n_samples is not a setting")
    assert said.endswith(
        "a sweep over method=lime,kernel_shap composes its main config with the default method, so a "
        "setting that it lacks needs ++method.n_samples=200"
    )
    assert "sweep" not in composition_message(e.value, ["method.n_samples=200"])
