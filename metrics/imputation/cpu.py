"""The linear imputation's solve on the CPU, compiled with numba: one (image, channel) plane per thread.

The system, the method and the stopping rule are `metrics.imputation`'s (conjugate gradients
preconditioned by a symmetric geometric-multigrid V-cycle, started from a full-multigrid guess, stopped
when every removed pixel's normalised residual is within `tol`, confirmed with the true residual). Here
each step is a loop that makes one pass over a plane, so that a CG iteration reads and writes a plane
about ten times instead of forty, with no per-operation overhead, and each plane is solved on its own:
a result depends neither on its batch nor on the number of threads.

The kernels live in `cpu_passes`, `cpu_grids` and `cpu_solve`. numba caches each compiled function
under its own file's time stamp, but these functions call (and inline) each other across the three
files, so an edit of one would leave the others' cached machine code, built on the old version, in use;
they are therefore cached in one folder named by the hash of all three sources (`_kernels`).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from pathlib import Path

import numba
import numba.np.ufunc.parallel
import numpy as np
import torch

KERNELS = ("cpu_passes", "cpu_grids", "cpu_solve")


def _kernels() -> tuple[Callable[..., None], Callable[..., tuple]]:
    """`solve_planes` and `workspace`, their modules imported with numba's cache in
    `__pycache__/numba-<hash of the kernels' sources>`.
    """
    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join((here / f"{name}.py").read_bytes() for name in KERNELS)).hexdigest()[:16]
    saved = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = str(here / "__pycache__" / f"numba-{digest}")
    try:
        solve = importlib.import_module("metrics.imputation.cpu_solve")
        grids = importlib.import_module("metrics.imputation.cpu_grids")
    finally:
        numba.config.CACHE_DIR = saved
    return solve.solve_planes, grids.workspace


def warm() -> None:
    """Compile `solve_planes` for the types `fill` passes (cached, see the module's docstring)."""
    planes = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)
    removed = np.zeros((1, 16, 16), dtype=bool)
    removed[0, 4:12, 4:12] = True
    fill(planes, removed, 1e-5, 100)


def fill(
    planes: np.ndarray, removed: np.ndarray, tol: float, max_iter: int, noise: np.ndarray | None = None
) -> np.ndarray:
    """Fill `planes [B, C, H, W]` (float32, C-contiguous) in place where `removed [B, H, W]` (bool) is
    True, plus `noise` (like `planes`) there when given, on as many threads as torch uses; returns each
    plane's error estimate `[B, C]` (float64).
    """
    iterations = np.zeros(planes.shape[:2], dtype=np.int64)
    estimates = np.zeros(planes.shape[:2], dtype=np.float64)
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    spaces = _workspaces(planes.shape[2], planes.shape[3], threads)
    if noise is None:
        noise = np.zeros((0, 0, 0, 0), dtype=np.float32)
    solve_planes(planes, removed, noise, float(tol), int(max_iter), threads, spaces, iterations, estimates)
    return estimates


_SPACES: dict[tuple[int, int, int], tuple] = {}


def _start_threads() -> None:
    """Start numba's threads with a passive OpenMP wait policy, for them alone.

    numba's OpenMP pool is not torch's (each library brings its own libgomp), and OpenMP threads spin for
    some milliseconds after a parallel region by default: between ROAD's imputations and its forward
    passes, this pool would spin on the cores the model needs. Passive threads sleep at once; the policy
    is read when numba loads its OpenMP runtime, which happens here, and the environment is restored.
    """
    saved = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        numba.np.ufunc.parallel._launch_threads()
    finally:
        if saved is None:
            del os.environ["OMP_WAIT_POLICY"]
        else:
            os.environ["OMP_WAIT_POLICY"] = saved


_start_threads()
solve_planes, workspace = _kernels()


def _workspaces(h: int, w: int, threads: int) -> tuple:
    """`threads` workspaces for `[h, w]` planes (`workspace`, stacked), kept for the next call: fresh
    ones cost page faults (about 6 ms for a 224x224 workspace here, more than solving a plane). The
    last 4 sizes are kept.
    """
    key = (h, w, threads)
    if key not in _SPACES:
        one = [workspace(h, w) for _ in range(threads)]
        _SPACES[key] = one[0][:3] + tuple(np.stack([ws[k] for ws in one]) for k in range(3, 9))
        while len(_SPACES) > 4:
            del _SPACES[next(iter(_SPACES))]
    return _SPACES[key]
