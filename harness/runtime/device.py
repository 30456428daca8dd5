"""Where a job runs: the device its settings name, and one GPU of several claimed for it."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from harness.config import DEVICES, HarnessError

log = logging.getLogger("harness")


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when torch sees a GPU, else cpu; `cuda` without one is an error."""
    if name not in DEVICES:  # checked in `DeviceSettings`; a name given here directly is checked too
        raise HarnessError(f"device.name={name!r}; expected one of {DEVICES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HarnessError(
            f"device=cuda but torch {torch.__version__} sees no CUDA GPU "
            f"(built for CUDA {torch.version.cuda}); use device=cpu or device=auto"
        )
    return torch.device(name)


def gpu_locks() -> Path:
    """Where the jobs of this user on this machine take turns on GPUs."""
    return Path(tempfile.gettempdir()) / f"attribution-harness-gpus-{os.getuid()}"


@contextlib.contextmanager
def claimed_gpu(count: int, locks: Path, poll_s: float = 0.5) -> Iterator[int]:
    """Hold one of `count` GPUs for the block: the first that no other job holds, waiting while
    all are held. Jobs that a local launcher (joblib) runs side by side thus get a GPU each.

    The claim is an exclusive `flock` on `locks/cuda<i>.lock`, which the system releases when the
    holder exits, however it exits.
    """
    locks.mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(count):
            f = (locks / f"cuda{i}.lock").open("w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield i
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(poll_s)


@contextlib.contextmanager
def job_device(device: torch.device) -> Iterator[torch.device]:
    """The device a job runs on: with several GPUs visible and none named (`cuda`, not `cuda:1`),
    one claimed for the job (see `claimed_gpu`); otherwise `device` itself.
    """
    count = torch.cuda.device_count() if device.type == "cuda" and device.index is None else 0
    if count < 2:
        yield device
        return
    with claimed_gpu(count, gpu_locks()) as i:
        torch.cuda.set_device(i)
        log.info("running on cuda:%d of %d visible GPUs", i, count)
        yield torch.device("cuda", i)
