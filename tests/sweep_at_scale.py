"""A sweep folder of many finished fake jobs, for the resume decision's tests and benchmark.

Each job's folder holds only a `run.json` with the job's config hash and no result files: enough for
`harness.results.read_job` to call it complete. The hashes and folders come from `JobComposer`, which
`test_resume_at_scale` holds to Hydra's own composition.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import setup_globals
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

import harness.sweep  # noqa: F401  (registers the resolvers that the configs use)
from harness.config import config_hash
from harness.results import ROW_FILE
from hydra_plugins.harness_sweeper.composer import JobComposer
from tests.conftest import CONF


def loader_and_master(overrides: list[str]) -> tuple[ConfigLoaderImpl, DictConfig]:
    """Hydra's config loader over `conf/` and the sweep's (master) config, as `python -m harness -m`
    composes them before sweeping.
    """
    setup_globals()  # Hydra's resolvers (`${hydra:...}`, `${now:...}`), as its command line does
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    return loader, loader.load_configuration("config", overrides, RunMode.MULTIRUN)


def folder_and_hash(job: DictConfig, reads_hydra: bool = True) -> tuple[Path, str]:
    """Where a composed job writes its results, and the hash of its task config (`reads_hydra`:
    see `JobComposer.reads_hydra`).
    """
    if reads_hydra:
        HydraConfig.instance().set_config(job)
    folder = Path(job.hydra.sweep.dir, job.hydra.sweep.subdir)
    task = job.copy()
    with read_write(task), open_dict(task):
        del task["hydra"]
    return folder, config_hash(task)


def seed_jobs(n: int, *common: str) -> list[list[str]]:
    """The jobs of `python -m harness -m <common> seed=range(0,n)`, as the sweeper lists them."""
    return [[*common, f"seed={i}"] for i in range(n)]


def write_finished(sweep: Path, jobs: list[list[str]]) -> JobComposer:
    """Write a complete fake job folder for each job of the sweep into `sweep`."""
    loader, master = loader_and_master([f"hydra.sweep.dir={sweep}"])
    composer = JobComposer(loader, master)
    for job in jobs:
        folder, digest = folder_and_hash(composer.compose(job), composer.reads_hydra(job))
        folder.mkdir(parents=True)
        (folder / ROW_FILE).write_text(json.dumps({"config_hash": digest, "files": {}}))
    return composer
