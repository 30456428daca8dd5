"""The resume decision at scale (`make bench`): which of 10,000 finished jobs a resumed sweep launches.

The sweeper composes each job (once per distinct set of group choices, then the job's own overrides,
see `JobComposer`), hashes its config and reads its `run.json`. Before it, Hydra composed every job
in full: about 0.06 to 0.23 s a job on 2 CPU cores, 10 to 40 minutes for 10,000 jobs.
"""

from __future__ import annotations

import pytest

from harness.runtime import machine_id
from hydra_plugins.harness_sweeper.composer import JobComposer
from hydra_plugins.harness_sweeper.resume_sweeper import plan
from tests.sweep_at_scale import loader_and_master, seed_jobs, write_finished

JOBS = 10_000


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("finished") / "sweep"
    jobs = seed_jobs(
        JOBS, "model=resnet18", "method=integrated_gradients", "data.num_images=500", "resume=true"
    )
    write_finished(sweep, jobs)
    return sweep, jobs


def test_resume_decision_over_10000_finished_jobs(benchmark, finished_sweep):
    sweep, jobs = finished_sweep
    loader, master = loader_and_master([f"hydra.sweep.dir={sweep}"])
    benchmark.extra_info["machine"] = machine_id()
    benchmark.extra_info["jobs"] = JOBS
    todo, _ = benchmark.pedantic(lambda: plan(JobComposer(loader, master), jobs), rounds=3, iterations=1)
    assert todo == []
