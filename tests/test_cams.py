"""The gradient CAM family (Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM) against pytorch-grad-cam, the
library that defines them for most users, and on a hand-built model whose evidence is known.

pytorch-grad-cam's maps are compared before its upsampling and min-max scaling (which it does on the
host with OpenCV): its own activations, gradients and `get_cam_image`, with the ReLU it applies, on
the same model, layer, inputs and targets. The batch, chunk and determinism tests of every method
(tests/test_methods.py) pick the family up from conf/method.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

import methods
from methods.cam import RULES, layer_map, score_cam_at_layer

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


@pytest.mark.parametrize("name", [*sorted(RULES), "score_cam"])
def test_each_cam_points_at_the_region_that_holds_the_class_evidence(name):
    model = TwoRegions()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) + 0.1
    t = torch.tensor([0, 1])
    maps = getattr(methods, name)(model, x, t, layer="features")[:, 0]
    for image, c in enumerate(t.tolist()):
        inside = float((maps[image] * model.mask[c]).sum() / maps[image].sum())
        assert inside > 0.999, (name, c, inside)


def test_a_token_layer_gives_the_map_of_its_grid():
    """A ViT-style `[B, 1 + h*w, C]` layer: the class token dropped, the tokens laid out as the grid."""

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
