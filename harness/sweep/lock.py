"""One sweep at a time in a sweep folder.

Two sweeps started into the same folder would each compute every job that is not complete yet and
write over each other's results. The sweeper holds an exclusive lock on `<sweep>/.sweep.lock`
(`fcntl.flock`) while its jobs run; a second sweep into that folder is refused with one line naming
the folder and the process that holds it. The kernel drops the lock when its process ends, however
it ends (Ctrl-C, SIGKILL, a lost node), so a later `resume=true` is never locked out. On a network
file system the lock holds where the file system supports `flock` (NFSv4 and Lustre do).
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.config import HarnessError

LOCK_FILE = ".sweep.lock"


@contextmanager
def hold(folder: Path) -> Iterator[None]:
    """Hold the sweep folder's lock while the block runs; `HarnessError` when another sweep holds it."""
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise HarnessError(
                f"sweep folder {str(folder)!r} is in use by another running sweep ({holder}); wait for it "
                "to end (then resume=true finishes what is left), or choose another hydra.sweep.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock
