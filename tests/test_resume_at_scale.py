"""Resume at scale: the sweeper composes each job the way Hydra does, at a fraction of the cost,
and a resume of a thousand finished jobs launches only those whose results are missing or of
another config.
"""

from __future__ import annotations

import json
import time

import pytest
from omegaconf import OmegaConf

from harness.results import ROW_FILE
from hydra_plugins.harness_sweeper.composer import JobComposer
from hydra_plugins.harness_sweeper.resume_sweeper import plan
from tests.sweep_at_scale import folder_and_hash, loader_and_master, seed_jobs, write_finished

MASTER = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=small_cnn,resnet18"]
JOBS = [
    ["model=small_cnn", "method=saliency", "seed=1"],
    ["seed=2", "model=resnet18", "method=rise", "method.n_masks=10", "data.num_images=2"],
    ["model=small_cnn", "metric=[deletion]", "metric.deletion.steps=7", "+foo=bar", "resume=true"],
    ["model=small_cnn", "~metric", "+metric=insertion", "experiment=quick"],
    ["model=small_cnn", "device=cpu", "device.batch_size=4", "++seed=5", "data=image_folder", "data.root=/a"],
    [
        "model=small_cnn",
        "hydra.launcher.n_jobs=1",
        "hydra.job.name=x",
        "model.width=8",
        "timing.profile=false",
    ],
    ["model=small_cnn", "+extra='${hydra:job.name}'", "method=occlusion", "method.window=8"],
]


@pytest.mark.parametrize("job", JOBS, ids=lambda job: " ".join(job))
def test_the_composer_gives_the_config_hydra_composes(tmp_path, job):
    loader, master = loader_and_master([f"hydra.sweep.dir={tmp_path}", *MASTER])
    composer = JobComposer(loader, master)
    composer.compose(["model=small_cnn", "seed=9"])  # a base composed for another job first
    fast, hydra = composer.compose(job), loader.load_sweep_config(master, job)
    assert OmegaConf.to_container(fast) == OmegaConf.to_container(hydra)  # every field, hydra node included
    assert folder_and_hash(fast) == folder_and_hash(hydra)  # resolved: the job's folder and config hash
    assert composer.reads_hydra(job) == ("${hydra:" in OmegaConf.to_yaml(hydra))


def test_the_composer_refuses_what_hydra_refuses(tmp_path):
    loader, master = loader_and_master([f"hydra.sweep.dir={tmp_path}"])
    composer = JobComposer(loader, master)
    for job in (["data.root=/a"], ["method=nope"], ["+seed=3"]):
        with pytest.raises(Exception) as ours:
            composer.compose(job)
        with pytest.raises(Exception) as theirs:
            loader.load_sweep_config(master, job)
        assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


def test_a_resume_of_a_thousand_finished_jobs_launches_only_the_missing_and_the_changed(tmp_path):
    jobs = seed_jobs(1000, "model=small_cnn", "method=saliency", "resume=true")
    write_finished(tmp_path, jobs)
    loader, master = loader_and_master([f"hydra.sweep.dir={tmp_path}"])
    changed, missing = (
        tmp_path / "method=saliency,model=small_cnn,seed=17",
        tmp_path / "method=saliency,model=small_cnn,seed=834",
    )
    row = json.loads((changed / ROW_FILE).read_text())
    (changed / ROW_FILE).write_text(json.dumps({**row, "config_hash": "of-another-config"}))
    (missing / ROW_FILE).unlink()

    t0 = time.perf_counter()
    todo, skipped = plan(JobComposer(loader, master), jobs)
    elapsed = time.perf_counter() - t0
    assert todo == [jobs[17], jobs[834]] and len(skipped) == len(jobs) - 2
    print(f"resume decision: {len(jobs)} jobs in {elapsed:.1f} s, {elapsed / len(jobs) * 1e3:.2f} ms per job")

    # Without resume=true every job runs again, whatever its folder holds.
    plain = [[o for o in job if o != "resume=true"] for job in jobs[:50]]
    assert plan(JobComposer(loader, master), plain) == (plain, [])
