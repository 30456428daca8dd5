"""The CAM family (Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM, Score-CAM, Ablation-CAM, EigenCAM,
FullGrad) against pytorch-grad-cam, the library that defines them for most users, and on a
hand-built model whose evidence is known.

pytorch-grad-cam's maps are compared before its upsampling and min-max scaling (which it does on the
host with OpenCV): its own activations, gradients and `get_cam_image`, with the ReLU it applies, on
the same model, layer, inputs and targets. The batch, chunk and determinism tests of every method
(tests/test_methods.py) pick the family up from conf/method.
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam.base_cam
import pytorch_grad_cam.fullgrad_cam
import torch
import torchvision
from pytorch_grad_cam import (
    AblationCAM,
    FullGrad,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from torch import nn

import methods
from methods.cam import RULES, grad_cam_rule, layer_capture, layer_map
from methods.cam_forward import ablation_cam_at_layer, eigen_projection, score_cam_at_layer

REFERENCES = {
    "grad_cam_plus_plus": GradCAMPlusPlus,
    "xgrad_cam": XGradCAM,
    "layer_cam": LayerCAM,
    "hires_cam": HiResCAM,
}


def reference(name: str, model: nn.Module, layer: str, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's map at the layer's resolution, after its ReLU, `[B, h, w]`."""
    module = model.get_submodule(layer)
    cam = REFERENCES[name](model=model, target_layers=[module])
    targets = [ClassifierOutputTarget(int(c)) for c in t]
    try:
        out = cam.activations_and_grads(x)
        model.zero_grad()
        sum(target(o) for target, o in zip(targets, out, strict=True)).backward()
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        return np.maximum(cam.get_cam_image(x, module, targets, acts, grads, False), 0)
    finally:
        cam.activations_and_grads.release()


def _models() -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    from harness.models import efficientnet_lite0, small_cnn

    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    small = small_cnn(num_classes=5, input_size=32, width=8).module
    return {
        "small_cnn": (small, "features.4", torch.randn(4, 3, 32, 32, generator=g)),
        "resnet18": (resnet, "layer3", torch.randn(3, 3, 64, 64, generator=g)),
        "efficientnet_lite0": (efficientnet_lite0().module, "head", torch.randn(2, 3, 224, 224, generator=g)),
    }


MODELS = _models()


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_each_cam_equals_pytorch_grad_cam(name, model_name):
    model, layer, x = MODELS[model_name]
    t = torch.arange(len(x)) % 5
    ref = reference(name, model, layer, x, t)
    ours = layer_map(model, x, t, layer, "nchw", name)[:, 0].numpy()
    assert ours.shape == ref.shape and ref.max() > 0
    # Relative to the map's scale: float32 sums over the layer's channels in another order.
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), (name, model_name)


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
def test_score_cam_equals_pytorch_grad_cam(model_name):
    """pytorch-grad-cam's Score-CAM weights (one masked forward per channel) on its own activations,
    its weighted sum and ReLU, against ours at the layer's resolution, in chunks of 7 masked images.
    """
    model, layer, x = MODELS[model_name]
    t = torch.arange(len(x)) % 5
    module = model.get_submodule(layer)
    cam = ScoreCAM(model=model, target_layers=[module])
    targets = [ClassifierOutputTarget(int(c)) for c in t]
    try:
        with torch.no_grad():
            cam.activations_and_grads(x)
        acts = cam.activations_and_grads.activations[0].numpy()
        ref = np.maximum(cam.get_cam_image(x, module, targets, acts, None, False), 0)
    finally:
        cam.activations_and_grads.release()
    ours = score_cam_at_layer(model, x, t, layer, "nchw", chunk=7)[:, 0].numpy()
    assert ours.shape == ref.shape and ref.max() > 0
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), model_name


# torchcam 0.5's maps where they are the papers' (and pytorch-grad-cam's). Its GradCAMpp divides a copy
# of alpha (`alpha[idx][mask].div_`), so its alpha is g^2, not the paper's; its ScoreCAM scales each
# channel to [0, 1] before upsampling it, with corners not aligned, where the paper and pytorch-grad-cam
# scale after: neither is compared.
TORCHCAM = {"grad_cam": ("GradCAM", grad_cam_rule), "xgrad_cam": ("XGradCAM", RULES["xgrad_cam"]),
            "layer_cam": ("LayerCAM", RULES["layer_cam"])}  # fmt: skip


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(TORCHCAM))
def test_each_cam_equals_torchcams(name, model_name):
    from torchcam import methods as torchcam

    model, layer, x = MODELS[model_name]
    t = torch.arange(len(x)) % 5
    kind, rule = TORCHCAM[name]
    with getattr(torchcam, kind)(model, target_layer=layer, input_shape=tuple(x.shape[1:])) as extractor:
        (ref,) = extractor(class_idx=t.tolist(), scores=model(x), normalized=False)
    ours = torch.relu(rule(*layer_capture(model, model.get_submodule(layer), "nchw", x, t)))[:, 0]
    assert ours.shape == ref.shape and float(ref.max()) > 0
    # XGrad-CAM: torchcam adds 1e-8 to the channel's sum, pytorch-grad-cam (and we) 1e-7.
    torch.testing.assert_close(ours, ref.detach(), rtol=0, atol=1e-5 * float(ref.abs().max()))


def _unscaled(monkeypatch, module) -> None:
    """pytorch-grad-cam's maps without its min-max scaling and OpenCV resize (its `scale_cam_image`)."""
    monkeypatch.setattr(module, "scale_cam_image", lambda cam, target_size=None: cam)


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
def test_ablation_cam_equals_pytorch_grad_cam(model_name, monkeypatch):
    """Its relative drops of the target logit, one ablated copy per channel, on layers after a ReLU
    (where it writes 0 into the ablated channel, as the paper): the maps at the layer's resolution.
    """
    model, layer, x = MODELS[model_name]
    x = x[:2] if model_name == "small_cnn" else x[:1]
    t = torch.arange(len(x)) % 5 + 1
    _unscaled(monkeypatch, pytorch_grad_cam.base_cam)
    cam = AblationCAM(model=model, target_layers=[model.get_submodule(layer)])
    ref = cam(x, [ClassifierOutputTarget(int(c)) for c in t])
    ours = ablation_cam_at_layer(model, x, t, layer, "nchw", chunk=48)[:, 0].numpy()
    assert ours.shape == ref.shape and ref.max() > 0
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), model_name


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_eigen_projection_equals_pytorch_grad_cams_up_to_its_arbitrary_sign(model_name):
    """pytorch-grad-cam keeps whatever sign NumPy's SVD gives; ours agrees with the channels' mean."""
    model, layer, x = MODELS[model_name]
    with torch.no_grad():
        seen = []
        handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.append(out))
        model(x)
        handle.remove()
    a = seen[0]
    ref = torch.from_numpy(get_2d_projection(a.numpy()))
    ours = eigen_projection(a)[:, 0]
    for image in range(len(x)):
        sign = 1.0 if float((ours[image] * ref[image]).sum()) >= 0 else -1.0
        scale = float(ref[image].abs().max())
        torch.testing.assert_close(ours[image], sign * ref[image], rtol=0, atol=1e-5 * scale)
        assert float((ours[image] * a[image].mean(dim=0)).sum()) >= 0
    first, second = (methods.eigen_cam(model, x, torch.full((len(x),), c), layer=layer) for c in (0, 1))
    torch.testing.assert_close(first, second)  # the same map whatever the class


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
def test_full_grad_equals_pytorch_grad_cam(model_name, monkeypatch):
    """The input term and every bias term normalised and upsampled, summed (before its last min-max);
    ResNet-18's BatchNorm outputs are overwritten in place by the ReLU after them.
    """
    model, _, x = MODELS[model_name]
    t = torch.arange(len(x)) % 5
    _unscaled(monkeypatch, pytorch_grad_cam.fullgrad_cam)
    ref = FullGrad(model=model, target_layers=[])(x, [ClassifierOutputTarget(int(c)) for c in t])
    ours = methods.full_grad(model, x, t, chunk_size=2)[:, 0].numpy()
    assert ours.shape == ref.shape and ref.max() > 0
    # OpenCV's bilinear resize and torch's differ by ~6e-7 per term; there are up to 41 terms.
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), model_name


def naive_unit_sum(g: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """FullGrad's term as the paper and pytorch-grad-cam state it, one map at a time in float64: each
    |w_c g_c| shifted to 0 and divided by its range + 1e-7, summed over the channels."""
    b, c = g.shape[:2]
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
    out = torch.zeros(b, 1, *g.shape[2:], dtype=torch.float64)
    for image in range(b):
        for channel in range(c):
            m = (w[channel] * g[image, channel].double()).abs()
            out[image, 0] += (m - m.min()) / (m.max() - m.min() + 1e-7)
    return out


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_grad_terms_equal_a_naive_loop_in_every_layout(layout, dtype):
    """The compiled CPU passes (channels-last rows, contiguous planes) and torch's ops (any other
    layout): odd channel counts and sizes, a channel of bias 0 (its map adds nothing), a channel of
    one value (range 0), a gradient with no zero; an image's term is the same in any batch, exactly.
    """
    from methods.full_grad import _compiled, _unit_sum

    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 5, 7, 9), (2, 37, 13, 11), (4, 24, 16, 16), (1, 3, 1, 1), (2, 300, 5, 5)]:
        g = torch.randn(*shape, generator=gen, dtype=dtype)
        g[0, 1] = 0.25  # one value: range 0
        g[-1, 0] += 10.0  # no zero, all of one sign
        weight = torch.randn(shape[1], generator=gen, dtype=dtype)
        weight[2 % shape[1]] = 0.0
        if layout == "channels_last":
            g = g.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            g = torch.cat([g, g], dim=3)[..., ::2]
        assert (_compiled(g) is None) == (layout == "strided")
        for w in (None, weight):
            ours = _unit_sum(g, w)
            assert ours.dtype == dtype and ours.shape == (shape[0], 1, *shape[2:])
            ref = naive_unit_sum(g, w)
            tol = (1e-5 if dtype == torch.float32 else 1e-10) * shape[1]
            torch.testing.assert_close(ours.double(), ref, rtol=0, atol=tol)
            last = _unit_sum(g[-1:], w)
            assert torch.equal(last, ours[-1:]) or layout == "strided", (shape, w is None)


def test_full_grad_of_a_channels_last_model_is_the_contiguous_models():
    """The compiled passes over rows (channels-last) and over planes give one map, on EfficientNet-Lite0's
    blocks (16 to 1280 channels) at 64 pixels, folded as the CPU device runs it."""
    from harness.models import efficientnet_lite0
    from harness.runtime.speed import SpeedOptions

    model = efficientnet_lite0(input_size=64).module
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    SpeedOptions(fold_batchnorm=True, fold_padding=True).prepare(model, x)
    t = torch.tensor([1, 500, 999])
    plain = methods.full_grad(model, x, t)
    model.to(memory_format=torch.channels_last)
    last = methods.full_grad(model, x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(last, plain, rtol=0, atol=2e-5 * float(plain.abs().max()))


def test_channels_zero_everywhere_cost_no_forward_and_change_no_map(monkeypatch):
    """Score-CAM's mask of a dead channel is zero (one shared forward of the zeroed image); Ablation-CAM's
    zeroing of it changes nothing (weight 0, no forward): the maps are pytorch-grad-cam's, which
    forwards every channel, and the forwards are one per image and one per live channel.
    """
    from harness.runtime import count_forwards

    torch.manual_seed(0)
    model = methods_small_cnn()
    with torch.no_grad():  # channels 0-5 of the CAM layer dead for every input
        model.features[3].weight[:6] = 0
        model.features[3].bias[:6] = -1
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        live = (model.features(x).flatten(2).amax(dim=2) > 0).sum(dim=1)  # per image
    assert live.max() <= 10
    with count_forwards(model) as seen:
        ours = score_cam_at_layer(model, x, t, "features.4", "nchw", chunk=4)
    assert seen.forwards == 2 + int((live + 1).sum())
    with count_forwards(model) as seen:
        ablated = ablation_cam_at_layer(model, x, t, "features.4", "nchw", chunk=4)
    assert seen.forwards == 2 + int(live.sum())
    targets = [ClassifierOutputTarget(int(c)) for c in t]
    _unscaled(monkeypatch, pytorch_grad_cam.base_cam)
    for mine, ref in ((ours, ScoreCAM), (ablated, AblationCAM)):
        theirs = ref(model=model, target_layers=[model.features[4]])(x, targets)
        assert np.abs(mine[:, 0].numpy() - theirs).max() <= 1e-5 * np.abs(theirs).max(), ref.__name__


def methods_small_cnn() -> nn.Module:
    from harness.models import small_cnn

    return small_cnn(num_classes=5, input_size=32, width=8).module


class TwoRegions(nn.Module):
    """Channel c of `features` is the image's brightness inside region c only, and class c's logit is
    the mean of channel c: the evidence for class c lies in region c and nowhere else.
    """

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(2, 16, 16)
        mask[0, 2:6, 3:7] = 1
        mask[1, 10:14, 9:13] = 1
        self.register_buffer("mask", mask)
        # Decisive evidence: Score-CAM's softmax over the channels' scores needs logits far apart.
        self.gain = nn.Parameter(torch.tensor(400.0))
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.gain * x.sum(dim=1, keepdim=True) * self.mask).mean(dim=(2, 3))


@pytest.mark.parametrize("name", [*sorted(RULES), "score_cam", "ablation_cam", "full_grad"])
def test_each_cam_points_at_the_region_that_holds_the_class_evidence(name):
    """(EigenCAM is the same map for every class, by design: not here.)"""
    model = TwoRegions()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) + 0.1
    t = torch.tensor([0, 1])
    layer = {} if name == "full_grad" else {"layer": "features"}
    maps = getattr(methods, name)(model, x, t, **layer)[:, 0]
    for image, c in enumerate(t.tolist()):
        inside = float((maps[image] * model.mask[c]).sum() / maps[image].sum())
        assert inside > 0.999, (name, c, inside)


def test_a_token_layer_gives_the_map_of_its_grid():
    """A ViT-style `[B, 1 + h*w, C]` layer: the class token dropped, the tokens laid out as the grid;
    the same maps as of the grid's layer, for the CAMs of gradients, of ablations, of masks and EigenCAM.
    """

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 4, 4, stride=4)
            self.block = nn.Identity()
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.embed(x).flatten(2).transpose(1, 2)  # [B, 16, 4]
            tokens = self.block(torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1))
            return self.head(tokens[:, 1:].relu().mean(dim=1))

    torch.manual_seed(0)
    model, x, t = Tokens().eval(), torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    grid = layer_map(model, x, t, "embed", "nchw", "layer_cam")
    tokens = layer_map(model, x, t, "block", "tokens", "layer_cam")
    assert tokens.shape == grid.shape == (2, 1, 4, 4)
    torch.testing.assert_close(tokens, grid)
    # Ablation-CAM zeroes a channel in every token (the class token too, which this head ignores).
    ablated = [
        ablation_cam_at_layer(model, x, t, name, layout, 3)
        for name, layout in (("embed", "nchw"), ("block", "tokens"))
    ]
    torch.testing.assert_close(ablated[1], ablated[0])
    for name in ("eigen_cam", "score_cam"):
        maps = [
            getattr(methods, name)(model, x, t, layer=n, layout=lay)
            for n, lay in (("embed", "nchw"), ("block", "tokens"))
        ]
        torch.testing.assert_close(maps[1], maps[0])
