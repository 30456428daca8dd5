"""Hydra's basic sweeper, less the jobs that `resume=true` would skip: they are never launched.

Hydra's `BasicSweeper` composes every job's config in the sweeping process to catch composition
errors early, then hands all jobs to the launcher. `ResumeSweeper` composes each job too, through
`JobComposer` (one full composition per distinct set of config-group choices, the other overrides
applied per job: milliseconds a job instead of a tenth of a second), and decides from the job's
folder alone (`harness.sweep.job_state`) whether the job already has complete results of the same
config; only the other jobs go to the launcher. A resumed sweep of thousands of Slurm jobs then
submits only the unfinished ones instead of an array of no-op tasks, and a finished sweep resumes
without starting a single job. Each job still checks its folder itself (`harness.sweep.app.main`), so
a launcher fed by another sweeper skips the same jobs, later. Its first line says how many jobs the
sweep has and how many will run.

Hydra accepts sweepers only from the `hydra_plugins` package, hence this module's place;
`conf/hydra/sweeper/basic_resume.yaml` selects it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from harness.config import HarnessError, check_config
from harness.sweep.lock import hold
from harness.sweep.resume import SKIPPED, job_state
from hydra_plugins.harness_sweeper.composer import JobComposer

log = logging.getLogger("harness")


# Skipped jobs named in the log before the sweep starts; the rest are counted.
NAMED = 20


def finished(job: DictConfig, reads_hydra: bool = True) -> Path | None:
    """The folder of a composed job (Hydra's config of one job, `hydra` node included) when it asks
    to resume and the folder holds complete results of the same config, else None. The job's config
    is the caller's own copy: its `hydra` node is removed, as Hydra does for the task. `reads_hydra`
    (see `JobComposer.reads_hydra`) says whether the task config needs `HydraConfig` to resolve;
    setting it costs more than the rest of the decision.
    """
    if job.get("resume") is not True:  # not a boolean: the job is checked, and refused
        return None
    if reads_hydra:
        HydraConfig.instance().set_config(job)  # as the launcher does, for `${hydra:...}` in the task
    folder = Path(job.hydra.sweep.dir, job.hydra.sweep.subdir).absolute()
    with read_write(job), open_dict(job):
        del job["hydra"]  # the task's config, as `hydra.core.utils.run_job` makes it
    return folder if job_state(job, folder).kept else None


def plan(composer: JobComposer, jobs: list[list[str]]) -> tuple[list[list[str]], list[Path]]:
    """The jobs to launch, those that `finished` does not rule out, and the folders of the others.
    Composing each job here also checks it before any is launched, as BasicSweeper does.
    """
    todo, skipped = [], []
    bad: dict[str, list[str]] = {}
    n_bad = 0
    for job in jobs:
        cfg = composer.compose(job)
        folder = finished(cfg.copy(), composer.reads_hydra(job))
        if folder is None:
            try:  # a job that runs: its settings checked (a finished one had them right)
                check_config(cfg)
            except HarnessError as e:
                bad.setdefault(str(e), job)
                n_bad += 1
                continue
            todo.append(job)
        else:
            skipped.append(folder)
    if bad:
        raise BadSweep(bad, n_bad, len(jobs))
    return todo, skipped


class BadSweep(HarnessError):
    """Jobs of a sweep whose settings are wrong, found before any job is launched."""

    def __init__(self, bad: dict[str, list[str]], n_bad: int, jobs: int) -> None:
        self.bad, self.n_bad, self.jobs = bad, n_bad, jobs
        super().__init__(next(iter(bad)))


class ResumeSweeper(BasicSweeper):
    """Hydra's basic sweeper (the cartesian product of the command line's lists, in batches of
    `max_batch_size`) that launches only the jobs `finished` does not rule out.
    """

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:  # noqa: D102
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        loader = self.hydra_context.config_loader
        params = self._parse_config() + list(arguments)  # `hydra.sweeper.params`, then the command line
        overrides = OverridesParser.create(config_loader=loader).parse_overrides(params)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        jobs = [job for batch in self.split_arguments(overrides, None) for job in batch]
        assert isinstance(loader, ConfigLoaderImpl)
        try:
            todo, skipped = plan(JobComposer(loader, self.config), jobs)
        except BadSweep as e:  # one line per distinct problem, before any job or folder is made
            for text, job in list(e.bad.items())[:10]:
                where = f" (job {','.join(job)})" if len(e.bad) > 1 else ""
                log.error("error: %s%s", text, where)
            log.error("nothing was run: %d of the sweep's %d job(s) have bad settings", e.n_bad, e.jobs)
            raise SystemExit(2) from None
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            with hold(sweep_dir):
                OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
                _log_plan(len(jobs), sweep_dir, len(todo), skipped)
                return self._launch(todo)
        except HarnessError as e:
            log.error("error: %s", e)
            raise SystemExit(2) from None

    def _launch(self, todo: list[list[str]]) -> list[Sequence[JobReturn]]:
        """Hand the jobs to the launcher, `max_batch_size` at a time (Hydra's BasicSweeper's loop)."""
        assert self.launcher is not None
        returns: list[Sequence[JobReturn]] = []
        size = self.max_batch_size or max(1, len(todo))
        for start in range(0, len(todo), size):
            results = self.launcher.launch(todo[start : start + size], initial_job_idx=start)
            for result in results:
                _ = result.return_value  # raises if the job raised
            returns.append(results)
        return returns


def _log_plan(jobs: int, sweep_dir: Path, todo: int, skipped: list[Path]) -> None:
    """The sweep's first lines: how many jobs it has and will run, then the skipped ones by name."""
    note = f", {len(skipped)} skipped (complete results of the same config, resume=true)" if skipped else ""
    log.info("sweep of %d job(s) into %s: %d to run%s", jobs, sweep_dir, todo, note)
    for folder in skipped[:NAMED]:
        log.info("%s: %s", folder.name, SKIPPED)
    if len(skipped) > NAMED:
        log.info("... and %d more skipped", len(skipped) - NAMED)
