"""Your own model and data: the README's example end to end, every torchvision architecture, weights
from any checkpoint, labels for any folder, and weights identified by their content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

import methods
from harness.config import HarnessError
from harness.data import class_index
from harness.models import SmallCNN, custom_classifier, load_weights, torchvision_classifier
from metrics.sanity import blocks_modules
from tests.cli_server import CliServer
from tests.conftest import CONF, REPO


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    server = CliServer(tmp_path_factory.mktemp("cli"))
    yield server
    server.close()


def _readme_example() -> tuple[str, list[str]]:
    """The README's own-model example: the source of `mynets.py` and the command's arguments."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own model and data") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    command = re.search(r"```sh\n(.*?)```", section, re.S)
    assert code and command
    args = shlex.split(command.group(1))
    assert args[:3] == ["python", "-m", "harness"]
    return code.group(1), args[3:]


def _images(root: Path) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / cls / f"{i}.png")


@pytest.mark.slow
def test_the_readme_own_model_example_runs_end_to_end(cli, tmp_path):
    source, args = _readme_example()
    (tmp_path / "mynets.py").write_text(source)
    namespace: dict = {}
    exec(compile(source, "mynets.py", "exec"), namespace)  # the README's class, to train and save
    net = namespace["TinyNet"](num_classes=2)
    state = {f"model.{k}": v for k, v in net.state_dict().items()}  # as Lightning saves a module's model
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120}, tmp_path / "tinynet.ckpt")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    _images(tmp_path / "my_images")

    r = cli.run("harness", *args, cwd=tmp_path, path=[str(tmp_path)])
    assert r.returncode == 0, r.output
    assert "name no class" not in r.output
    sweep = tmp_path / "results" / "runs" / "tinynet"
    rows = pd.read_csv(sweep / "summary.csv")
    assert sorted(rows["method"]) == ["grad_cam", "saliency"]
    assert set(rows["model"]) == {"TinyNet"} and rows["pretrained"].all()
    sha = hashlib.sha256((tmp_path / "tinynet.ckpt").read_bytes()).hexdigest()
    assert set(rows["weights_sha256"]) == {sha}
    scores = pd.read_csv(next(sweep.glob("*/scores.csv")))
    assert sorted(scores["label"]) == [0, 0, 1, 1]  # cat/ -> 0, dog/ -> 1 through classes.txt
    row = json.loads(next(sweep.glob("*grad_cam*/run.json")).read_text())
    assert row["method.layer"] == "features.3"  # the last convolution, chosen by the harness


def test_every_torchvision_classification_name_composes():
    from hydra import compose, initialize_config_dir

    from harness.config import check_config

    names = torchvision.models.list_models(module=torchvision.models)
    assert len(names) >= 80
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in names:
            cfg = compose("config", overrides=["model=torchvision", f"model.arch={name}", "method=grad_cam"])
            check_config(cfg)
            assert cfg.model.arch == name and cfg.method.layer == "auto"


FAMILIES = {
    "resnet18": ("layer4", "nchw"),
    "vgg11": ("features", "nchw"),
    "densenet121": ("features", "nchw"),
    "mobilenet_v3_small": ("features", "nchw"),
    "efficientnet_b0": ("features", "nchw"),
    "convnext_tiny": ("features", "nchw"),
    "regnet_x_400mf": ("trunk_output", "nchw"),
    "vit_b_32": ("encoder.layers.encoder_layer_11.ln_1", "tokens"),
    "swin_t": ("features", "nhwc"),
}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_one_architecture_of_each_family_builds_and_attributes(arch):
    clf = torchvision_classifier(arch, input_size=64, num_classes=5, seed=0)
    assert (clf.cam_layer, clf.cam_layout) == FAMILIES[arch]
    assert not clf.pretrained and len(clf.class_names) == 5
    blocks_modules(clf.module, clf.blocks)  # every block names a module
    with torch.no_grad():  # torchvision starts some heads at zero (ViT): draw them, so gradients flow
        for m in clf.module.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 3])
    sal = methods.saliency(clf.module, x, target)
    cam = methods.grad_cam(clf.module, x, target, layer=clf.cam_layer, layout=clf.cam_layout)
    assert sal.shape == (2, 3, 64, 64) and cam.shape == (2, 1, 64, 64)
    assert torch.isfinite(cam).all() and (cam >= 0).all() and cam.abs().sum() > 0 and sal.abs().sum() > 0


class Laid(nn.Module):
    """A CNN whose middle layer hands its feature map on as `nchw`, `nhwc` or ViT-like tokens (a
    class token of zeros first); the logits are the same in every layout.
    """

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(x))
        b, c, h, w = a.shape
        if self.layout == "nhwc":
            a = self.layer(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        elif self.layout == "tokens":
            tokens = torch.cat([torch.zeros(b, 1, c), a.flatten(2).transpose(1, 2)], dim=1)
            a = self.layer(tokens)[:, 1:].transpose(1, 2).reshape(b, c, h, w)
        else:
            a = self.layer(a)
        return self.fc((a**2).mean(dim=(2, 3)))


@pytest.mark.parametrize("layout", ["nhwc", "tokens"])
def test_grad_cam_of_other_layouts_equals_captum_on_the_same_feature_map(layout):
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 2, 3])
    ours = methods.grad_cam(Laid(layout), x, target, layer="layer", layout=layout)
    reference = Laid("nchw")
    cam = LayerGradCam(reference, reference.layer).attribute(x, target=target, relu_attributions=True)
    expected = LayerAttribution.interpolate(cam, (8, 8), interpolate_mode="bilinear")
    torch.testing.assert_close(ours, expected)
    assert ours.abs().sum() > 0


# Weights from any checkpoint.


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    "wrap, name, settings",
    [
        (lambda s: s, "plain.bin", {}),
        (lambda s: {"state_dict": {f"model.{k}": v for k, v in s.items()}, "epoch": 1}, "lightning.ckpt", {}),
        (lambda s: {"model": {f"module.{k}": v for k, v in s.items()}}, "dataparallel.pth", {}),
        (lambda s: {"ema": s, "model": {"x": torch.zeros(1)}}, "ema.pt", {"key": "ema"}),
        (lambda s: {f"backbone.{k}": v for k, v in s.items()}, "prefixed.weights", {"prefix": "backbone."}),
    ],
)
def test_weights_load_from_any_checkpoint_layout(tmp_path, wrap, name, settings):
    trained = SmallCNN(num_classes=3, width=4)
    torch.save(wrap(trained.state_dict()), tmp_path / name)
    fresh = SmallCNN(num_classes=3, width=4)
    assert not _same(fresh, trained)
    load_weights(fresh, str(tmp_path / name), **settings)
    assert _same(fresh, trained)


def test_custom_builder_takes_a_checkpoint_and_finds_its_facts(tmp_path):
    trained = SmallCNN(num_classes=3, width=4)
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "w.ckpt"
    )
    (tmp_path / "names.txt").write_text("ant\nbee\nwasp\n")
    clf = custom_classifier(
        "harness.models.SmallCNN", {"num_classes": 3, "width": 4}, weights=str(tmp_path / "w.ckpt"),
        input_size=16, class_names=str(tmp_path / "names.txt"),
    )  # fmt: skip
    assert _same(clf.module, trained) and clf.pretrained and clf.name == "SmallCNN"
    assert clf.class_names == ["ant", "bee", "wasp"]
    assert (clf.cam_layer, clf.cam_layout) == ("features.3", "nchw")
    assert clf.blocks == ["features.0", "features.3", "classifier"]


def test_a_two_class_checkpoint_names_the_setting_that_fits_it(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "two.pth")
    with pytest.raises(
        HarnessError, match=r"the file has 2 classes, the model 1000: set model.num_classes=2$"
    ):
        torchvision_classifier("resnet18", weights=str(tmp_path / "two.pth"), input_size=32)
    clf = torchvision_classifier("resnet18", weights=str(tmp_path / "two.pth"), input_size=32, num_classes=2)
    assert clf.pretrained and clf.class_names == ["0", "1"]


# Labels for any folder.


def test_folder_names_map_to_the_models_classes():
    names = ["tench", "goldfish", "tiger cat", "great white shark"]
    assert class_index(["0", "3"], names) == {"0": 0, "3": 3}
    assert class_index(["Tiger_Cat", "goldfish", "zebra"], names) == {
        "Tiger_Cat": 2,
        "goldfish": 1,
        "zebra": -1,
    }
    assert class_index(["a", "b"], names, {"a": 3, "b": "tench"}) == {"a": 3, "b": 0}
    assert class_index(["7", "1"], names) == {"7": -1, "1": 1}  # no made-up index past the model's
    synsets = [f"n{i:08d}" for i in range(1000)]
    assert class_index(synsets[::-1], [str(i) for i in range(1000)])["n00000999"] == 999
    assert set(class_index(synsets[:3], [str(i) for i in range(1000)]).values()) == {-1}  # order unknown


def test_mapping_files_of_imagenet_and_of_json(tmp_path):
    names = [str(i) for i in range(3)]
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish\nn01484850 shark\n"
    )
    found = class_index(
        ["n01443537", "n01484850", "n09999999"], names, str(tmp_path / "LOC_synset_mapping.txt")
    )
    assert found == {"n01443537": 1, "n01484850": 2, "n09999999": -1}
    (tmp_path / "index.json").write_text(
        json.dumps({"0": ["n01440764", "tench"], "2": ["n01484850", "shark"]})
    )
    assert class_index(["n01484850"], names, str(tmp_path / "index.json")) == {"n01484850": 2}


def test_unmatched_folders_are_reported_once_and_scored_without_a_label(tmp_path, caplog):
    from harness.data import image_folder

    _images(tmp_path / "root")
    (tmp_path / "root" / "cat").rename(tmp_path / "root" / "tiger_cat")
    names = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    with caplog.at_level(logging.WARNING, logger="harness"):
        data = image_folder(str(tmp_path / "root"), 32, (0.5,) * 3, (0.5,) * 3, class_names=names)
    assert data.labels.tolist() == [-1, -1, 282, 282]  # dog/ names no class; tiger_cat/ is 282
    warned = [r.getMessage() for r in caplog.records if "name no class" in r.getMessage()]
    assert len(warned) == 1 and "1 of 2 class folders name no class of the model (dog)" in warned[0]


# Weights identified by their content.


def _weights(path: Path, seed: int) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.save(SmallCNN(num_classes=10, width=16).state_dict(), path)


@pytest.mark.slow
def test_an_overwritten_checkpoint_is_run_again_and_its_old_maps_are_refused(cli, tmp_path):
    ckpt = tmp_path / "cnn.pt"
    _weights(ckpt, 0)
    first = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    sweep = tmp_path / "sweep"
    args = ["-m", "model=small_cnn", f"model.weights={ckpt}", "device=cpu", "data.num_images=2",
            "method=saliency", "metric=[deletion]", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    assert cli.run("harness", *args).returncode == 0
    r = cli.run("harness", *args, "resume=true")
    assert r.returncode == 0 and "0 to run, 1 skipped" in r.output, r.output

    size = ckpt.stat().st_size
    _weights(ckpt, 1)  # the same path and size, other weights
    second = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert first != second and ckpt.stat().st_size == size
    evaluate = [a for a in args if not a.startswith("hydra.sweep.dir")] + [
        "phase=evaluate",
        f"maps_from={sweep}",
        f"hydra.sweep.dir={tmp_path / 'evaluate'}",
    ]
    r = cli.run("harness", *evaluate)
    assert r.returncode != 0 and "Traceback" not in r.output
    assert f"with weights sha256 {first}; this job's weights ({ckpt}) have sha256 {second}" in r.output, (
        r.output
    )

    r = cli.run("harness", *args, "resume=true")
    assert r.returncode == 0 and "1 to run" in r.output, r.output
    (row,) = [json.loads(p.read_text()) for p in sweep.glob("*/run.json")]
    assert row["weights_sha256"] == second
    assert len(list(sweep.glob("*/stale-*/run.json"))) == 1  # the old results, kept aside


# timm, the optional extra.


@pytest.mark.parametrize(
    "arch, size, cam",
    [
        ("resnet18", 32, ("layer4", "nchw")),
        ("vit_tiny_patch16_224", 32, ("blocks.11.norm1", "tokens")),
    ],
)
def test_timm_models_build_load_weights_and_attribute(tmp_path, arch, size, cam):
    pytest.importorskip("timm")
    from harness.models import timm_classifier

    clf = timm_classifier(arch, num_classes=4, input_size=size, seed=0)
    assert (clf.cam_layer, clf.cam_layout) == cam and not clf.pretrained
    blocks_modules(clf.module, clf.blocks)
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in clf.module.state_dict().items()}}, tmp_path / "w.ckpt"
    )
    again = timm_classifier(arch, weights=str(tmp_path / "w.ckpt"), num_classes=4, input_size=size, seed=1)
    assert _same(again.module, clf.module) and again.pretrained
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    cam_map = methods.grad_cam(
        clf.module, x, torch.tensor([0, 3]), layer=clf.cam_layer, layout=clf.cam_layout
    )
    assert cam_map.shape == (2, 1, size, size) and torch.isfinite(cam_map).all() and cam_map.abs().sum() > 0


def test_timm_never_downloads(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    from harness.models import timm_classifier

    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(HarnessError, match="its pretrained weights are not in the local Hugging Face cache"):
        timm_classifier("resnet18", weights="pretrained", input_size=32)
    with pytest.raises(
        HarnessError, match=r"model.arch='resnet19' is not a timm model; did you mean resnet18"
    ):
        timm_classifier("resnet19")
