"""Bad input, as a new user gives it: each case exits non-zero with one clear line that names the bad
value and what would be right, prints no traceback, and leaves no result file behind.

The commands run through one `CliServer` (forked children of a process that imported the harness
once), a fraction of a second each instead of five.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.cli_server import CliServer

# What a job writes; none may be left by a failing command.
RESULT_FILES = (
    "run.json",
    "curves.csv",
    "scores.csv",
    "kernels.csv",
    "attributions.npz",
    "summary.csv",
    "report.html",
)


class WholeModule(nn.Module):
    """Saved whole (`torch.save(model)`), which weights-only loading refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The files the cases point at: images, checkpoints, class-name files, a module of models."""
    from PIL import Image

    from harness.models import small_cnn

    root = tmp_path_factory.mktemp("bad")
    for cls, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (root / "data" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40), colour).save(root / "data" / cls / "a.png")
    (root / "empty").mkdir()
    (root / "noimages" / "cat").mkdir(parents=True)
    (root / "noimages" / "cat" / "notes.txt").write_text("no image here")
    (root / "corrupt" / "cat").mkdir(parents=True)
    (root / "corrupt" / "cat" / "x.png").write_text("not a png")
    state = small_cnn(num_classes=10).module.state_dict()
    torch.save(small_cnn(num_classes=2).module.state_dict(), root / "two_classes.bin")
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier")}, root / "partial.pt")
    torch.save(WholeModule(), root / "whole.pt")
    torch.save([1, 2, 3], root / "list.pt")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, root / "nostate.pt")
    torch.save({"state_dict": state}, root / "lightning.ckpt")
    (root / "text.pt").write_text("these are not weights\n")
    (root / "truncated.pt").write_bytes((root / "lightning.ckpt").read_bytes()[:2000])
    (root / "three.txt").write_text("a\nb\nc\n")
    (root / "a_file").write_text("x")
    (root / "mynets_bad.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def not_a_module(**kwargs):\n    return 3\n\n"
        "class Flat(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(3, 2, 3)\n"
        "    def forward(self, x):\n        return self.conv(x).mean(dim=(1, 2, 3))\n\n"
        "class Breaks(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(3, 2, 3)\n"
        "    def forward(self, x):\n"
        "        if x.shape[0] > 1 or x.requires_grad:\n"
        "            raise RuntimeError('boom in the model')\n"
        "        return self.conv(x).mean(dim=(2, 3))\n\n"
        "class OneLogit(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(3, 1, 3)\n"
        "    def forward(self, x):\n        return self.conv(x).mean(dim=(2, 3))\n\n"
        "class AlwaysDropout(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(3, 4, 3)\n"
        "    def forward(self, x):\n"
        "        return nn.functional.dropout(self.conv(x), 0.5, training=True).mean(dim=(2, 3))\n\n"
        "import os, signal\n"
        "SENT = []\n\n"
        "class CtrlCInAFinaliser:\n"
        "    def __del__(self):\n"
        "        if not SENT:\n"
        "            SENT.append(1)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "            for _ in range(1000):\n"
        "                pass\n\n"
        "class SwallowsCtrlC(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(3, 2, 3)\n"
        "    def forward(self, x):\n"
        "        CtrlCInAFinaliser()\n"
        "        return self.conv(x).mean(dim=(2, 3))\n"
    )
    torch.save(
        {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
        root / "nan.pt",
    )
    (root / "huge" / "cat").mkdir(parents=True)
    (root / "huge" / "cat" / "big.png").write_bytes(_png_header(14000, 14000))
    return root


def _png_header(width: int, height: int) -> bytes:
    """A PNG that says it is `width` x `height` (its pixels left out): Pillow refuses it on opening."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + end


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    server = CliServer(tmp_path_factory.mktemp("cli"))
    yield server
    server.close()


SMALL = ["model=small_cnn", "device=cpu", "data.num_images=1", "method=saliency", "metric=[deletion]"]
CUSTOM = ["model=custom", "model.input_size=32", "device=cpu", "method=saliency", "metric=[deletion]"]
FOLDER = ["data=image_folder", "data.root={d}/data"]
INSPECT = ["model=small_cnn", "device=cpu"]

# (id, arguments, the message's text) of `python -m harness -m <arguments>`; `{d}` is the folder of
# the files above. The ids say where the bad value is.
CASES = [
    # Config values: types, ranges, allowed strings, unknown keys.
    ("value/occlusion-window-text", ["model=small_cnn", "device=cpu", "method=occlusion", "method.window=abc"], "method.window='abc'; expected an integer"),
    ("value/occlusion-window-stride", ["model=small_cnn", "device=cpu", "data.num_images=1", "method=occlusion", "method.window=8", "method.stride=5"], "window=8, stride=5"),
    ("value/metric-empty", ["model=small_cnn", "device=cpu", "metric=[]"], "no metric selected (metric is empty); use e.g. metric=[deletion,insertion]"),
    ("value/typo-key-added", [*SMALL[:3], "method=rise", "+method.n_mask=10"], "method.n_mask is not a setting of rise; did you mean method.n_masks?"),
    ("value/model-typo-key", [*SMALL, "+model.widht=8"], "model.widht is not a setting of small_cnn; did you mean model.width?"),
    ("model/lrp-squeeze-excitation", ["model=mobilenet_v3_large", "model.input_size=32", *SMALL[1:3], "method=lrp", "metric=[deletion]"], "method lrp on model mobilenet_v3_large: lrp cannot propagate relevance through MobileNetV3: it computes a product of two tensors that depend on the input (Tensor.mul in module 'features.4.block.2')"),
    ("value/model-width-text", [*SMALL, "model.width=wide"], "model.width='wide'; expected an integer"),
    ("value/metric-steps-text", [*SMALL, "metric.deletion.steps=many"], "metric.deletion.steps='many'; expected an integer"),
    ("value/smoothgrad-noise-text", [*SMALL[:3], "method=smoothgrad", "method.noise_level=loud"], "method.noise_level='loud'; expected a number"),
    ("value/unknown-method", [*SMALL[:3], "method=sailency"], "unknown method 'sailency'; available: ablation_cam, attention_rollout, attn_lrp, blur_ig, deeplift,"),
    ("value/unknown-model", ["model=resnet19", "device=cpu"], "unknown model 'resnet19'; available: alexnet, custom,"),
    ("value/unknown-data", ["data=imagefolder"], "unknown data 'imagefolder'; available: image_folder, photos"),
    ("value/precision", [*SMALL, "device.precision=fp8"], "device.precision='fp8'"),
    ("value/memory-budget", [*SMALL, "device.memory_budget=2"], "device.memory_budget=2; expected a fraction of free memory in (0, 1]"),
    ("value/batch-size", [*SMALL, "device.batch_size=0"], "device.batch_size=0; expected null (chosen) or a positive number"),
    ("value/device-flag-text", [*SMALL, "device.fold_padding=abc"], "device.fold_padding='abc'; expected true or false"),
    ("value/device-typo-key", [*SMALL, "+device.fold_paddin=true"], "device.fold_paddin is not a setting of DeviceSettings; did you mean device.fold_padding?"),
    ("value/timing-repeats", [*SMALL, "timing.max_repeats=0"], "timing.max_repeats=0; expected an integer >= 1"),
    ("value/timing-key", [*SMALL, "+timing.repeats=3"], "timing.repeats is not a timing setting; expected one of budget_s,"),
    ("value/phase", [*SMALL, "phase=train"], "phase='train'; expected one of all, evaluate"),
    ("value/evaluate-without-maps", [*SMALL, "phase=evaluate"], "phase=evaluate needs maps_from=<folder of a sweep run with save_maps=true>"),
    ("value/road-imputation", [*SMALL, "metric=[road]", "metric.road.imputation=gain"], "metric.road: imputation='gain'; expected one of"),
    ("value/torchvision-arch", ["model=torchvision", "model.arch=resnet19", "device=cpu", "method=saliency", "metric=[deletion]"], "model.arch='resnet19' is not a torchvision classification model; did you mean resnet18"),
    ("value/torchvision-weights-name", ["model=torchvision", "model.weights=IMAGENET1K_V9", "model.input_size=32", "device=cpu", "method=saliency", "metric=[deletion]"], "model.weights='IMAGENET1K_V9' is neither a file nor a weights name of resnet18; expected a checkpoint path or one of IMAGENET1K_V1, DEFAULT"),
    ("value/cam-layout", ["model=torchvision", "model.cam_layout=diagonal", "model.input_size=32", "device=cpu", "method=grad_cam", "metric=[deletion]"], "model.cam_layout='diagonal'; expected auto, nchw, nhwc, tokens"),
    ("value/cam-layer", ["model=torchvision", "model.cam_layer=layer9", "model.input_size=32", "device=cpu", "method=grad_cam", "metric=[deletion]"], "model.cam_layer='layer9' is not a module of resnet18; its top-level modules: conv1, bn1,"),
    ("value/num-classes", ["model=torchvision", "model.num_classes=0", "device=cpu", "method=saliency", "metric=[deletion]"], "model.num_classes=0; expected an integer >= 1"),
    ("value/blocks", [*SMALL, "metric=[model_randomisation]", "metric.model_randomisation.blocks=[features.0,layer9]"], "metric.model_randomisation: block 'layer9' is not a module of the model"),
    ("value/ground-truth", [*SMALL, "metric=[pointing_game]"], "metric pointing_game needs ground truth"),
    # Your own model.
    ("model/builder-missing", CUSTOM, "model.builder is required; give model.builder=<value>"),
    ("model/builder-not-importable", [*CUSTOM, "model.builder=nosuchpackage.Net"], "model.builder='nosuchpackage.Net' cannot be imported (No module named 'nosuchpackage')"),
    ("model/builder-not-a-module", [*CUSTOM, "model.builder=mynets_bad.not_a_module"], "model.builder='mynets_bad.not_a_module' returned a int; expected an nn.Module"),
    ("model/builder-bad-args", [*CUSTOM, "model.builder=mynets_bad.Flat", "+model.args.depth=3"], "model.builder='mynets_bad.Flat' refused model.args={'depth': 3}"),
    ("model/builder-no-logits", [*CUSTOM, "model.builder=mynets_bad.Flat"], "model Flat returns [1]; expected logits [batch, classes]"),
    ("model/num-classes-differ", [*CUSTOM, "model.builder=harness.models.SmallCNN", "model.num_classes=3"], "model.num_classes=3 but model SmallCNN returns 10 logits"),
    ("model/class-names-count", ["model=torchvision", "model.num_classes=10", "model.input_size=32", "model.class_names={d}/three.txt", "device=cpu", "method=saliency", "metric=[deletion]"], "model.class_names='{d}/three.txt' has 3 names; the model has 10 classes"),
    ("model/class-names-small-cnn", [*SMALL, "+model.class_names={d}/three.txt"], "model.class_names is not a setting of small_cnn;"),
    # Paths.
    ("path/data-root-missing", ["model=small_cnn", "device=cpu", "data=image_folder"], "data.root is required; give data.root=<value>"),
    ("path/data-root-nonexistent", [*SMALL, "data=image_folder", "data.root=/no/such/folder"], "data.root='/no/such/folder': no such file or folder; expected a folder of class subfolders"),
    ("path/data-root-is-file", [*SMALL, "data=image_folder", "data.root={d}/a_file"], "is a file; expected a folder of class subfolders"),
    ("path/data-root-empty", [*SMALL, "data=image_folder", "data.root={d}/empty"], "has no class subfolders"),
    ("path/data-root-no-images", [*SMALL, "data=image_folder", "data.root={d}/noimages"], "has no images"),
    ("path/classes-missing", [*SMALL, *FOLDER, "data.classes={d}/nosuch.txt"], "data.classes='{d}/nosuch.txt': no such file or folder"),
    ("path/boxes-missing", [*SMALL, *FOLDER, "data.boxes={d}/nosuch.csv"], "data.boxes='{d}/nosuch.csv': no such file or folder"),
    ("path/class-names-missing", ["model=torchvision", "model.class_names={d}/nosuch.txt", "device=cpu", "method=saliency", "metric=[deletion]"], "model.class_names='{d}/nosuch.txt': no such file or folder"),
    ("path/maps-from-missing", [*SMALL, "phase=evaluate", "maps_from={d}/nosuch"], "maps_from={d}/nosuch: no such folder; expected the folder of an earlier sweep"),
    # Images.
    ("image/corrupt", [*SMALL, "data=image_folder", "data.root={d}/corrupt"], "cannot read image '{d}/corrupt/cat/x.png'"),
    # Checkpoints.
    ("weights/missing", [*SMALL, "model.weights={d}/nosuch.pt"], "model.weights='{d}/nosuch.pt': no such file or folder; expected a checkpoint file"),
    ("weights/folder", [*SMALL, "model.weights={d}/empty"], "model.weights='{d}/empty' is a folder; expected a checkpoint file"),
    ("weights/text-file", [*SMALL, "model.weights={d}/text.pt"], "model.weights='{d}/text.pt' is not a PyTorch checkpoint"),
    ("weights/truncated", [*SMALL, "model.weights={d}/truncated.pt"], "model.weights='{d}/truncated.pt' is not a PyTorch checkpoint"),
    ("weights/two-classes", [*SMALL, "model.weights={d}/two_classes.bin"], "the file has 2 classes, the model 10: set model.num_classes=2"),
    ("weights/missing-keys", [*SMALL, "model.weights={d}/partial.pt"], "2 keys of the model missing from the file (classifier.weight, classifier.bias)"),
    ("weights/whole-module", [*SMALL, "model.weights={d}/whole.pt"], "holds Python objects besides tensors"),
    ("weights/a-list", [*SMALL, "model.weights={d}/list.pt"], "holds a list; expected a state dict"),
    ("weights/no-state-dict", [*SMALL, "model.weights={d}/nostate.pt"], "holds no state dict under any of state_dict,"),
    ("weights/key", [*CUSTOM, "model.builder=harness.models.SmallCNN", "model.weights={d}/lightning.ckpt", "model.weights_key=ema"], "model.weights_key='ema' is not in '{d}/lightning.ckpt'; its keys: state_dict"),
    ("weights/prefix", [*CUSTOM, "model.builder=harness.models.SmallCNN", "model.weights={d}/lightning.ckpt", "model.weights_prefix=net."], "model.weights_prefix='net.': no key of '{d}/lightning.ckpt' starts with it; its keys start with classifier., features."),
    ("weights/efficientnet-both", ["model.weights={d}/lightning.ckpt", "+model.weights_path={d}/lightning.ckpt", "device=cpu", "method=saliency"], "model.weights and model.weights_path are the same setting; give one"),
    # Output folders.
    ("output/is-a-file", [*SMALL, "hydra.sweep.dir={d}/a_file"], "output folder '{d}/a_file' is a file; expected a folder"),
    ("output/under-a-file", [*SMALL, "hydra.sweep.dir={d}/a_file/sweep"], "output folder '{d}/a_file/sweep' lies under the file {d}/a_file"),
    ("output/unwritable", [*SMALL, "hydra.sweep.dir=/proc/harness-sweep"], "output folder '/proc/harness-sweep' cannot be written"),
    ("output/empty-sweep-dir", [*SMALL, "hydra.sweep.dir="], "hydra.sweep.dir is empty; expected a folder for the results"),
    ("output/empty-run-dir", [*SMALL, "hydra.run.dir="], "hydra.run.dir is empty; expected a folder for the results"),
    # Keys that nothing reads: added with + (which Hydra's own message suggests), or mistyped without it.
    ("key/top-level-added", [*SMALL, "+modle=small_cnn"], "modle is not a setting of the harness; did you mean model?"),
    ("key/seed-added", [*SMALL, "+seeed=3"], "seeed is not a setting of the harness; did you mean seed?"),
    ("key/top-level-typo", [*SMALL, "seeed=3"], "seeed is not a setting; did you mean seed?"),
    ("key/model-typo", [*SMALL, "model.widht=8"], "model.widht is not a setting; did you mean model.width?"),
    ("key/timing-typo", [*SMALL, "timing.budget=1"], "timing.budget is not a setting; did you mean timing.budget_s?"),
    ("key/metric-not-selected", [*SMALL, "metric.road.imputation=telea"], "metric.road is set but metric road is not selected (metric=[deletion]); select it with metric=[deletion,road]"),
    ("key/unquoted-tilde", [*SMALL, "data=image_folder", "data.root=~/images"], "cannot read the override 'data.root=~/images'; quote a value that starts with ~"),
    # Top-level values.
    ("value/save-maps", [*SMALL, "save_maps=maybe"], "save_maps='maybe'; expected true or false"),
    ("value/resume", [*SMALL, "resume=maybe"], "resume='maybe'; expected true or false"),
    ("value/progress", [*SMALL, "progress=sometimes"], "progress='sometimes'; expected true or false or null"),
    ("value/seed-fraction", [*SMALL, "seed=1.5"], "seed=1.5; expected an integer"),
    ("value/seed-text", [*SMALL, "seed=abc"], "seed='abc'; expected an integer"),
    ("value/timing-budget-nan", [*SMALL, "timing.budget_s=nan"], "timing.budget_s=nan; expected a number >= 0"),
    ("value/timing-budget-negative", [*SMALL, "timing.budget_s=-1"], "timing.budget_s=-1; expected a number >= 0"),
    ("value/timing-repeats-fraction", [*SMALL, "timing.max_repeats=2.5"], "timing.max_repeats=2.5; expected an integer >= 1"),
    ("value/timing-profile", [*SMALL, "timing.profile=sometimes"], "timing.profile='sometimes'; expected true or false"),
    # Method settings: types and declared ranges, before Captum sees them.
    ("method/ig-quadrature", [*SMALL[:3], "method=integrated_gradients", "method.method=simpson"], "method.method='simpson'; expected one of gausslegendre, riemann_left"),
    ("method/ig-steps", [*SMALL[:3], "method=integrated_gradients", "method.n_steps=0"], "method.n_steps=0; expected an integer >= 1"),
    ("method/smoothgrad-samples", [*SMALL[:3], "method=smoothgrad", "method.nt_samples=0"], "method.nt_samples=0; expected an integer >= 1"),
    ("method/smoothgrad-noise", [*SMALL[:3], "method=smoothgrad", "method.noise_level=-0.1"], "method.noise_level=-0.1; expected a number >= 0"),
    ("method/gradient-shap-samples", [*SMALL[:3], "method=gradient_shap", "method.n_samples=0"], "method.n_samples=0; expected an integer >= 1"),
    ("method/gradient-shap-stdevs", [*SMALL[:3], "method=gradient_shap", "method.stdevs=-1"], "method.stdevs=-1; expected a number >= 0"),
    ("method/occlusion-stride", [*SMALL[:3], "method=occlusion", "method.stride=0"], "method.stride=0; expected an integer >= 1"),
    ("method/occlusion-window", [*SMALL[:3], "method=occlusion", "method.window=0"], "method.window=0; expected an integer >= 1"),
    ("method/occlusion-score", [*SMALL[:3], "method=occlusion", "method.score=prob"], "method.score='prob'; expected one of softmax, logit"),
    ("method/rise-cells", [*SMALL[:3], "method=rise", "method.cells=0"], "method.cells=0; expected an integer >= 1"),
    ("method/rise-masks", [*SMALL[:3], "method=rise", "method.n_masks=0"], "method.n_masks=0; expected an integer >= 1"),
    ("method/rise-p-keep", [*SMALL[:3], "method=rise", "method.p_keep=1.5"], "method.p_keep=1.5; expected a number in (0, 1)"),
    ("method/rise-p-keep-zero", [*SMALL[:3], "method=rise", "method.p_keep=0"], "method.p_keep=0; expected a number in (0, 1)"),
    ("method/grad-cam-layout", [*SMALL[:3], "method=grad_cam", "method.layout=diagonal"], "method.layout='diagonal'; expected one of nchw, nhwc, tokens"),
    ("method/chunk-size", [*SMALL, "method.chunk_size=0"], "method.chunk_size=0; expected an integer >= 1"),
    # Model settings.
    ("model/input-size-zero", [*SMALL, "model.input_size=0"], "model.input_size=0; expected an integer >= 8"),
    ("model/input-size-one", [*SMALL, "model.input_size=1"], "model.input_size=1; expected an integer >= 8"),
    ("model/num-classes-negative", [*SMALL, "model.num_classes=-3"], "model.num_classes=-3; expected an integer >= 1"),
    ("model/width-zero", [*SMALL, "model.width=0"], "model.width=0; expected an integer >= 1"),
    ("model/mean-two-entries", [*CUSTOM, "model.builder=harness.models.SmallCNN", "model.mean=[0.5,0.5]"], "model.mean=[0.5, 0.5]; expected a list of 3"),
    ("model/std-zero", [*CUSTOM, "model.builder=harness.models.SmallCNN", "model.std=[0,0,0]"], "model.std=[0, 0, 0]; expected a list of 3"),
    ("model/nan-weights", [*SMALL, "model.weights={d}/nan.pt"], "model small_cnn: weights hold NaN or inf (features.0.weight,"),
    ("model/one-logit", [*CUSTOM, "model.builder=mynets_bad.OneLogit", "data.num_images=1"], "model OneLogit returns one logit, and metric deletion scores its softmax"),
    ("model/one-logit-rise", [*CUSTOM, "model.builder=mynets_bad.OneLogit", "data.num_images=1", "method=rise", "metric.deletion.score=logit"], "model OneLogit returns one logit, and method rise scores its softmax"),
    ("model/dropout-left-on", [*CUSTOM, "model.builder=mynets_bad.AlwaysDropout", "data.num_images=1"], "model AlwaysDropout gives different logits for the same input"),
    # Data: what a folder holds, and what the photos hold.
    ("method/expected-gradients-too-many-photos", [*SMALL[:3], "method=expected_gradients", "method.n_references=15", "metric=[deletion]"], "method.n_references=15 but the photos hold out 14 reference photos; expected 1 to 14"),
    ("data/expected-gradients-folder-all-explained", [*SMALL[:2], *FOLDER, "method=expected_gradients", "metric=[deletion]"], "data.num_images=null explains every image of the folder; set data.num_images to leave at least 12 images"),
    ("data/expected-gradients-folder-too-few", [*SMALL[:2], *FOLDER, "data.num_images=1", "method=expected_gradients", "method.n_references=3", "metric=[deletion]"], "the method draws 3 reference images from the data's images after the first data.num_images=1: 3 images after the first 1 were asked for but data.root='{d}/data' has 2 images"),
    ("data/folder-skip-all", [*SMALL[:2], *FOLDER, "data.skip=2", *SMALL[3:]], "data.skip=2 but data.root='{d}/data' has 2 images; expected fewer than 2"),
    ("data/folder-fewer-images", [*SMALL[:2], *FOLDER, "data.num_images=100", *SMALL[3:]], "data.num_images=100 but data.root='{d}/data' has 2 images; expected 1 to 2"),
    ("data/photos-fewer-images", [*SMALL[:2], "data.num_images=100", *SMALL[3:]], "data.num_images=100; expected an integer in [1, 8] or null"),
    ("data/num-images-zero", [*SMALL[:2], *FOLDER, "data.num_images=0", *SMALL[3:]], "data.num_images=0; expected an integer >= 1 or null"),
    ("data/classes-outside", [*SMALL, *FOLDER, "data.classes={cat:0,dog:99}"], "data.classes maps 'dog' to 99, outside the model's 10 classes"),
    ("data/huge-image", [*SMALL, "data=image_folder", "data.root={d}/huge"], "image '{d}/huge/cat/big.png' is too large to decode safely"),
    # harness.inspect: its own settings against conf/inspect.yaml, its nodes as the harness's.
    ("inspect/typo-key-added", [*INSPECT, "+actmax.step=5"], "actmax.step is not a setting of harness.inspect; did you mean actmax.steps?"),
    ("inspect/typo-key", [*INSPECT, "actmax.step=5"], "actmax.step is not a setting; did you mean actmax.steps?"),
    ("inspect/top-level-added", [*INSPECT, "+imagse=3"], "imagse is not a setting of harness.inspect; did you mean images?"),
    ("inspect/channels-number", [*INSPECT, "actmax.channels=3"], "actmax.channels=3; expected a list"),
    ("inspect/steps-text", [*INSPECT, "actmax.steps=many"], "actmax.steps='many'; expected an integer"),
    ("inspect/enabled-text", [*INSPECT, "saliency.enabled=maybe"], "saliency.enabled='maybe'; expected true or false"),
    ("inspect/model-typo", [*INSPECT, "+model.widht=3"], "model.widht is not a setting of small_cnn; did you mean model.width?"),
    ("inspect/model-width", [*INSPECT, "model.width=0"], "model.width=0; expected an integer >= 1"),
    ("inspect/memory-budget", [*INSPECT, "device.memory_budget=0"], "device.memory_budget=0; expected a fraction of free memory in (0, 1]"),
]  # fmt: skip


def _left(folder: Path) -> list[Path]:
    return [p for name in RESULT_FILES for p in folder.rglob(name)] + list(folder.rglob(".*.tmp"))


@pytest.mark.parametrize("case, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_with_one_line_and_leaves_nothing(cli, files, tmp_path, case, args, message):
    args = [a.replace("{d}", str(files)) for a in args]
    message = message.replace("{d}", str(files))
    sweep = tmp_path / "sweep"
    given = [a for a in args if a.startswith(("hydra.sweep.dir=", "hydra.run.dir="))]
    if case.startswith("inspect/"):
        r = cli.run("harness.inspect", *args, f"out={tmp_path / 'inspect'}", path=[str(files)])
    else:
        r = cli.run(
            "harness", "-m", *args, *([] if given else [f"hydra.sweep.dir={sweep}"]), path=[str(files)]
        )
    assert r.returncode != 0, r.output
    assert "Traceback" not in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if message in ln]
    assert lines, f"{message!r} not in:\n{r.output}"
    assert len(lines[0]) < 600, lines[0]  # one line, not a dump
    assert _left(tmp_path) == [] and _left(files) == []
    for job in sweep.glob("*/") if sweep.is_dir() else []:  # a job that started and failed says why
        if (job / ".hydra").is_dir():
            assert (job / "error.txt").is_file(), sorted(p.name for p in job.iterdir())


def test_cases_number_at_least_a_hundred():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)


def test_report_refuses_a_file_as_output_and_a_missing_sweep(cli, files, tmp_path):
    r = cli.run("harness.report", str(files / "data"), "--out", str(files / "a_file"))
    assert r.returncode == 2 and f"--out {files / 'a_file'} is a file; expected a folder" in r.output
    r = cli.run("harness.report", str(tmp_path / "nosuch"))
    assert r.returncode == 2 and f"not a folder: {tmp_path / 'nosuch'}" in r.output
    assert "Traceback" not in r.output


def test_an_unexpected_error_is_one_line_and_its_traceback_goes_to_error_txt(cli, files, tmp_path):
    """A model whose forward raises in the middle of a job: one line on the console naming the error
    and where its traceback is, `error.txt` holding both, no result files, a non-zero exit.
    """
    r = cli.run(
        "harness", "-m", *CUSTOM, "model.builder=mynets_bad.Breaks", "data.num_images=2",
        f"hydra.sweep.dir={tmp_path}", path=[str(files)],
    )  # fmt: skip
    assert r.returncode == 1, r.output
    assert "RuntimeError: boom in the model (unexpected; the traceback is in" in r.output
    assert "Traceback" not in r.output
    (error,) = tmp_path.glob("*/error.txt")
    assert "boom in the model" in error.read_text() and "Traceback" in error.read_text()
    assert _left(tmp_path) == []


def test_ctrl_c_ends_the_sweep_with_how_to_resume_and_resume_finishes_it(cli, tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *SMALL[:3],
        "method=rise",
        "seed=0,1",
        "method.n_masks=3000",
        "metric=[deletion]",
        f"hydra.sweep.dir={sweep}",
    ]
    r = cli.run("harness", *args, cwd=tmp_path, interrupt_when="sweep/*/run.json")
    assert r.returncode == 130, r.output
    last = r.output.strip().splitlines()[-1]
    assert last == (
        "interrupted: finished jobs are kept; to finish the sweep, run python -m harness "
        f"<the same arguments> hydra.sweep.dir={sweep} resume=true"
    ), r.output
    assert "Traceback" not in r.output
    done = [p.parent.name for p in sweep.glob("*/run.json")]
    assert len(done) == 1 and not list(sweep.rglob(".*.tmp"))
    r = cli.run("harness", *args, "resume=true")
    assert r.returncode == 0, r.output
    assert f"sweep of 2 job(s) into {sweep}: 1 to run, 1 skipped" in r.output
    assert len(list(sweep.glob("*/run.json"))) == 2


def test_a_ctrl_c_that_lands_in_a_finaliser_still_ends_the_sweep(cli, files, tmp_path):
    """Python ignores an exception raised in a `__del__` (a progress bar's, say): a Ctrl-C landing
    there must still end the sweep, after the job it landed in, and say how to resume.
    """
    r = cli.run(
        "harness", "-m", *CUSTOM, "model.builder=mynets_bad.SwallowsCtrlC", "data.num_images=1",
        "seed=0,1", f"hydra.sweep.dir={tmp_path}", path=[str(files)],
    )  # fmt: skip
    assert r.returncode == 130, r.output
    assert r.output.strip().splitlines()[-1].startswith("interrupted: finished jobs are kept;"), r.output
    assert "Traceback" not in r.output and "Exception ignored" not in r.output
    assert len(list(tmp_path.glob("*/run.json"))) == 1


def test_an_error_that_a_ctrl_c_caused_inside_hydra_is_the_ctrl_c():
    """A Ctrl-C landing in OmegaConf's code while Hydra composes the next job's config comes out as
    a `ConfigCompositionException` raised while the `KeyboardInterrupt` was handled (seen with a
    timer sending SIGINT at random moments of `compose`): it ends the command as an interrupt,
    not as an error in the config that the user must look for.
    """
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigKeyError

    from harness.config import hydra_errors_in_one_line

    def composing() -> None:
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise AttributeError("'NoneType' object has no attribute '_invalidate_flags_cache'")  # noqa: B904
        except AttributeError as e:
            raise ConfigCompositionException("composing") from ConfigKeyError(str(e))

    with pytest.raises(KeyboardInterrupt):
        hydra_errors_in_one_line(composing)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_result_files_follow_the_umask(cli, tmp_path, umask, mode):
    r = cli.run("harness", "-m", *SMALL, f"hydra.sweep.dir={tmp_path}", umask=umask)
    assert r.returncode == 0, r.output
    written = [p for name in RESULT_FILES for p in tmp_path.rglob(name)]
    assert len(written) == len(RESULT_FILES)
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(mode)}


def test_resume_removes_stale_temporary_files(cli, tmp_path):
    r = cli.run("harness", "-m", *SMALL, f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 0, r.output
    (job,) = [p.parent for p in tmp_path.glob("*/run.json")]
    stale = [tmp_path / ".deletion.png.x1y2.tmp", job / ".curves.csv.a1b2.tmp"]
    for p in stale:
        p.write_text("left by a killed write")
    r = cli.run("harness", "-m", *SMALL, f"hydra.sweep.dir={tmp_path}", "resume=true")
    assert r.returncode == 0 and "1 skipped" in r.output, r.output
    assert [p for p in stale if p.exists()] == []
    row = json.loads((job / "run.json").read_text())
    assert row["method"] == "saliency"
