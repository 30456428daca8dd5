"""Where and how fast a job runs: the device and its locks, the speed options and the folding they
allow, the memory budget, honest timing (clocks, counted and bounded passes, the model's own speed),
the calibration shared by a sweep's jobs, profiling and the progress bar.
"""

from harness.runtime.calibration import CALIBRATION_DIR, Calibration, calibrate, calibration_facts
from harness.runtime.clock import Stopwatch, machine_id, peak_memory_mb, synchronize, timed
from harness.runtime.device import claimed_gpu, gpu_locks, job_device, resolve_device
from harness.runtime.folding import fold_batchnorm, fold_padding
from harness.runtime.memory import (
    DEFAULT_BATCH_SIZES,
    MemoryModel,
    available_memory,
    fitting_sizes,
    halving_on_oom,
    image_memory,
    is_out_of_memory,
)
from harness.runtime.model_speed import (
    KINDS,
    ModelSpeed,
    fastest,
    forward_backward_step,
    forward_step,
    tile_images,
)
from harness.runtime.passes import ForwardCounter, StopEarly, count_forwards, first_passes, image_rows
from harness.runtime.profiling import KernelProfile, profile_call
from harness.runtime.progress import Progress
from harness.runtime.speed import SpeedOptions
from harness.runtime.timing import Timing, measure

__all__ = [
    "CALIBRATION_DIR",
    "DEFAULT_BATCH_SIZES",
    "KINDS",
    "Calibration",
    "ForwardCounter",
    "KernelProfile",
    "MemoryModel",
    "ModelSpeed",
    "Progress",
    "SpeedOptions",
    "StopEarly",
    "Stopwatch",
    "Timing",
    "available_memory",
    "calibrate",
    "calibration_facts",
    "claimed_gpu",
    "count_forwards",
    "fastest",
    "first_passes",
    "fitting_sizes",
    "fold_batchnorm",
    "fold_padding",
    "forward_backward_step",
    "forward_step",
    "gpu_locks",
    "halving_on_oom",
    "image_memory",
    "image_rows",
    "is_out_of_memory",
    "job_device",
    "machine_id",
    "measure",
    "peak_memory_mb",
    "profile_call",
    "resolve_device",
    "synchronize",
    "tile_images",
    "timed",
]
