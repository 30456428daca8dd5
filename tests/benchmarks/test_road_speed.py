"""Benchmarks of ROAD's linear imputation on realistic masks (`make bench`); never part of `make test`.

A batch is one chunk of ROAD's default work: 16 (image, order, percentage) items at 224x224, each a
sample photo with a mask from the 9 percentages and both orders. The masks come from smooth maps (a 7x7
random grid upsampled bilinearly, like Grad-CAM or RISE: big connected holes, the hard case for the
solver) or from noisy maps (i.i.d. noise, like saliency), filled by either solver (`compiled`: numba
loops on the CPU; `torch`: batched tensor operations). Every timed function synchronises the device.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from harness.data import photos
from harness.models import small_cnn
from harness.runtime import machine_id, synchronize
from metrics.imputation import linear_fill
from metrics.road import road

ROUNDS = 10
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PERCENTAGES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def road_masks(kind: str, n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """`[n, size, size]` removal masks: item i removes PERCENTAGES[i % 9]% of a map, MoRF or LeRF."""
    g = torch.Generator().manual_seed(seed)
    if kind == "smooth":
        maps = F.interpolate(torch.rand(n, 1, 7, 7, generator=g), size=(size, size), mode="bilinear")
    else:
        maps = torch.rand(n, 1, size, size, generator=g)
    rank = maps.flatten(1).argsort(dim=1, descending=True).argsort(dim=1)
    masks = []
    for i in range(n):
        k = round(PERCENTAGES[i % 9] / 100 * size * size)
        morf = (i // 9) % 2 == 0
        masks.append(rank[i] < k if morf else rank[i] >= size * size - k)
    return torch.stack(masks).view(n, size, size)


def sample_photos(n: int, size: int = 224) -> torch.Tensor:
    """`[n, 3, size, size]` sample photos in [0, 1], repeated (and mirrored) to fill `n`."""
    base = photos(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).images
    return torch.cat([base, base.flip(-1)]).repeat(-(-n // 16), 1, 1, 1)[:n]


@pytest.mark.parametrize("solver", ["compiled", "torch"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["smooth", "noise"])
def test_linear_imputation(benchmark, kind, device, solver):
    if solver == "compiled" and device != "cpu":
        pytest.skip("the compiled solver runs on the CPU")
    images = sample_photos(16).to(device)
    removed = road_masks(kind, 16).to(device)
    benchmark.extra_info.update(
        machine=machine_id(), device=device, images=16, size=224, masks=kind, solver=solver
    )

    def run():
        out = linear_fill(images, removed, solver=solver)
        synchronize(torch.device(device))
        return out

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("device", DEVICES)
def test_road_small_cnn(benchmark, device):
    """The whole metric on a small model, where the imputation dominates: 4 images, 72 items."""
    clf = small_cnn(num_classes=10, input_size=64, width=16)
    model = clf.module.to(device)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)).clamp(-1, 1).to(device)
    maps = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
    target = torch.zeros(4, dtype=torch.long, device=device)
    benchmark.extra_info.update(machine=machine_id(), device=device, images=4, size=64)

    def run():
        torch.manual_seed(0)
        out = road(model, x, maps, target, mean=clf.mean, std=clf.std)
        synchronize(torch.device(device))
        return out

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
