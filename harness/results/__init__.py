"""A job folder on disk: its files, written atomically, and whether they are complete.

The job writes them (`harness.job`), the sweep decides from them whether a job must run again
(`harness.sweep`), the report reads them (`harness.report`). Nothing here imports torch, so that a
resumed sweep decides in milliseconds which jobs are finished.
"""

from harness.results.files import (
    ERROR_FILE,
    MAPS_FILE,
    NOT_APPLICABLE_FILE,
    RESULT_FILES,
    ROW_FILE,
    atomic_write,
    read_maps,
    write_files,
    write_job,
    write_row,
)
from harness.results.folders import JobState, complete_jobs, read_job, remove_temporaries, set_aside

__all__ = [
    "ERROR_FILE",
    "MAPS_FILE",
    "NOT_APPLICABLE_FILE",
    "RESULT_FILES",
    "ROW_FILE",
    "JobState",
    "atomic_write",
    "complete_jobs",
    "read_job",
    "read_maps",
    "remove_temporaries",
    "set_aside",
    "write_files",
    "write_job",
    "write_row",
]
