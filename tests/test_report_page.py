"""The report page: its pictures and data (no browser), then the page itself in headless Chromium.

The browser tests need a Chromium on the machine (Debian's `chromium`; `.ci/run` installs it) and are
skipped, saying so, where there is none.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness.report.browser import find_chromium
from harness.report.examples import THUMB, _outline, _status, _top, overlay
from harness.report.page import _cell, _clean
from tests.conftest import run_cli

METHODS = ["random", "saliency"]
# What the page shows comes from each job's scores.csv. The test sets the labels and predictions there
# to a known mix, so that every filter has an answer: (label, predicted class) per image.
KNOWN = [(3, 3), (3, 7), (-1, 7), (7, 7)]  # correct, incorrect, unlabelled, correct


def _picture(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_a_map_over_its_image_is_a_thumbnail_with_the_mask_outlined():
    pixels = np.full((3, 64, 64), 128, dtype=np.uint8)
    plane = np.zeros((64, 64), dtype=np.float32)
    plane[20:30, 20:30] = 1.0
    mask = np.zeros((64, 64), dtype=bool)
    mask[8:40, 8:40] = True
    image = np.asarray(overlay(pixels, plane, mask))
    assert image.shape == (2 * 64, 2 * 64, 3)  # a small image enlarged by a whole factor
    assert tuple(image[16, 40]) == (0, 255, 0) and tuple(image[79, 40]) == (0, 255, 0)  # the edges
    assert tuple(image[40, 40]) != (0, 255, 0) and tuple(image[100, 100]) != (0, 255, 0)
    # Inside the hot square the map's colour (inferno's top, light yellow) over grey, outside grey.
    hot, cold = image[50, 50].astype(int), image[100, 100].astype(int)
    assert hot[0] > 200 and hot[1] > 200 and cold.max() - cold.min() < 40
    big = overlay(np.zeros((3, 224, 300), dtype=np.uint8), np.random.rand(224, 300))
    assert big.size == (THUMB, round(224 * THUMB / 300))


def test_the_outline_is_the_masks_border():
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:5, 1:5] = True
    expected = mask.copy()
    expected[2:4, 2:4] = False
    assert (_outline(mask) == expected).all()


def test_status_top5_and_json_safety():
    assert [_status(-1, 2), _status(2, 2), _status(1, 2)] == ["unlabelled", "correct", "incorrect"]
    row = pd.Series({"target_name": "cat", "target_prob": 0.5, "top1_name": "cat", "top1_prob": 0.5,
                     "top2_name": "dog", "top2_prob": 0.3})  # fmt: skip
    assert _top(row) == [("cat", 0.5), ("dog", 0.3)]
    assert _top(pd.Series({"target_name": "cat", "target_prob": 0.5})) == [("cat", 0.5)]  # older runs
    assert json.dumps(_clean({"a": [float("nan"), 1.0, (float("inf"),)]})) == '{"a": [null, 1.0, [null]]}'
    cells = [
        None,
        float("nan"),
        np.float32("nan"),
        pd.NA,
        True,
        np.bool_(False),
        0.5,
        np.float32(0.25),
        1e-5,
        3,
    ]
    assert [_cell(v) for v in cells] == ["", "", "", "", "yes", "no", "0.500", "0.250", "1e-05", "3"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real sweep (the small CNN, random and saliency on four photos), its scores set to `KNOWN`."""
    folder = tmp_path_factory.mktemp("page") / "sweep"
    r = run_cli(
        "harness", "-m", "model=small_cnn", f"method={','.join(METHODS)}", "data.num_images=4", "device=cpu",
        "timing.profile=false", f"hydra.sweep.dir={folder}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for scores_file in folder.glob("*/scores.csv"):
        scores = pd.read_csv(scores_file)
        scores["label"] = [label for label, _ in KNOWN]
        scores["label_name"] = [str(label) if label >= 0 else "" for label, _ in KNOWN]
        scores["target"] = [pred for _, pred in KNOWN]
        scores["target_name"] = scores["top1_name"] = [str(pred) for _, pred in KNOWN]
        scores.to_csv(scores_file, index=False)
        row_file = scores_file.parent / "run.json"  # the job's record of its files' sizes, kept true
        row = json.loads(row_file.read_text())
        row["files"]["scores.csv"] = scores_file.stat().st_size
        row_file.write_text(json.dumps(row))
    r = run_cli("harness.report", str(folder))
    assert r.returncode == 0, r.stderr
    return folder


def _data(page: str) -> list[dict]:
    found = re.search(r'<script type="application/json" id="examples-data">(.*?)</script>', page, re.S)
    assert found
    return json.loads(found.group(1))


@pytest.mark.slow
def test_the_page_is_one_file_with_every_example(sweep):
    page = (sweep / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)  # nothing outside the file
    (group,) = _data(page)
    assert group["methods"] == METHODS and group["total"] == 4
    assert [im["status"] for im in group["images"]] == ["correct", "incorrect", "unlabelled", "correct"]
    assert [im["pred"] for im in group["images"]] == ["3", "7", "7", "7"]
    for image in group["images"]:
        probabilities = [p for _, p in image["top"]]
        assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
        assert sorted(image["maps"]) == METHODS and set(image["values"]) == set(METHODS)
        assert {"deletion", "insertion"} <= set(image["curves"])
        assert all(max(_picture(u).size) <= THUMB for u in [image["src"], *image["maps"].values()])
    for method in METHODS:
        (scores_file,) = sweep.glob(f"*method={method},*/scores.csv")
        scores = pd.read_csv(scores_file)
        shown = [image["values"][method]["deletion_auc"] for image in group["images"]]
        assert np.allclose(shown, scores["deletion_auc"], atol=1e-4)


@pytest.fixture
def chromium() -> None:
    """Skip, saying why, where no Chromium is found; fail instead where CI asks for the browser."""
    if find_chromium() is None:
        why = "no Chromium found (apt-get install chromium, or set $HARNESS_CHROMIUM)"
        if os.environ.get("HARNESS_REQUIRE_BROWSER"):
            pytest.fail(f"{why}, and HARNESS_REQUIRE_BROWSER is set (.ci/run installs it)")
        pytest.skip(f"{why}: the report page's browser tests did not run")


@pytest.mark.slow
def test_the_page_loads_in_chromium_and_its_filters_work(chromium, sweep):
    from harness.report.browser import open_page

    with open_page(sweep / "report.html") as opened:
        page = opened.page
        assert opened.errors == []
        assert opened.requests == [(sweep / "report.html").resolve().as_uri()]  # nothing else fetched
        # The tables hold the sweep's rows, and sort on a click.
        assert page.locator("#summary-table tbody tr").count() == len(METHODS)
        fields = pd.read_csv(sweep / "verdict.csv")["field"].nunique()
        assert page.locator("#verdict-table tbody tr").count() == len(METHODS) * fields
        heading = page.locator("#summary-table thead th", has_text="method").first
        heading.click()
        first = page.locator("#summary-table tbody tr td:nth-child(4)")
        assert first.all_inner_texts() == sorted(METHODS)
        heading.click()
        assert first.all_inner_texts() == sorted(METHODS, reverse=True)

        def shown() -> list[str]:
            return page.locator("#cards .example").evaluate_all("cards => cards.map(c => c.dataset.id)")

        every = shown()
        assert len(every) == 4
        page.select_option("#filter-class", "3")
        assert len(shown()) == 1
        page.select_option("#filter-class", "7")
        assert len(shown()) == 3
        page.select_option("#filter-status", "correct")
        assert len(shown()) == 1  # predicted 7 and correct
        page.select_option("#filter-class", "")
        assert len(shown()) == 2
        page.select_option("#filter-status", "incorrect")
        assert shown() == [every[1]]
        page.select_option("#filter-status", "unlabelled")
        assert shown() == [every[2]]
        page.select_option("#filter-status", "")
        assert shown() == every
        # Choosing the methods: each card shows the image and one map per chosen method.
        assert page.locator("#cards .example").first.locator(".maps img").count() == 1 + len(METHODS)
        page.locator("#legend input[value=saliency]").uncheck()
        assert page.locator("#cards .example").first.locator(".maps img").count() == 2
        assert page.locator("#cards .example").first.locator("svg.curve polyline").count() >= 1
        # Every picture of the page loaded (plots, thumbnails, maps).
        broken = page.evaluate(
            "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)"
        )
        assert page.evaluate("document.images.length") > 10 and broken == []
        assert opened.errors == []


@pytest.mark.slow
def test_the_page_shows_the_models_pictures_when_the_sweep_has_them(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    r = run_cli(
        "harness.inspect",
        "model=small_cnn",
        "device=cpu",
        "images=1",
        "actmax.steps=3",
        f"out={copy / 'inspect'}",
    )
    assert r.returncode == 0, r.stderr
    r = run_cli("harness.report", str(copy))
    assert r.returncode == 0, r.stderr
    page = (copy / "report.html").read_text()
    section = page.split('<section id="model">', 1)[1].split("</section>", 1)[0]
    pictures = sorted(p.name for p in (copy / "inspect").glob("*.png"))
    assert len(pictures) == 7 and [n for n in pictures if f"<figcaption>{n}" in section] == pictures
    assert (
        '<a href="#model">Model</a>' in page
        and '<section id="model">' not in (sweep / "report.html").read_text()
    )
