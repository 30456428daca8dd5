"""`harness.inspect`: activation maximisation, the saliency figure, filter grids, feature maps and
occlusion against answers stated here, hooks never left behind, and bad input refused with one line.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from harness.config import HarnessError
from harness.inspect import pictures
from harness.inspect.actmax import Ascent, Objective, lp_penalty, maximise, penalty_gradient, total_variation
from harness.inspect.layers import class_index
from methods import guided_backprop, saliency
from tests.conftest import REPO, PatchDetector, run_cli

CPU = torch.device("cpu")
GREY = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # mean and std: pixels in [0, 1] to [-2, 2]


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def _stripes(side: int, period: int) -> torch.Tensor:
    """Vertical stripes of the given period: columns of +1 and -1, half a period each."""
    row = torch.where(torch.arange(side) % period < period // 2, 1.0, -1.0)
    return row.view(1, side).expand(side, side)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.mark.parametrize(
    "settings",
    [Ascent(steps=100), Ascent(steps=100, lp_weight=1e-4, tv_weight=0.05, blur_every=4, blur_sigma=0.5)],
    ids=["plain", "regularised"],
)
def test_activation_maximisation_draws_the_filters_pattern(settings):
    """A convolution whose receptive field is the whole image, its filters vertical and horizontal
    stripes of period 4: the ascent draws the stripes, and the unit's output rises tenfold or more.
    """
    side = 16
    pattern = _stripes(side, 4)
    conv = nn.Conv2d(3, 2, side, bias=False)
    with torch.no_grad():
        conv.weight[0] = pattern.expand(3, side, side)
        conv.weight[1] = pattern.T.expand(3, side, side)
    objective = Objective(nn.Sequential(conv), "0", *GREY)
    images, start, end = maximise(objective, [0, 1], side, settings, CPU)
    for unit, expected in enumerate([pattern, pattern.T]):
        assert _correlation(images[unit].mean(dim=0), expected) >= 0.8
        assert end[unit] >= 10 * abs(start[unit]) and end[unit] > 0
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("p", [6.0, 3.0, 2.5])
def test_the_penalties_gradient_is_autograds(p):
    x = torch.rand(3, 3, 9, 11, generator=torch.Generator().manual_seed(0), requires_grad=True)
    settings = Ascent(lp=p, lp_weight=0.3, tv_weight=0.7)
    (0.3 * lp_penalty(x, p) + 0.7 * total_variation(x)).sum().backward()
    torch.testing.assert_close(penalty_gradient(x.detach(), settings), x.grad, atol=1e-6, rtol=1e-5)


def test_channels_optimised_together_give_the_images_of_each_alone(small_cnn):
    """Same seed, every regulariser on (jitter, scale, blur, Lp, TV): one batch, chunks of two, or
    one channel at a time give the same images; so do output classes.
    """
    model = small_cnn.module.eval()
    settings = Ascent(steps=12, jitter=2, blur_every=3, scale_every=4, lp_weight=1e-3, tv_weight=0.01, seed=3)
    for layer, units in (("features.3", [0, 5, 7]), (None, [1, 4])):
        objective = Objective(model, layer, small_cnn.mean, small_cnn.std)
        together, start, end = maximise(objective, units, 32, settings, CPU)
        chunks, _, _ = maximise(objective, units, 32, settings, CPU, chunk_size=2)
        alone = torch.cat([maximise(objective, [u], 32, settings, CPU)[0] for u in units])
        # Up to rounding: the convolutions round differently with the batch size (1e-6 per step here).
        torch.testing.assert_close(together, alone, atol=1e-3, rtol=0)
        torch.testing.assert_close(together, chunks, atol=1e-3, rtol=0)
        assert (end > start).all()
    assert _hooks(model) == 0


class FlippedConv(nn.Conv2d):
    """Uses its filters in reverse order: computing only some rows of its weight would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.flip(0), self.bias.flip(0))


@pytest.mark.parametrize(
    ("layer", "narrow"),
    [("1", True), ("3", True), ("6", True), ("2", False), ("4", False), ("7", False)],
)
def test_the_objective_computes_only_the_channels_asked_for_and_equals_the_whole_layer(layer, narrow):
    """A conv (no groups) or linear target runs only the chunk's channels, with the objective and its
    gradient those of the whole layer's output; grouped convs, other modules and a conv whose forward
    mixes its filters run whole (the first call's check finds the latter)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, stride=2), nn.Conv2d(12, 12, 3, groups=4),
        nn.Conv2d(12, 6, 1), FlippedConv(6, 6, 1), nn.Flatten(), nn.Linear(6 * 9 * 9, 9), nn.ReLU(),
    ).eval()  # fmt: skip
    units = torch.tensor([4, 0, 4, 5, 1, 2, 3, 5, 0, 1])  # two groups: 8 images, then 2
    pixels = torch.rand(10, 3, 24, 24)

    def reference(x: torch.Tensor) -> torch.Tensor:  # the layer's whole output, by hand
        h = (x - 0.5) / 0.25
        for name, m in model.named_children():
            h = m(h)
            if name == layer:
                break
        out = h[torch.arange(10), units]
        return out.flatten(1).mean(1) if out.dim() > 1 else out

    objective = Objective(model, layer, *GREY)
    a = pixels.clone().requires_grad_(True)
    got = objective(a, units)
    got.sum().backward()
    assert objective.narrow is narrow
    b = pixels.clone().requires_grad_(True)
    want = reference(b)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    assert _hooks(model) == 0


def test_the_saliency_panels_are_the_harness_methods_for_the_class_asked_for(small_cnn, images):
    model = small_cnn.module.eval()
    with torch.no_grad():
        least = model(images).argmin(dim=1)  # a class that is not the top-1
    panels = pictures.saliency_panels(model, images, least)
    torch.testing.assert_close(panels["plain"], saliency(model, images, least))
    torch.testing.assert_close(panels["guided"], guided_backprop(model, images, least))
    torch.testing.assert_close(panels["guided_max"], panels["guided"].abs().amax(dim=1))
    torch.testing.assert_close(panels["plain_max"], panels["plain"].amax(dim=1))
    assert _hooks(model) == 0


def test_filter_tiles_are_the_weights_after_the_stated_normalisation():
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 6, 5))
    w = conv.weight.detach()
    tiles = pictures.filter_tiles(model, "0", max_filters=3, max_channels=8, normalise="tile")
    assert tiles.shape == (3, 3, 3, 3)  # RGB tiles [F, kh, kw, 3]
    for f in range(3):
        rgb = w[f].permute(1, 2, 0)
        np.testing.assert_allclose(tiles[f], ((rgb - rgb.min()) / (rgb.max() - rgb.min())).numpy(), atol=1e-6)
    whole = pictures.filter_tiles(model, "0", max_filters=4, max_channels=8, normalise="layer")
    np.testing.assert_allclose(
        whole, ((w - w.min()) / (w.max() - w.min())).permute(0, 2, 3, 1).numpy(), atol=1e-6
    )
    grey = pictures.filter_tiles(model, "2", max_filters=5, max_channels=2, normalise="tile")
    w2 = model[2].weight.detach()[:5, :2]
    assert grey.shape == (5, 2, 5, 5)  # one tile per (filter, input channel)
    lo, hi = w2.amin(dim=(2, 3), keepdim=True), w2.amax(dim=(2, 3), keepdim=True)
    np.testing.assert_allclose(grey, ((w2 - lo) / (hi - lo)).numpy(), atol=1e-6)
    with pytest.raises(HarnessError, match=r"layer '1' is a ReLU, not a convolution; .*: 0, 2"):
        pictures.filter_tiles(model, "1", 4, 4, "tile")


def test_feature_maps_are_the_layers_outputs_and_no_hook_stays(small_cnn, images):
    model = small_cnn.module.eval()
    maps = pictures.feature_maps(model, images[:2], ["features.0", "features.4"], max_channels=3)
    with torch.no_grad():
        first = model.features[0](images[:2])
        fourth = model.features[:5](images[:2])
    np.testing.assert_allclose(maps["features.0"], first[:, :3].numpy(), atol=1e-6)
    np.testing.assert_allclose(maps["features.4"], fourth[:, :3].numpy(), atol=1e-6)
    with pytest.raises(HarnessError, match="unknown layer 'nope'"):
        pictures.feature_maps(model, images, ["features.0", "nope"], 3)  # the first hook was added
    pictures.top_k(model, images, 3)
    assert _hooks(model) == 0


def test_occlusion_heatmap_is_the_right_way_round():
    """Only a patch at the top right matters: the heat is there, not transposed or flipped."""
    model = PatchDetector(slice(0, 8), slice(24, 32), gain=8.0)
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 0:8, 24:32] = 1.0
    heat = pictures.occlusion_map(model, x, torch.tensor([1]), window=8, stride=8, baseline=0.0)
    assert heat.shape == (1, 32, 32)
    assert heat[0, 0:8, 24:32].min() > 0.1 and np.abs(heat[0, 8:, :24]).max() < 1e-6
    assert heat[0, 0:8, 24:32].mean() > 10 * np.abs(heat[0, 24:32, 0:8]).mean() + 1e-9


def test_a_class_is_found_by_index_or_by_one_name():
    names = ["tabby cat", "tiger cat", "Persian cat", "dog"]
    assert class_index(3, names) == 3 and class_index("3", names) == 3 and class_index("Dog", names) == 3
    assert class_index("persian", names) == 2
    with pytest.raises(HarnessError, match=r"class 'cat' matches 3 class names \(0: tabby cat, 1: tiger cat"):
        class_index("cat", names)
    with pytest.raises(HarnessError, match="class 'zebra' matches no class name"):
        class_index("zebra", names)
    with pytest.raises(HarnessError, match="class 7 is out of range: expected an integer from 0 to 3"):
        class_index(7, names)


def _inspect(*args: str) -> subprocess.CompletedProcess:
    return run_cli("harness.inspect", "model=small_cnn", "device=cpu", *args)


@pytest.mark.slow
def test_inspect_writes_every_figure_with_its_arrays_and_settings(tmp_path):
    out = tmp_path / "inspect"
    r = _inspect(f"out={out}", "images=2", "actmax.steps=30", "saliency.target=3", "actmax.classes=[1]")
    assert r.returncode == 0, r.stderr
    stems = sorted(p.stem for p in out.glob("*.png"))
    assert stems == sorted(
        ["actmax_classes", "actmax_features.3", "features_features.3", "filters_features.0", "occlusion",
         "saliency_chelsea", "saliency_coffee", "top_k", "weights"]
    )  # fmt: skip
    for stem in stems:
        assert (out / f"{stem}.npz").is_file() and json.loads((out / f"{stem}.json").read_text())["figure"]
    # The saliency panels are the methods' maps for class 3, whatever the top-1.
    from harness.data import photos
    from harness.models import small_cnn

    clf = small_cnn(seed=0)
    x = photos(size=32, mean=clf.mean, std=clf.std, num_images=2).images
    saved = np.load(out / "saliency_coffee.npz")
    target = torch.tensor([3, 3])
    np.testing.assert_allclose(saved["plain"][0], saliency(clf.module, x, target)[1].numpy(), atol=1e-5)
    np.testing.assert_allclose(
        saved["guided"][0], guided_backprop(clf.module, x, target)[1].numpy(), atol=1e-5
    )
    assert json.loads((out / "saliency_coffee.json").read_text())["target"] == 3
    actmax = np.load(out / "actmax_features.3.npz")
    assert actmax["images"].shape == (16, 3, 32, 32) and (actmax["end"] > actmax["start"]).all()


@pytest.mark.slow
def test_a_convolution_before_a_batchnorm_is_shown_and_maximised_as_it_is(tmp_path):
    """The device folds BatchNorms into convolutions for speed, but not the layer inspected: its
    feature maps and the objective at the start of the ascent are that convolution's own output
    (before its BatchNorm) on the model as loaded.
    """
    from harness.data import photos
    from harness.inspect.actmax import _generator
    from harness.models import torchvision_classifier

    out, layer, weights = tmp_path / "inspect", "layer1.0.conv1", tmp_path / "resnet18.pt"
    torch.manual_seed(0)
    model = torchvision_classifier("resnet18").module.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics far from the identity of a fresh model
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(-1.5, 1.5)
    torch.save(model.state_dict(), weights)
    r = run_cli(
        "harness.inspect", "model=torchvision", "model.arch=resnet18", f"model.weights={weights}",
        "device=cpu", f"out={out}",
        "images=1", "saliency.enabled=false", "filters.enabled=false", "occlusion.enabled=false",
        "weights.enabled=false", "top_k.enabled=false", f"features.layers=[{layer}]",
        f"actmax.layer={layer}", "actmax.channels=[0,5]", "actmax.steps=1", "actmax.size=64",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    clf = torchvision_classifier("resnet18", weights=str(weights))
    model, conv = clf.module.eval(), clf.module.get_submodule(layer)
    x = photos(size=224, mean=clf.mean, std=clf.std, num_images=1).images
    own: list[torch.Tensor] = []
    handle = conv.register_forward_hook(lambda _m, _i, o: own.append(o))
    with torch.no_grad():
        model(x)
        starts = []
        for unit in (0, 5):
            noise = (0.5 + 0.01 * torch.randn(3, 64, 64, generator=_generator(0, unit))).clamp(0, 1)
            model(
                ((noise - torch.tensor(clf.mean).view(3, 1, 1)) / torch.tensor(clf.std).view(3, 1, 1))[None]
            )
            starts.append(float(own[-1][0, unit].mean()))
    handle.remove()
    np.testing.assert_allclose(
        np.load(out / f"features_{layer}.npz")["maps"][0], own[0][0, :16].numpy(), atol=1e-4
    )
    np.testing.assert_allclose(np.load(out / f"actmax_{layer}.npz")["start"], starts, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["actmax.layer=nope"],
         "unknown layer 'nope'; the model's convolution layers: features.0, features.3"),
        (["actmax.channels=[0,99]"],
         "actmax.channels: layer 'features.3' has 32 channels; channel 99 is out of range: expected an "
         "integer from 0 to 31"),
        (["actmax.classes=[zebra]"], "class 'zebra' matches no class name of the model"),
        (["saliency.target=12"], "class 12 is out of range: expected an integer from 0 to 9"),
        (["filters.layer=features.1"],
         "layer 'features.1' is a ReLU, not a convolution; filter grids need one of: features.0, features.3"),
        (["filters.normalise=global"], "filters.normalise='global'; expected 'tile' or 'layer'"),
        (["occlusion.window=10"], "occlusion.window=10, occlusion.stride=10 do not tile the 32-pixel input"),
        (["actmax.steps=0"], "actmax.steps=0; expected a positive integer"),
        (["device.fold_padding=abc"], "device.fold_padding='abc'; expected true or false"),
        (["+model.widht=3"], "model.widht is not a setting of small_cnn; did you mean model.width?"),
    ],
)  # fmt: skip
def test_bad_input_exits_with_one_line_and_leaves_nothing(tmp_path, args, message):
    out = tmp_path / "runs" / "inspect"
    r = _inspect(f"out={out}", *args)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not list((tmp_path / "runs").iterdir())  # no partial folder either


@pytest.mark.slow
def test_a_class_name_matching_several_is_refused(tmp_path):
    out = tmp_path / "inspect"
    r = subprocess.run(
        [sys.executable, "-m", "harness.inspect", "device=cpu", f"out={out}", "saliency.target=terrier"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (
        r.returncode == 1
        and "class 'terrier' matches" in r.stderr
        and "give the index or the full name" in r.stderr
    )
    assert not out.exists()
