"""One job of a sweep: build it (`builder`), run it (`run_job`), and what it writes: the row's schema
(`row`), its tables and arrays (`files`), each call measured the same way (`measured`), and the maps
of an earlier sweep for `phase=evaluate` (`saved`).
"""

from harness.job.builder import Job, build, chunk_for, filled, function_name, pass_kinds, settings_of
from harness.job.files import maps_arrays, tables
from harness.job.measured import Measured, kernels_table, measure_call
from harness.job.row import bootstrap_ci, breakdown, environment, headline, job_fields, metric_fields, params
from harness.job.run import check_attributions, explain, explainer_with, run_job
from harness.job.saved import SavedMaps, saved_maps

__all__ = [
    "Job",
    "Measured",
    "SavedMaps",
    "bootstrap_ci",
    "breakdown",
    "build",
    "check_attributions",
    "chunk_for",
    "environment",
    "explain",
    "explainer_with",
    "filled",
    "function_name",
    "headline",
    "job_fields",
    "kernels_table",
    "maps_arrays",
    "measure_call",
    "metric_fields",
    "params",
    "pass_kinds",
    "run_job",
    "saved_maps",
    "settings_of",
    "tables",
]
