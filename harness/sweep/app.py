"""The Hydra app behind `python -m harness`: one call of `main` is one job of a sweep.

`main` decides first, from the job's folder alone, whether the job has anything to do
(`harness.sweep.resume`; torch is imported only for jobs that run), then checks the job's settings
(`harness.config.check_config`) before any result is moved aside or any model is built, and runs it
(`harness.job.run_job`). `ReportCallback` writes the sweep's tables and plots once every job has
ended, whichever launcher ran them.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness.config import (
    HarnessError,
    Inapplicable,
    check_config,
    digest,
    first_line,
    hydra_errors_in_one_line,
    output_problem,
)
from harness.results import ERROR_FILE, NOT_APPLICABLE_FILE, RESULT_FILES, remove_temporaries
from harness.sweep.callback import RUNNING
from harness.sweep.resume import SKIPPED, clear, job_state

log = logging.getLogger("harness")
REPO = Path(__file__).resolve().parents[2]
GROUPS = ("model", "data", "method", "metric", "device", "experiment")


def gpu_count() -> int:
    """GPUs that torch sees (at least 1, so that a launcher always has a worker)."""
    import torch

    return max(1, torch.cuda.device_count())


def job_dir(overrides: str) -> str:
    """A job's folder name: its overrides (`method=rise,seed=1`), with `/` and other characters
    that a file name cannot hold escaped as in URLs, and a hash in place of the tail of a name too
    long for a file system.

    Example:
        >>> job_dir("data.root=/data/val,method=rise")
        'data.root=%2Fdata%2Fval,method=rise'
    """
    name = quote(overrides, safe="=,.+-_:@[]") or "job"
    return name if len(name) <= 200 else f"{name[:180]}-{digest(overrides)}"


OmegaConf.register_new_resolver("gpu_count", gpu_count, replace=True)
OmegaConf.register_new_resolver("job_dir", job_dir, replace=True)


def check_choices(overrides: list[str], conf: Path = REPO / "conf") -> None:
    """Refuse unknown config names in `group=a`, `group=a,b` and `group=[a,b]` overrides, listing
    the names that exist (Hydra lists them for some forms only). Sweep functions pass unchecked.
    """
    for arg in overrides:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or key not in GROUPS or "(" in value or value in ("null", ""):
            continue
        known = sorted(p.stem for p in (conf / key).glob("*.yaml"))
        for name in value.strip("[]").split(","):
            if name.strip() and name.strip() not in known:
                raise HarnessError(f"unknown {key} {name.strip()!r}; available: {', '.join(known)}")


def check_output(overrides: list[str], default: Path = REPO / "results" / "runs") -> None:
    """Refuse an output folder (`hydra.sweep.dir`, `hydra.run.dir`, or the default) that is empty
    (which would write the sweep into the current folder), is a file, lies under a file, or cannot be
    written, before Hydra creates it.
    """
    parts = [a.lstrip("+").partition("=") for a in overrides]
    given = [(key, value) for key, _, value in parts if key in ("hydra.sweep.dir", "hydra.run.dir")]
    for key, value in given:
        if not value.strip().strip("'\"") or value.strip() == "null":
            raise HarnessError(f"{key} is empty; expected a folder for the results ({key}=<folder>)")
    for text in [value for _, value in given] or [str(default)]:
        if "${" in text:
            text = text[: text.index("${")]  # the part before an interpolation (`${now:...}`)
        problem = output_problem(Path(text or "."))
        if problem is not None:
            key = "the output folder" if not given else f"output folder {text!r}"
            hint = (
                "choose another with hydra.sweep.dir=<folder>"
                if problem.startswith("cannot")
                else "expected a folder (hydra.sweep.dir=<folder>)"
            )
            raise HarnessError(f"{key} {problem}; {hint}")


def cli() -> None:
    """`python -m harness`: check the config names and the output folder, then hand over to Hydra
    (whose own errors are said in one line); Ctrl-C ends with one line saying how to resume.
    """
    try:
        check_choices(sys.argv[1:])
        check_output(sys.argv[1:])
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    previous = signal.signal(signal.SIGINT, _interrupted)
    hook = sys.unraisablehook
    sys.unraisablehook = lambda u: None if u.exc_type is KeyboardInterrupt else hook(u)
    try:
        try:
            hydra_errors_in_one_line(main)
        except Exception:
            if not INTERRUPTED:
                raise
            raise KeyboardInterrupt from None  # an error that the Ctrl-C caused where it landed
        if INTERRUPTED:  # raised where Python ignores it (a finaliser) after the last job began
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        sweep = RUNNING.get("sweep")
        again = (
            f"python -m harness <the same arguments> hydra.sweep.dir={sweep} resume=true"
            if sweep
            else ("the same command with hydra.sweep.dir=<its folder> resume=true")
        )
        print(f"\ninterrupted: finished jobs are kept; to finish the sweep, run {again}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook
        INTERRUPTED.clear()


INTERRUPTED: list[int] = []  # the Ctrl-Cs of this command; see `_interrupted`


def _interrupted(signum: int, frame: Any) -> None:
    """Ctrl-C raises `KeyboardInterrupt` where it lands, and is remembered: Python ignores an
    exception raised inside a finaliser (a `__del__`, such as a progress bar's), so a Ctrl-C landing
    there would otherwise be lost and the sweep would go on; the next job refuses to start instead
    (and `cli` keeps Python's report of the ignored exception off the console).
    """
    INTERRUPTED.append(signum)
    signal.default_int_handler(signum, frame)


@hydra.main(config_path=str(REPO / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Run (or, on resume, skip) the job that Hydra composed; bad input exits non-zero with one
    clear message, and a failing job leaves `error.txt` and no results.
    """
    if INTERRUPTED:
        raise KeyboardInterrupt  # a Ctrl-C that a finaliser swallowed during the job before
    started = time.perf_counter()
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    (out / NOT_APPLICABLE_FILE).unlink(missing_ok=True)  # of an earlier run: this one decides again
    try:
        state = job_state(cfg, out)
        if state.kept:
            log.info("%s: %s", out.name, SKIPPED)
            return state.row
        settings = check_config(cfg)  # before any result is moved aside or any model is built
        clear(out, state)
        # Captum warns on every call that inputs do not require grad and that it hooks activations.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")
        from harness.job import run_job  # torch and the models: only for jobs that run

        return run_job(cfg, out, calibration_dir=shared_folder(hydra_cfg), started=started, settings=settings)
    except Exception as e:
        if INTERRUPTED:  # the Ctrl-C, turned into another error by the code it landed in
            raise KeyboardInterrupt from None
        if (
            isinstance(e, Inapplicable)
            and cfg.get("skip_inapplicable")
            and hydra_cfg.mode == RunMode.MULTIRUN
        ):
            log.info("not applicable: %s", message(e))
            out.mkdir(parents=True, exist_ok=True)
            (out / NOT_APPLICABLE_FILE).write_text(message(e) + "\n")
            return None
        if isinstance(e, (HarnessError, InstantiationException, ValueError, FileNotFoundError)):
            failed(out, message(e))
            return None
        # A bug, here or in the model's code: said in one line.
        where = out / ERROR_FILE
        text = f"{type(e).__name__}: {first_line(e)} (unexpected; the traceback is in {where})"
        failed(out, text, traceback.format_exc())
    return None


def message(e: BaseException) -> str:
    """One line for an error of bad input; Hydra's instantiation errors give their cause's."""
    if isinstance(e, InstantiationException) and e.__cause__ is not None:
        cause = e.__cause__
        text = str(cause) if isinstance(cause, HarnessError) else f"{type(cause).__name__}: {cause}"
        return first_line(text)
    return first_line(e)


def failed(out: Path, text: str, details: str | None = None) -> None:
    """Log a failed job's message, remove what it wrote of its results (the folder held none when
    it started: `prepare` moved them aside), and leave `error.txt`; outside a sweep, exit 1.
    """
    log.error("%s", text)
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    remove_temporaries(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ERROR_FILE).write_text(text + "\n" + (f"\n{details}" if details else ""))
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        raise SystemExit(1)
    # In a sweep the other jobs go on; ReportCallback names the failed ones and exits non-zero.


def shared_folder(hydra_cfg: Any) -> Path:
    """The folder that the jobs of a sweep share (the sweep's; a single run's own), as an absolute
    path: relative ones are relative to where Hydra was started, wherever a launcher runs the job.
    """
    folder = Path(hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else hydra_cfg.run.dir)
    return folder if folder.is_absolute() else Path(hydra_cfg.runtime.cwd) / folder
