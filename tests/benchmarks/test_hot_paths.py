"""Benchmarks of our hot paths (`make bench`); never part of `make test`.

Small sizes on CPU, larger ones on CUDA. Every timed function synchronises the device before it
returns, so that queued kernels are inside the timer. The machine's name (CPU model, cores, GPU)
is in each run's `extra_info` and in the folder its baseline is saved to.
"""

from __future__ import annotations

import pytest
import torch

import methods
from harness.models import small_cnn, torchvision_classifier
from harness.runtime import machine_id, synchronize
from metrics import deletion, insertion

# Many rounds: on a shared CPU the speed drifts between runs; the median needs them.
ROUNDS = 15
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def setting(device: str):
    """Model, images, targets: a small CNN on CPU, ResNet-50 (random weights) at 224 on CUDA."""
    if device == "cpu":
        clf = small_cnn(num_classes=10, input_size=64, width=16)
        n = 8
    else:
        clf = torchvision_classifier("resnet50", "layer4", input_size=224)
        n = 32
    model = clf.module.to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, clf.input_size, clf.input_size, generator=g).to(device)
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target, clf.cam_layer


CALLS = {
    "saliency": lambda m, x, t, layer: methods.saliency(m, x, t, chunk_size=8),
    "integrated_gradients": lambda m, x, t, layer: methods.integrated_gradients(
        m, x, t, n_steps=16, chunk_size=32
    ),
    "grad_cam": lambda m, x, t, layer: methods.grad_cam(m, x, t, layer=layer, chunk_size=8),
    "occlusion": lambda m, x, t, layer: methods.occlusion(
        m, x, t, window=x.shape[-1] // 4, stride=x.shape[-1] // 8, chunk_size=32
    ),
    "rise": lambda m, x, t, layer: methods.rise(m, x, t, n_masks=64, chunk_size=32),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CALLS))
def test_method(benchmark, name, device):
    model, x, target, layer = setting(device)
    call = CALLS[name]
    benchmark.extra_info.update(machine=machine_id(), device=device, images=len(x))

    def run():
        torch.manual_seed(0)
        out = call(model, x, target, layer)
        synchronize(torch.device(device))
        return out

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", [deletion, insertion], ids=["deletion", "insertion"])
def test_curve(benchmark, metric, device):
    model, x, target, _ = setting(device)
    maps = torch.rand(len(x), 1, *x.shape[2:], generator=torch.Generator().manual_seed(1)).to(device)
    benchmark.extra_info.update(machine=machine_id(), device=device, images=len(x), steps=28)

    def run():
        out = metric(model, x, maps, target, steps=28, chunk_size=32)
        synchronize(torch.device(device))
        return out

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("device", DEVICES)
def test_activation_maximisation(benchmark, device):
    """`harness.inspect`'s ascent: 8 channels (32 on CUDA) of the model's middle convolution, 20 steps
    with every regulariser on, in one chunk, the forward stopped before the layer."""
    from harness.inspect.actmax import Ascent, Objective, maximise
    from harness.inspect.layers import conv_layers

    model, x, _, _ = setting(device)
    for p in model.parameters():
        p.requires_grad_(False)
    convs = conv_layers(model)
    objective = Objective(model, convs[len(convs) // 2], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    units = list(range(8 if device == "cpu" else 32))
    settings = Ascent(steps=20, jitter=4, blur_every=4, lp_weight=1e-4, tv_weight=0.05)
    benchmark.extra_info.update(machine=machine_id(), device=device, images=len(units), steps=settings.steps)

    def run():
        out = maximise(objective, units, x.shape[-1], settings, torch.device(device))
        synchronize(torch.device(device))
        return out

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)
