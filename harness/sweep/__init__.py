"""The sweep: the Hydra app behind `python -m harness` (one call of `main` per job), the resume
decision, and the report at the end (`ReportCallback`). The sweeper that launches only unfinished
jobs lives in `hydra_plugins/harness_sweeper`, where Hydra looks for plugins.
"""

from harness.sweep.app import check_choices, check_output, cli, job_dir, main, shared_folder
from harness.sweep.callback import ReportCallback, report_is_current
from harness.sweep.resume import SKIPPED, clear, job_state

__all__ = [
    "SKIPPED",
    "ReportCallback",
    "check_choices",
    "check_output",
    "clear",
    "cli",
    "job_dir",
    "job_state",
    "main",
    "report_is_current",
    "shared_folder",
]
