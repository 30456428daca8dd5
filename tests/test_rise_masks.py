"""RISE's masks against the authors' code (github.com/eclique/RISE, explanations.py,
generate_masks): each grid resized with skimage's resize(order=1, mode='reflect',
anti_aliasing=False) to (s + 1) * ceil(size / s) pixels and cropped at the shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.transform import resize

from methods.perturbation import rise_masks


def _authors_masks(grids: np.ndarray, shifts: np.ndarray, size: tuple[int, int], s: int) -> np.ndarray:
    cell_size = np.ceil(np.array(size) / s)
    up_size = (s + 1) * cell_size
    masks = np.empty((len(grids), *size))
    for i, (x, y) in enumerate(shifts):
        up = resize(grids[i], up_size, order=1, mode="reflect", anti_aliasing=False)
        masks[i] = up[x : x + size[0], y : y + size[1]]
    return masks


@pytest.mark.parametrize(
    ("size", "s"),
    [((224, 224), 7), ((32, 32), 7), ((30, 40), 4), ((32, 32), 4), ((17, 9), 3), ((8, 8), 2), ((10, 6), 1)],
)
def test_masks_equal_skimage_resize_reflect(size: tuple[int, int], s: int) -> None:
    rng = np.random.default_rng(sum(size) * 10 + s)
    n = 40
    grids = (rng.random((n, s, s)) < 0.5).astype("float32")
    cells = np.ceil(np.array(size) / s).astype(int)
    shifts = np.stack([rng.integers(0, cells[0], n), rng.integers(0, cells[1], n)], axis=1)
    # Every shift at least once at the extremes, where the mirrored border cells show.
    shifts[0], shifts[1] = (0, 0), cells - 1
    expected = _authors_masks(grids, shifts, size, s)
    got = rise_masks(torch.from_numpy(grids), torch.from_numpy(shifts).long(), size, s)
    assert got.shape == (n, 1, *size) and got.dtype == torch.float32
    assert np.abs(got[:, 0].numpy() - expected).max() < 1e-5


def test_all_ones_grid_gives_all_ones() -> None:
    grids = torch.ones(3, 7, 7)
    shifts = torch.tensor([[0, 0], [31, 31], [5, 17]])
    m = rise_masks(grids, shifts, (224, 224), 7)
    torch.testing.assert_close(m, torch.ones(3, 1, 224, 224), rtol=0, atol=1e-6)


def test_values_lie_in_unit_interval() -> None:
    g = torch.Generator().manual_seed(0)
    grids = (torch.rand(64, 5, 5, generator=g) < 0.5).float()
    shifts = torch.randint(0, 7, (64, 2), generator=g)
    m = rise_masks(grids, shifts, (33, 31), 5)
    assert m.min() >= 0.0 and m.max() <= 1.0


def test_border_mirrors_without_repeating_the_edge_cell() -> None:
    # Only the corner cell kept: at pixel 0 (coordinate -5/12 on the 2x2 grid) mode 'reflect'
    # reads cell 1 with weight 5/12, so the corner pixel is (7/12)^2, not 1 as an edge clamp gives.
    grid = torch.zeros(1, 2, 2)
    grid[0, 0, 0] = 1.0
    m = rise_masks(grid, torch.tensor([[0, 0]]), (8, 8), 2)[0, 0]
    assert abs(float(m[0, 0]) - (7 / 12) ** 2) < 1e-6
    assert abs(float(m[-1, -1]) - 0.0625) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_on_the_device_equal_the_cpu_ones() -> None:
    g = torch.Generator().manual_seed(1)
    grids = (torch.rand(50, 7, 7, generator=g) < 0.5).float()
    shifts = torch.randint(0, 32, (50, 2), generator=g)
    cpu = rise_masks(grids, shifts, (224, 224), 7)
    gpu = rise_masks(grids.cuda(), shifts.cuda(), (224, 224), 7)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-6)
