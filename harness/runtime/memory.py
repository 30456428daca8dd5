"""The memory budget that replaces hand-set batch sizes, and the retry that halves a chunk that
still runs out of memory.

One chunk (the images that go through the model in one forward, or one forward+backward) may use
`memory_budget` times the free GPU memory, or times the available RAM on CPU. A model's memory grows
linearly with the batch: on CUDA the allocator's peak is measured at two batch sizes, on CPU the
activation sizes are summed (there is no allocator peak to read). The chunk sizes that fit are
candidates; the harness times them (`harness.runtime.calibration`) and keeps one that runs at the
model's best speed. A chunk that still runs out of memory is halved and retried; the chunk used and
the retries go in the row.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from harness.config import HarnessError
from harness.runtime.model_speed import forward_backward_step, forward_step, tile_images

log = logging.getLogger("harness")
T = TypeVar("T")
MiB = 2**20
# Candidate chunk sizes when the device config gives none: small on CPU, where large batches run no
# faster per image; up to 512 on a GPU, where they fill the device.
DEFAULT_BATCH_SIZES = {"cpu": (1, 2, 4, 8, 16), "cuda": (8, 16, 32, 64, 128, 256, 512)}


@dataclass(frozen=True)
class MemoryModel:
    """Bytes a batch of `b` images needs in one kind of pass: `fixed + per_image * b`.

    Attributes:
        fixed: bytes whatever the batch (workspaces, a compiled graph's buffers).
        per_image: bytes per image: the input and the activations that live at once.
        how: `allocator` (CUDA's peak, measured at two batch sizes) or `activations` (sizes summed
            over one forward; an estimate).
    """

    fixed: float
    per_image: float
    how: str

    def bytes(self, batch: int) -> float:  # noqa: D102
        return self.fixed + self.per_image * batch


def available_memory(device: torch.device) -> int:
    """Bytes this process could still use: free GPU memory plus the allocator's unused cache, or on
    CPU the kernel's MemAvailable.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _activation_memory(model: nn.Module, image: torch.Tensor, grad: bool) -> MemoryModel:
    """Estimate from one image's tensors. Without autograd only a layer's input and output live at
    once (the largest such pair, besides the image). With autograd the forward keeps the tensors
    saved for backward (read through autograd's saved-tensor hooks; storage shared by several saved
    tensors counted once, the parameters and the image not again), and the backward adds gradients
    about the size of the largest activation, twice.
    """
    pairs: list[int] = []

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        pairs.append(_nbytes(args) + _nbytes(out))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    x = image.detach().requires_grad_() if grad else image
    counted_elsewhere = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counted_elsewhere.add(x.untyped_storage().data_ptr())
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in counted_elsewhere:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    try:
        if grad:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(x)
        else:
            with torch.no_grad():
                model(x)
    finally:
        for h in handles:
            h.remove()
    x_bytes, largest = _nbytes(image), max(pairs, default=0)
    per_image = x_bytes + sum(saved.values()) + 2 * largest if grad else x_bytes + largest
    return MemoryModel(0.0, float(per_image), "activations")


def _allocator_memory(model: nn.Module, tile: Callable[[int], torch.Tensor], grad: bool) -> MemoryModel:
    """CUDA's allocator peak over one pass at 1 and at 8 images; the slope is the cost per image."""
    device = next(model.parameters()).device
    step = forward_backward_step if grad else forward_step
    peaks = {}
    for b in (1, 8):
        x = tile(b)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(model, x)
        torch.cuda.synchronize(device)
        peaks[b] = torch.cuda.max_memory_allocated(device) - base + _nbytes(x)
        del x
    per_image = max((peaks[8] - peaks[1]) / 7, peaks[8] / 8 / 4)  # rounding of small blocks: floor
    return MemoryModel(max(0.0, peaks[1] - per_image), per_image, "allocator")


def image_memory(
    model: nn.Module,
    sample: torch.Tensor,
    device: torch.device,
    grad: bool,
    memory_format: torch.memory_format,
) -> MemoryModel:
    """Memory that batches of `sample`'s images need on `device`, with or without autograd."""

    def tile(b: int) -> torch.Tensor:
        return tile_images(sample, b, device, memory_format)

    if device.type == "cuda":
        return _allocator_memory(model, tile, grad)
    return _activation_memory(model, tile(1), grad)


def fitting_sizes(sizes: Sequence[int], memory: MemoryModel, budget: float, what: str) -> list[int]:
    """The candidate chunk sizes whose memory fits the budget; an error when not even the smallest does."""
    fits = sorted(b for b in sizes if memory.bytes(b) <= budget)
    if not fits:
        need = memory.bytes(min(sizes)) / MiB
        raise HarnessError(
            f"no chunk size of {sorted(sizes)} fits the memory budget for {what}: {budget / MiB:.0f} MiB "
            f"(device.memory_budget times the free memory) < {need:.0f} MiB for {min(sizes)} image(s); "
            "raise device.memory_budget, free memory, or use a smaller model.input_size"
        )
    return fits


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure to allocate."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def halving_on_oom(
    call: Callable[[int], T], chunk: int, device: torch.device, what: str
) -> tuple[T, int, int]:
    """`call(chunk)`, halving `chunk` after each out-of-memory error.

    Returns the result, the chunk size that ran and the number of retries. Running out of memory at
    a chunk of one image is an error that says so.
    """
    retries = 0
    while True:
        try:
            return call(chunk), chunk, retries
        except Exception as e:  # only out-of-memory is retried
            if not is_out_of_memory(e):
                raise
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
        _free(device)
        if chunk <= 1:
            raise HarnessError(f"{what} ran out of {device.type} memory with one image per chunk: {message}")
        log.warning("%s ran out of memory at chunk_size=%d; retrying with %d", what, chunk, chunk // 2)
        chunk, retries = chunk // 2, retries + 1


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
