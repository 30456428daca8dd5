"""Shared test helpers: tiny models whose answers are known, and the repository's config folder."""

from __future__ import annotations

import atexit
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


class Linear(nn.Module):
    """Logits = W x + b on the flattened image: saliency is |W[target]|, IG sums to f(x) - f(0)."""

    def __init__(self, shape: tuple[int, int, int], classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, *shape, generator=g))
        self.bias = nn.Parameter(torch.randn(classes, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kchw->bk", x, self.weight) + self.bias


class PatchDetector(nn.Module):
    """Class 1's logit is the mean of one planted patch; class 0's is constant.

    Only the patch informs the answer, so an attribution that ranks the patch first is the oracle.
    """

    def __init__(self, rows: slice, cols: slice, gain: float = 4.0, offset: float = 0.0) -> None:
        super().__init__()
        self.rows, self.cols, self.gain, self.offset = rows, cols, gain, offset
        self.dummy = nn.Parameter(torch.zeros(()))  # so that Captum finds a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = x[:, :, self.rows, self.cols].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(patch) + self.dummy, self.gain * (patch - self.offset)], dim=1)


@pytest.fixture
def small_cnn():
    from harness.models import small_cnn as build

    return build(num_classes=5, input_size=32, width=8, seed=0)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def method_configs() -> list[str]:
    return sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


_SERVER: list = []


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in the repository, through one `CliServer` for the whole session
    (the harness imported once, each command a forked child): like `subprocess.run`, with what the
    command printed, stdout and stderr together, as both `stdout` and `stderr`.
    """
    from tests.cli_server import CliServer

    if not _SERVER:
        folder = Path(tempfile.mkdtemp(prefix="harness-cli-"))
        _SERVER.append(CliServer(folder))
        atexit.register(_SERVER[0].close)
    r = _SERVER[0].run(module, *args, env=dict(os.environ))
    return subprocess.CompletedProcess([module, *args], r.returncode, r.output, r.output)
