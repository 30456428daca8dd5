"""Localisation metrics and the generated shapes: known answers, naive loops, invariance, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harness.data.generated import CLASSES, check, generate
from metrics.contract import traits_of
from metrics.localisation import (
    GroundTruth,
    energy_pointing_game,
    pointing_game,
    relevance_mass,
    relevance_rank,
)

LOCALISATION = [pointing_game, energy_pointing_game, relevance_mass, relevance_rank]


@pytest.fixture(scope="module")
def shapes():
    pixels, labels, truth = generate(12, size=48, seed=3)
    return pixels, labels, truth


def score(fn, maps, truth, **params):
    return fn(None, None, maps, None, ground_truth=truth, **params).values[""]


@pytest.mark.parametrize("fn", LOCALISATION)
def test_an_oracle_map_scores_one(fn, shapes):
    _, _, truth = shapes
    oracle = truth.mask[:, None].float()
    assert torch.equal(score(fn, oracle, truth), torch.ones(len(oracle)))


def test_a_uniform_map_scores_the_masks_area_share_on_relevance_mass(shapes):
    _, _, truth = shapes
    uniform = torch.full((len(truth.mask), 3, 48, 48), 0.7)
    share = truth.mask.float().mean(dim=(1, 2))
    torch.testing.assert_close(score(relevance_mass, uniform, truth), share)
    box_share = truth.box.float().mean(dim=(1, 2))
    torch.testing.assert_close(score(energy_pointing_game, uniform, truth), box_share)


@pytest.mark.parametrize("tolerance_px", [0, 1, 3, 5])
def test_pointing_game_hits_exactly_at_the_tolerances_edge(tolerance_px):
    """One mask pixel at (10, 10); the maximum at every pixel of a 32x32 image in turn: a hit exactly
    when its Euclidean distance to (10, 10) is at most the tolerance (scaled from 224 to 32 pixels).
    """
    side = 32
    mask = torch.zeros(side * side, side, side, dtype=torch.bool)
    mask[:, 10, 10] = True
    maps = torch.eye(side * side).view(-1, 1, side, side)
    hits = score(pointing_game, maps, GroundTruth.from_masks(mask), tolerance=tolerance_px * 224 / side)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    within = ((ys - 10) ** 2 + (xs - 10) ** 2).flatten() <= tolerance_px**2
    assert torch.equal(hits.bool(), within)


def naive_relevance_rank(m: torch.Tensor, mask: torch.Tensor) -> float:
    values = [(abs(float(v)), i) for i, v in enumerate(m.sum(0).flatten())]
    k = int(mask.sum())
    top = [i for _, i in sorted(values, key=lambda p: -p[0])[:k]]  # Python's sort is stable
    return sum(bool(mask.flatten()[i]) for i in top) / k


def naive_energy(m: torch.Tensor, box: torch.Tensor) -> float:
    pos = [max(float(v), 0.0) for v in m.sum(0).flatten()]
    inside = sum(p for p, b in zip(pos, box.flatten().tolist(), strict=True) if b)
    return inside / sum(pos) if sum(pos) else 0.0


def test_relevance_rank_and_energy_equal_naive_loops(shapes):
    _, _, truth = shapes
    maps = torch.randn(len(truth.mask), 3, 48, 48, generator=torch.Generator().manual_seed(0))
    maps[0] = 0  # all zero: energy 0
    rank = score(relevance_rank, maps, truth)
    energy = score(energy_pointing_game, maps, truth)
    for i in range(len(maps)):
        assert rank[i].item() == pytest.approx(naive_relevance_rank(maps[i], truth.mask[i]), abs=1e-6)
        assert energy[i].item() == pytest.approx(naive_energy(maps[i], truth.box[i]), abs=1e-5)


@pytest.mark.parametrize("fn", LOCALISATION)
def test_invariant_to_batch_size(fn, shapes):
    _, _, truth = shapes
    maps = torch.randn(len(truth.mask), 1, 48, 48, generator=torch.Generator().manual_seed(1))
    whole = score(fn, maps, truth)
    parts = torch.cat([score(fn, maps[i : i + 5], truth[i : i + 5]) for i in range(0, len(maps), 5)])
    assert torch.equal(whole, parts)


def test_traits():
    for fn in LOCALISATION:
        assert traits_of(fn).needs == {"ground_truth"} and traits_of(fn).better == {"": "higher"}


def test_bad_tolerance_names_the_value():
    with pytest.raises(ValueError, match=r"tolerance=-1; expected"):
        traits_of(pointing_game).check(tolerance=-1)


# --- the generated data -------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_data_and_another_seed_other_data():
    a, la, ta = generate(8, size=32, seed=5)
    b, lb, tb = generate(8, size=32, seed=5)
    c, _, tc = generate(8, size=32, seed=6)
    d, _, _ = generate(8, size=32, seed=5, split="train")
    assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ta.mask, tb.mask)
    assert not torch.equal(a, c) and not torch.equal(ta.mask, tc.mask) and not torch.equal(a, d)


def test_each_image_has_one_object_of_its_class_and_its_box(shapes):
    pixels, labels, truth = shapes
    assert sorted(labels.bincount().tolist()) == [3, 3, 3, 3]  # balanced classes
    for i in range(len(labels)):
        rows, cols = truth.mask[i].nonzero().unbind(1)
        box = torch.zeros(48, 48, dtype=torch.bool)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert torch.equal(truth.box[i], box)
        colour = pixels[i, :, rows, cols]
        assert torch.equal(colour, colour[:, :1].expand_as(colour))  # one flat colour: the object


def test_shape_areas_follow_their_form():
    """Each form's pixel area over its radius squared matches its area in the unit frame."""
    pixels, labels, truth = generate(64, size=128, seed=0, distractors=0, scale=(0.8, 0.8))
    radius = 0.8 * 128 / 2
    area = {
        "circle": math.pi,
        "square": 1.6**2,
        "triangle": 3 * math.sqrt(3) / 4,
        "cross": 2 * 2 * 0.6 - 0.36,
    }
    for k, form in enumerate(CLASSES):
        got = truth.mask[labels == k].float().sum(dim=(1, 2)).mean().item() / radius**2
        assert got == pytest.approx(area[form], rel=0.02), form


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"size": 8}, "data.size=8"),
        ({"classes": ["circle", "hexagon"]}, "data.classes=['circle', 'hexagon']"),
        ({"classes": ["circle"]}, "data.classes=['circle']"),
        ({"distractors": -1}, "data.distractors=-1"),
        ({"scale": [0.5, 0.2]}, "data.scale=[0.5, 0.2]"),
        ({"split": "dev"}, "data.split='dev'"),
    ],
)
def test_bad_generator_settings_name_the_value(bad, named):
    good = {"size": 32, "classes": list(CLASSES), "distractors": 1, "scale": [0.3, 0.5], "split": "test"}
    with pytest.raises(ValueError, match="expected") as e:
        check(**(good | bad))
    assert str(e.value).startswith(named)


# --- boxes for image folders ---------------------------------------------------------------------


def _voc_xml(filename: str, objects: list[tuple[str, int, int, int, int]]) -> str:
    parts = [f"<annotation><filename>{filename}</filename>"]
    for name, x0, y0, x1, y1 in objects:
        parts.append(
            f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def test_voc_and_csv_boxes_give_the_same_masks_at_the_models_size(tmp_path):
    from PIL import Image

    from harness.data import image_folder

    for cls in ("cat", "dog"):
        (tmp_path / "data" / cls).mkdir(parents=True)
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "data" / "cat" / "a.png")
    Image.new("RGB", (20, 20), (10, 10, 200)).save(tmp_path / "data" / "dog" / "b.jpg")
    boxes = {  # VOC: 1-based, both ends included
        "a.png": [("cat", 1, 1, 20, 10), ("dog", 30, 15, 40, 20)],  # the dog box is another class's
        "b.jpg": [("person", 11, 1, 20, 20)],  # no box of its class: all its boxes
    }
    (tmp_path / "voc").mkdir()
    for name, objects in boxes.items():
        (tmp_path / "voc" / f"{Path(name).stem}.xml").write_text(_voc_xml(name, objects))
    folder = {"a.png": "cat", "b.jpg": "dog"}
    lines = ["path,class,xmin,ymin,xmax,ymax"] + [
        f"{folder[n]}/{n},{c},{x0},{y0},{x1},{y1}" for n, objs in boxes.items() for c, x0, y0, x1, y1 in objs
    ]
    (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")
    got = [
        image_folder(str(tmp_path / "data"), 10, (0.5,) * 3, (0.5,) * 3, boxes=str(tmp_path / source))
        for source in ("voc", "boxes.csv")
    ]
    expected = torch.zeros(2, 10, 10, dtype=torch.bool)
    expected[0, :5, :5] = True  # cat: the left half, top half of a 40x20 image at 10x10
    expected[1, :, 5:] = True  # dog: the right half
    for data in got:
        assert data.ids == ["cat/a.png", "dog/b.jpg"]
        assert torch.equal(data.ground_truth.mask, expected) and torch.equal(data.ground_truth.box, expected)


# --- the trained model and its cache -------------------------------------------------------------


def test_shapes_cnn_trains_once_then_loads_its_cache_and_refuses_a_weak_model(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    import harness.models.shapes as sm
    from harness.config import HarnessError

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    data = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "shapes.yaml")
    small = {
        "input_size": 32,
        "width": 8,
        "train_images": 128,
        "val_images": 64,
        "epochs": 1,
        "batch_size": 32,
    }
    first = sm.shapes_cnn(data, min_accuracy=0.0, **small)
    assert 0 <= first.facts["held_out_accuracy"] <= 1 and first.facts["held_out_images"] == 64
    calls = []
    monkeypatch.setattr(sm, "train", lambda *a, **k: calls.append(a))
    again = sm.shapes_cnn(data, min_accuracy=0.0, **small)
    assert calls == [] and again.facts == first.facts  # from the cache, not trained again
    for a, b in zip(first.module.state_dict().values(), again.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(
        HarnessError, match=r"held-out accuracy of 0\.\d+ on 64 images, below model.min_accuracy=1.01"
    ):
        sm.shapes_cnn(data, min_accuracy=1.01, **small)
    photos = OmegaConf.create({"_target_": "harness.data.photos"})
    with pytest.raises(HarnessError, match="got data 'harness.data.photos': use data=shapes"):
        sm.shapes_cnn(photos, **small)
