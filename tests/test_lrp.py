"""LRP (methods.lrp) against the rule itself and against the libraries that define it: Captum's `LRP` on
a VGG-11 with the same rules, and zennit's own canonizers where the residual sums are modules
(torchvision's ResNet canonizer; `harness.versus.methods.zennit_lite_canonizer` for EfficientNet-Lite's
blocks).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import methods
from harness.versus.methods import zennit_lite_canonizer, zennit_lrp
from methods.lrp import NotHandled, lrp


def _rand(*shape: int, seed: int = 0, low: float = -1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (1 - low) * torch.rand(*shape, generator=g)


class _Residual(nn.Module):
    """A bias-free CNN with a residual sum and a global mean written as functions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = self.stem(x)
        h = self.pool(self.branch(h) + h)
        return self.fc(h.mean((2, 3)))


def _logit(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).gather(1, t[:, None])[:, 0]


def test_epsilon_relevance_sums_to_the_logit_on_a_bias_free_model_with_a_residual_sum():
    model = _Residual().eval()
    x, t = _rand(3, 3, 16, 16), torch.tensor([0, 1, 3])
    r = lrp(model, x, t, composite="epsilon", epsilon=1e-9)
    logit = _logit(model, x, t)
    assert r.shape == x.shape
    torch.testing.assert_close(r.sum((1, 2, 3)), logit, rtol=0, atol=1e-3 * float(logit.abs().max()))
    assert r.abs().sum() > 0


def test_the_residual_sum_splits_relevance_in_proportion_to_each_branch():
    """One layer, worked out by hand: `z = a + b` gives `a` the share `a / z` of `z`'s relevance."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
            with torch.no_grad():
                self.a.weight.copy_(torch.tensor([[1.0, 0.0]]))
                self.b.weight.copy_(torch.tensor([[0.0, 3.0]]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.a(x) + self.b(x)).view(-1, 1)

    x = torch.tensor([[2.0, 1.0]]).view(1, 2)
    r = lrp(Two(), x, torch.tensor([0]), composite="epsilon", epsilon=1e-9)
    # z = 2 + 3 = 5: the first input gets a's 2, the second b's 3.
    torch.testing.assert_close(r, torch.tensor([[2.0, 3.0]]), rtol=0, atol=1e-6)


def _vgg11() -> nn.Module:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(weights=None, num_classes=10).eval()
    for m in vgg.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # Captum's hooks need out-of-place activations
    return vgg


@pytest.fixture(scope="module")
def vgg11() -> nn.Module:
    return _vgg11()


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus"])
def test_equals_captums_lrp_on_vgg11_with_the_same_rules(vgg11, composite):
    """Captum's rules: epsilon everywhere (its default), or alpha1-beta0 (z+, which on inputs that are
    never negative is Captum's `Alpha1_Beta0_Rule`) for the convolutions and epsilon for the linear
    layers; the inputs are non-negative, pixel values in [0, 1], so that both define z+ alike. Captum
    gives the poolings a rule too: epsilon with zennit's stabiliser for the average (zennit's `Norm`),
    with a negligible one for the maximum (zennit passes its gradient). Epsilon is 0.01: at 1e-9 the
    rule divides by near-zero sums, where the two libraries' rounding differs by more than 1e-4.
    """
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule

    x, t = _rand(2, 3, 64, 64, seed=1, low=0.0), torch.tensor([3, 7])
    captum_model = _vgg11()
    for m in captum_model.modules():
        if isinstance(m, nn.Conv2d):
            m.rule = Alpha1_Beta0_Rule() if composite == "epsilon_plus" else EpsilonRule(epsilon=0.01)
        elif isinstance(m, nn.Linear):
            m.rule = EpsilonRule(epsilon=0.01)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            m.rule = EpsilonRule(epsilon=1e-6)
        elif isinstance(m, nn.MaxPool2d):
            m.rule = EpsilonRule(epsilon=1e-12)
    expected = LRP(captum_model).attribute(x, target=t).detach()
    got = lrp(vgg11, x, t, composite=composite, epsilon=0.01)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_equals_zennit_with_its_resnet_canonizer_on_resnet18():
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    with torch.no_grad():
        for m in resnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    x, t = _rand(2, 3, 64, 64, seed=2), torch.tensor([1, 8])
    expected = zennit_lrp(resnet, EpsilonPlusFlat(canonizers=[ResNetCanonizer()]), x, t)
    got = lrp(resnet, x, t, composite="epsilon_plus_flat")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_gamma_box"])
def test_equals_zennit_with_sum_layers_on_efficientnet_lite0(composite):
    from zennit import composites

    from harness.models import efficientnet_lite0

    clf = efficientnet_lite0(input_size=64)
    model, x, t = clf.module, _rand(2, 3, 64, 64, seed=4), torch.tensor([281, 967])
    mean, std = torch.tensor(clf.mean).view(1, 3, 1, 1), torch.tensor(clf.std).view(1, 3, 1, 1)
    pixel_range = (tuple(((0 - mean) / std).flatten().tolist()), tuple(((1 - mean) / std).flatten().tolist()))
    kinds = {
        "epsilon_plus_flat": lambda c: composites.EpsilonPlusFlat(canonizers=c),
        "epsilon_alpha2_beta1": lambda c: composites.EpsilonAlpha2Beta1(canonizers=c),
        "epsilon_gamma_box": lambda c: composites.EpsilonGammaBox(
            low=(0 - mean) / std, high=(1 - mean) / std, canonizers=c
        ),
    }
    expected = zennit_lrp(model, kinds[composite]([zennit_lite_canonizer()]), x, t)
    got = lrp(model, x, t, composite=composite, pixel_range=pixel_range)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_batch_and_chunk_do_not_change_the_relevance():
    model = _Residual().eval()
    x, t = _rand(5, 3, 16, 16, seed=6), torch.tensor([0, 1, 2, 3, 0])
    whole = lrp(model, x, t, chunk_size=8)
    for chunk in (1, 2, 3):
        torch.testing.assert_close(lrp(model, x, t, chunk_size=chunk), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(lrp(model, x[2:3], t[2:3]), whole[2:3], rtol=0, atol=1e-6)


def test_the_model_is_left_as_it_was():
    model = _Residual().eval()
    x, t = _rand(2, 3, 16, 16), torch.tensor([0, 1])
    before = model(x).detach()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lrp(model, x, t, composite="epsilon_gamma_box", pixel_range=((-1.0,) * 3, (1.0,) * 3))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


class _Gated(nn.Module):
    """Squeeze-and-excitation: a product of two tensors that depend on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.Sigmoid())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h = self.conv(x)
        return self.fc((h * self.gate(h)).mean((2, 3)))


class _Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


class _Misordered(nn.Module):
    """BatchNorm assigned right after the convolution but called after the ReLU that follows it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv, self.norm, self.relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(self.norm(self.relu(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (_Gated(), "a product of two tensors that depend on the input"),
        (_Normed(), "group_norm in module 'norm'"),
        (_Misordered(), "BatchNorm that does not follow the convolution or linear layer assigned before it"),
    ],
)
def test_a_model_it_cannot_handle_gets_one_clear_message(model, says):
    with pytest.raises(NotHandled, match="lrp cannot propagate relevance through") as e:
        lrp(model.eval(), _rand(1, 3, 8, 8), torch.tensor([0]))
    assert says in str(e.value)


def test_the_gate_message_names_the_call_and_the_module():
    with pytest.raises(NotHandled, match=r"\(Tensor.mul in module '_Gated'\)"):
        lrp(_Gated().eval(), _rand(1, 3, 8, 8), torch.tensor([0]))


def test_epsilon_gamma_box_needs_the_pixel_range():
    with pytest.raises(ValueError, match="needs pixel_range"):
        lrp(_Residual().eval(), _rand(1, 3, 8, 8), torch.tensor([0]), composite="epsilon_gamma_box")


def test_is_exported():
    assert methods.lrp is lrp


def test_z_plus_skips_its_negative_pass_where_a_layer_has_no_negative_input(vgg11):
    """On inputs in [0, 1] no convolution of VGG-11 sees a negative value, so z+ runs each one once
    with positive weights inside the backward, not twice as zennit's rule does; the relevance is
    zennit's to the last bit.
    """
    from torch.profiler import profile
    from zennit.composites import EpsilonPlus

    x, t = _rand(1, 3, 32, 32, seed=7, low=0.0), torch.tensor([2])
    expected = zennit_lrp(vgg11, EpsilonPlus(), x, t)
    lrp(vgg11, x, t, composite="epsilon_plus")  # the model's check, once
    with profile() as p:
        got = lrp(vgg11, x, t, composite="epsilon_plus")
    calls = sum(e.name == "aten::convolution" for e in p.events())
    convs = sum(isinstance(m, nn.Conv2d) for m in vgg11.modules())
    assert calls == 2 * convs  # the model's forward, and one z+ pass of each
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_rules_passes_are_noted_as_the_models_work_by_their_multiply_adds(vgg11):
    """On inputs in [0, 1], EpsilonPlus runs each convolution of VGG-11 again with positive weights
    and no layer's transpose twice: it notes the convolutions' share of the model's multiply-adds as
    forwards per image, and no backward; the epsilon rule everywhere notes nothing.
    """
    from methods.common import noting_passes

    macs = {"conv": 0, "linear": 0}

    def count(module, args, out):
        per_output = module.weight[0].numel()  # in/groups * kernel, or in_features
        macs["conv" if isinstance(module, nn.Conv2d) else "linear"] += out[0].numel() * per_output

    hooks = [m.register_forward_hook(count) for m in vgg11.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    x, t = _rand(3, 3, 32, 32, seed=8, low=0.0), torch.tensor([1, 2, 3])
    with torch.no_grad():
        vgg11(x[:1])
    for h in hooks:
        h.remove()
    share = macs["conv"] / (macs["conv"] + macs["linear"])
    with noting_passes() as noted:
        lrp(vgg11, x, t, composite="epsilon_plus", chunk_size=2)
    assert noted[0] == pytest.approx(3 * share, rel=1e-9) and noted[1] == 0
    with noting_passes() as noted:
        lrp(vgg11, x, t, composite="epsilon")
    assert noted == [0.0, 0.0]
