"""DeepLIFT's rescale pass (methods.deeplift) against Captum's `DeepLift` and `DeepLiftShap`, the
library that defines them for most users, and against the rule itself on models small enough to
work out by hand.

Captum 0.9 reads the wrong gradient where one hooked nonlinearity feeds another directly (a ReLU
into a max pooling: the ReLU's hook reads the pooling's output gradient before the pooling's own
hook rewrites it; captum issue 1104, fixed upstream after 0.9 in pull request 1843). On such a
model the oracle is Captum on a copy with a `Clone` between the two, where its hooks see the
right gradient; the rescale pass gives the same map with or without the `Clone`. Captum also needs
one module per call site: the ResNet-18 copy for Captum has its own ReLU per call.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torchvision
from captum.attr import DeepLift, DeepLiftShap
from torch import nn
from torchvision.models.resnet import BasicBlock

import methods
from methods.rescale import NotCovered, rescale


class Clone(nn.Module):
    """A new tensor between two hooked nonlinearities, so that Captum's hooks read the right gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.clone()


def _own_relus(block: BasicBlock) -> None:
    """torchvision's BasicBlock calls `self.relu` twice; Captum's DeepLift needs a module per call."""
    block.relu2 = nn.ReLU()

    def forward(self: BasicBlock, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + identity)

    block.forward = types.MethodType(forward, block)


def _models() -> dict[str, tuple[nn.Module, nn.Module, torch.Tensor]]:
    """Per model: the model, Captum's copy of it (the same weights), and inputs."""
    from harness.models import efficientnet_lite0, small_cnn

    g = torch.Generator().manual_seed(5)
    small = small_cnn(num_classes=5, input_size=32, width=8).module
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in resnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    captum_resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    captum_resnet.load_state_dict(resnet.state_dict())
    captum_resnet.relu = nn.Sequential(nn.ReLU(), Clone())
    for block in captum_resnet.modules():
        if isinstance(block, BasicBlock):
            _own_relus(block)
    f = small.features  # a Clone between the ReLU and the max pooling
    small_for_captum = _SmallWithClone(small, nn.Sequential(f[0], f[1], Clone(), f[2], f[3], f[4]))
    lite = efficientnet_lite0(input_size=64).module
    return {
        "small_cnn": (small, small_for_captum, torch.randn(4, 3, 32, 32, generator=g)),
        "resnet18": (resnet, captum_resnet, torch.randn(3, 3, 64, 64, generator=g)),
        "efficientnet_lite0": (lite, lite, torch.randn(2, 3, 64, 64, generator=g)),
    }


class _SmallWithClone(nn.Module):
    def __init__(self, small: nn.Module, features: nn.Module) -> None:
        super().__init__()
        self.features, self.classifier = features, small.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(self.features(x).mean(dim=(2, 3)))


MODELS = _models()


def _captum(
    explainer: type, model: nn.Module, x: torch.Tensor, t: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return explainer(model).attribute(x, b, target=t).detach()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deeplift_equals_captums(name):
    model, for_captum, x = MODELS[name]
    t = torch.arange(len(x)) % 5
    ours = rescale(model, x, t, torch.zeros_like(x[:1]), chunk=16)
    ref = _captum(DeepLift, for_captum, x, t, torch.zeros_like(x))
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * scale)
    # The method itself takes the rescale pass on these models (no fallback to Captum).
    torch.testing.assert_close(methods.deeplift(model, x, t, chunk_size=3), ours, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deeplift_shap_equals_captums(name):
    model, for_captum, x = MODELS[name]
    x, t = x[:2], torch.tensor([1, 3])
    baselines = torch.randn((3, *x.shape[1:]), generator=torch.Generator().manual_seed(1))
    ours = rescale(model, x, t, baselines, chunk=16)
    ref = _captum(DeepLiftShap, for_captum, x, t, baselines)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_the_pass_is_the_rule_on_a_model_worked_out_by_hand():
    """y = w2 . relu(w1 x + c): DeepLIFT from x0 = 0 gives x * w1 * w2 * (relu(z) - relu(c)) / (z - c)
    per input, summing to y(x) - y(0) (the rule's completeness); a call of `torch.relu` as a function
    and one module used twice are rescaled as well.
    """
    torch.manual_seed(0)
    w1, c, w2 = torch.randn(6), torch.randn(()), torch.randn(())

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = (x * w1).sum(dim=1, keepdim=True) + c
            hidden = self.act(torch.relu(z))  # the second ReLU changes nothing; used as a function
            return self.act(hidden * w2) - self.act(-hidden * w2)  # one module twice: w2 * hidden

    x = torch.randn(5, 6)
    z = (x * w1).sum(dim=1, keepdim=True) + c
    expected = x * w1 * w2 * (torch.relu(z) - torch.relu(c)) / (z - c)
    net = Net()
    got = rescale(net, x, torch.zeros(5, dtype=torch.long), torch.zeros(1, 6), chunk=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=1), (net(x) - net(torch.zeros(1, 6)))[:, 0], rtol=1e-5, atol=1e-6)


def test_a_model_the_pass_does_not_cover_gets_captums_path_and_says_why(caplog):
    """A softmax inside the model (an attention, say) is not covered: the method gives Captum's map."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.softmax(self.proj(x), dim=1) * x)

    torch.manual_seed(0)
    model, x, t = Attention().eval(), torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(NotCovered, match="softmax"):
        rescale(model, x, t, torch.zeros(1, 4), chunk=4)
    with caplog.at_level("INFO", logger="harness"):
        got = methods.deeplift(model, x, t)
    assert "deeplift: Captum's path for Attention: it calls softmax" in caplog.text
    torch.testing.assert_close(got, _captum(DeepLift, model, x, t, torch.zeros_like(x)))


@pytest.mark.parametrize("k", [1, 3])
def test_batch_and_chunk_do_not_change_the_map(k):
    model, _, x = MODELS["small_cnn"]
    t = torch.arange(len(x)) % 5
    baselines = torch.randn((k, *x.shape[1:]), generator=torch.Generator().manual_seed(2))
    whole = rescale(model, x, t, baselines, chunk=64)
    for chunk in (1, k, 2 * k + 1):
        torch.testing.assert_close(rescale(model, x, t, baselines, chunk=chunk), whole, rtol=0, atol=1e-7)
    alone = torch.cat(
        [rescale(model, x[i : i + 1], t[i : i + 1], baselines, chunk=64) for i in range(len(x))]
    )
    torch.testing.assert_close(alone, whole, rtol=0, atol=1e-7)


def test_every_forward_but_the_last_holds_exactly_the_chunk_of_image_baseline_pairs():
    """Pairs are forwarded `chunk` at a time across images (5 baselines, chunks of 2 and 3: a chunk
    holds pairs of two images); the map is the same as in one forward.
    """
    model, _, x = MODELS["small_cnn"]
    t = torch.arange(len(x)) % 5
    baselines = torch.randn((5, *x.shape[1:]), generator=torch.Generator().manual_seed(3))
    whole = rescale(model, x, t, baselines, chunk=64)
    pairs = len(x) * len(baselines)  # 20
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda _m, args: sizes.append(len(args[0])) if torch.is_grad_enabled() else None
    )
    try:
        for chunk, expected in ((2, [2] * 10), (3, [3] * 6 + [2])):
            sizes.clear()
            grouped = rescale(model, x, t, baselines, chunk=chunk)
            assert sizes == expected and sum(sizes) == pairs
            torch.testing.assert_close(grouped, whole, rtol=0, atol=1e-7)
    finally:
        handle.remove()


def test_nonlinearities_with_settings_equal_captums():
    """`nn.Softplus` passes beta and threshold by position, `nn.ELU` alpha by name: both kept."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 5),
        nn.Softplus(beta=3.0, threshold=1.0),
        nn.Linear(5, 3),
        nn.ELU(alpha=0.5),
        nn.Linear(3, 2),
    ).eval()
    x, t = torch.randn(4, 6), torch.tensor([0, 1, 0, 1])
    ref = _captum(DeepLift, model, x, t, torch.zeros_like(x))
    ours = rescale(model, x, t, torch.zeros(1, 6), chunk=8)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
