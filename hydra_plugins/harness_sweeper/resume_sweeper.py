"""Hydra's basic sweeper, less the jobs that `resume=true` would skip: they are never launched.

Hydra's `BasicSweeper` composes every job's config in the sweeping process to catch composition
errors early, then hands all jobs to the launcher. `ResumeSweeper` uses that same composition to
decide, from the job's folder alone (`harness.resume.job_state`), whether the job already has
complete results of the same config; only the other jobs go to the launcher. A resumed sweep of
thousands of Slurm jobs then submits only the unfinished ones instead of an array of no-op tasks,
and a finished sweep resumes without starting a single job. Each job still checks its folder
itself (`harness.app.prepare`), so a launcher fed by another sweeper skips the same jobs, later.

Hydra accepts sweepers only from the `hydra_plugins` package, hence this module's place;
`conf/hydra/sweeper/basic_resume.yaml` selects it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from harness.resume import job_state

log = logging.getLogger("harness")


def finished(job: DictConfig) -> bool:
    """Whether a composed job (Hydra's config of one job, `hydra` node included) asks to resume
    and its folder holds complete results of the same config; `job_state` logs the skip.
    """
    if not job.get("resume"):
        return False
    folder = Path(job.hydra.sweep.dir, job.hydra.sweep.subdir).absolute()
    HydraConfig.instance().set_config(job)  # as the launcher does, for `${hydra:...}` in the config
    task = copy.deepcopy(job)  # the task's config, as `hydra.core.utils.run_job` makes it
    with read_write(task), open_dict(task):
        del task["hydra"]
    return job_state(task, folder).kept


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
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        returns: list[Sequence[JobReturn]] = []
        launched = skipped = 0
        for batch in self.split_arguments(overrides, self.max_batch_size):
            todo = []
            for job in batch:
                # Composing each job here also checks it before any is launched, as BasicSweeper does.
                if finished(loader.load_sweep_config(self.config, list(job))):
                    skipped += 1
                else:
                    todo.append(job)
            if todo:
                results = self.launcher.launch(todo, initial_job_idx=launched)
                for result in results:
                    _ = result.return_value  # raises if the job raised
                launched += len(todo)
                returns.append(results)
        if skipped:
            log.info("resume: %d job(s) skipped, %d launched", skipped, launched)
        return returns
