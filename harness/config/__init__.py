"""Settings, checked once: the one error type for bad input, checks of every config node against
the function it builds, the typed settings (`Settings`: `DeviceSettings`, `TimingSettings`,
`JobSettings`) and the hashes that identify a job's results and maps.

Nothing here imports torch: the sweep checks and hashes every job before it launches any.
"""

from harness.config.checks import CHOSEN_BY_JOB, as_declared, check_node, describe, matches, unknown_setting
from harness.config.composition import composition_message, hydra_errors_in_one_line
from harness.config.errors import HarnessError, Inapplicable, MissingFile, first_line
from harness.config.keys import cache_root, config_hash, digest, explain_key, file_sha256, weights_sha256
from harness.config.paths import check_paths, names_a_file, output_problem, read_listing
from harness.config.settings import (
    COMPILE_MODES,
    DEVICES,
    PHASES,
    PRECISIONS,
    DeviceSettings,
    JobSettings,
    Settings,
    SpeedSettings,
    TimingSettings,
    check_config,
)

__all__ = [
    "CHOSEN_BY_JOB",
    "COMPILE_MODES",
    "DEVICES",
    "PHASES",
    "PRECISIONS",
    "DeviceSettings",
    "HarnessError",
    "Inapplicable",
    "JobSettings",
    "MissingFile",
    "Settings",
    "SpeedSettings",
    "TimingSettings",
    "as_declared",
    "cache_root",
    "check_config",
    "check_node",
    "check_paths",
    "composition_message",
    "config_hash",
    "describe",
    "digest",
    "explain_key",
    "file_sha256",
    "first_line",
    "hydra_errors_in_one_line",
    "matches",
    "names_a_file",
    "output_problem",
    "read_listing",
    "unknown_setting",
    "weights_sha256",
]
