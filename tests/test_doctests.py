"""The examples in the project's docstrings hold: every module that has one runs them as doctests."""

from __future__ import annotations

import doctest
import importlib

import pytest

from tests.conftest import REPO

PACKAGES = ("harness", "methods", "metrics")


def modules_with_examples() -> list[str]:
    """The dotted names of the project's modules whose source holds a `>>>` example."""
    found = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if ">>>" in path.read_text():
                parts = path.relative_to(REPO).with_suffix("").parts
                found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(found)


def test_examples_are_found():
    assert "metrics.faithfulness" in modules_with_examples()


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples_hold(name):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(importlib.import_module(name), optionflags=flags, verbose=False)
    assert result.attempted > 0 and result.failed == 0, name
