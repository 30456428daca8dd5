"""Run the harness's command lines many times without paying for the imports each time.

`CliServer` starts one Python process that imports the harness (torch, Captum, Hydra: about five
seconds) and never runs a tensor operation; for each command it forks a child that runs the command
line's entry point as `python -m <module> <args>` would, with its own working folder, umask and
output file, and reports the exit code. A forked child has a fresh copy of everything, so the
commands cannot see each other, and the parent, having started no thread pool, forks safely.
A command can be interrupted (SIGINT, as Ctrl-C sends) once a file it writes appears.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    """What a command did: its exit code and what it printed (stdout and stderr together)."""

    returncode: int
    output: str


def _serve() -> None:  # pragma: no cover (runs in the server process)
    import traceback

    import harness.inspect.app
    import harness.job  # noqa: F401
    import harness.report.__main__
    import harness.sweep

    entry = {
        "harness": harness.sweep.cli,
        "harness.report": lambda: harness.report.__main__.main(sys.argv[1:]),
        "harness.inspect": harness.inspect.app.cli,
    }
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(req["cwd"])
            os.umask(req["umask"])
            os.environ.update(req["env"])
            sys.path[:0] = req["path"]
            sys.argv = [req["module"], *req["args"]]
            code = 0
            try:
                entry[req["module"]]()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 (reported as a traceback, which the tests look for)
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        when = req.get("interrupt_when")
        status = None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = raw
            elif when and list(Path(req["cwd"]).glob(when)):
                os.kill(pid, signal.SIGINT)
                when = None
            else:
                time.sleep(0.01)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


class CliServer:
    """The server process; `run(module, *args)` runs one command line through it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.n = 0
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.cli_server import _serve; _serve()"],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip

    def run(
        self,
        module: str,
        *args: str,
        cwd: Path = REPO,
        umask: int = 0o022,
        env: dict[str, str] | None = None,
        path: list[str] | None = None,
        interrupt_when: str | None = None,
    ) -> Result:
        """Run `python -m <module> <args>` in `cwd`; with `interrupt_when` (a glob relative to
        `cwd`), send SIGINT once a file matches it.
        """
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.n += 1
        log = self.tmp / f"command-{self.n}.log"
        req = {
            "module": module, "args": list(args), "cwd": str(cwd), "umask": umask, "env": env or {},
            "path": path or [], "log": str(log), "interrupt_when": interrupt_when,
        }  # fmt: skip
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return Result(reply["rc"], log.read_text())

    def close(self) -> None:
        """End the server."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
