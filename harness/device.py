"""Where and how a job runs: the device, its speed options, and the memory budget for chunks.

Speed options, each recorded in the results row: autocast precision (`fp32`, `bf16`, `fp16`),
channels_last, cuDNN benchmark, TF32, and `torch.compile` with a selectable mode.

The memory budget replaces hand-set batch sizes. One chunk (the images that go through the model in
one forward, or one forward+backward) may use `memory_budget` times the free GPU memory, or times the
available RAM on CPU. A model's memory grows linearly with the batch: on CUDA the allocator's peak
is measured at two batch sizes, on CPU the activation sizes are summed (there is no allocator peak to
read). The chunk sizes that fit are candidates; the harness times them (`harness.calibration`) and
keeps one that runs at the model's best speed. A chunk that still runs out of memory is halved and
retried; the chunk used and the retries go in the row.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from harness.errors import HarnessError
from harness.model_speed import forward_backward_step, forward_step, tile_images

log = logging.getLogger("harness")
T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MiB = 2**20
# Candidate chunk sizes when the device config gives none: small on CPU, where large batches run no
# faster per image; up to 512 on a GPU, where they fill the device.
DEFAULT_BATCH_SIZES = {"cpu": (1, 2, 4, 8, 16), "cuda": (8, 16, 32, 64, 128, 256, 512)}


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when torch sees a GPU, else cpu; `cuda` without one is an error."""
    if name not in DEVICES:
        raise HarnessError(f"device.name={name!r}; expected one of {DEVICES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HarnessError(
            f"device=cuda but torch {torch.__version__} sees no CUDA GPU "
            f"(built for CUDA {torch.version.cuda}); use device=cpu or device=auto"
        )
    return torch.device(name)


def gpu_locks() -> Path:
    """Where the jobs of this user on this machine take turns on GPUs."""
    return Path(tempfile.gettempdir()) / f"attribution-harness-gpus-{os.getuid()}"


@contextlib.contextmanager
def claimed_gpu(count: int, locks: Path, poll_s: float = 0.5) -> Iterator[int]:
    """Hold one of `count` GPUs for the block: the first that no other job holds, waiting while
    all are held. Jobs that a local launcher (joblib) runs side by side thus get a GPU each.

    The claim is an exclusive `flock` on `locks/cuda<i>.lock`, which the system releases when the
    holder exits, however it exits.
    """
    locks.mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(count):
            f = (locks / f"cuda{i}.lock").open("w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield i
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(poll_s)


@contextlib.contextmanager
def job_device(device: torch.device) -> Iterator[torch.device]:
    """The device a job runs on: with several GPUs visible and none named (`cuda`, not `cuda:1`),
    one claimed for the job (see `claimed_gpu`); otherwise `device` itself.
    """
    count = torch.cuda.device_count() if device.type == "cuda" and device.index is None else 0
    if count < 2:
        yield device
        return
    with claimed_gpu(count, gpu_locks()) as i:
        torch.cuda.set_device(i)
        log.info("running on cuda:%d of %d visible GPUs", i, count)
        yield torch.device("cuda", i)


def device_settings(
    *,
    name: str,
    precision: str,
    channels_last: bool,
    cudnn_benchmark: bool,
    tf32: bool,
    compile: str | None,
    fold_batchnorm: bool,
    fold_padding: bool,
    memory_budget: float,
    batch_sizes: list[int] | None,
    batch_size: int | None,
    grad_batch_size: int | None,
) -> None:
    """The keys of a device config (`conf/device/*.yaml`) and their types: `harness.checks` checks
    the `device` node against this signature as it checks the other nodes against their functions'
    (what each key does and its default: `resolve_device`, `SpeedOptions`, `harness.calibration`).
    """


@dataclass(frozen=True)
class SpeedOptions:
    """How the model runs. Everything but `precision` and `compile` is exact in fp32 up to the order
    of floating-point sums; `tf32` and `cudnn_benchmark` act on CUDA only.

    Attributes:
        precision: `fp32` (no autocast), `bf16` or `fp16` autocast around every model call.
        channels_last: NHWC memory format for the model and its inputs.
        cudnn_benchmark: let cuDNN time its convolution algorithms per input shape.
        tf32: TensorFloat-32 matmuls and convolutions on Ampere and later GPUs.
        compile: a `torch.compile` mode, or None for eager execution.
        fold_batchnorm: fold each eval-mode BatchNorm into the convolution before it (see
            `fold_batchnorm`); the model computes the same function with fewer passes over memory.
        fold_padding: make a convolution's own symmetric zero padding module (TensorFlow-style
            "same" padding, as EfficientNet-Lite's) the convolution's padding (see `fold_padding`):
            the same function without a padded copy of each input.
    """

    precision: str = "fp32"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    tf32: bool = False
    compile: str | None = None
    fold_batchnorm: bool = False
    fold_padding: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise HarnessError(f"device.precision={self.precision!r}; expected one of {tuple(PRECISIONS)}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise HarnessError(f"device.compile={self.compile!r}; expected null or one of {COMPILE_MODES}")

    @classmethod
    def from_config(cls, node: Any) -> SpeedOptions:
        """From a device config (missing keys take the defaults; its types are checked by
        `harness.checks` against `device_settings`).
        """
        return cls(**{f.name: node.get(f.name, f.default) for f in fields(cls)})

    @property
    def memory_format(self) -> torch.memory_format:  # noqa: D102
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the chosen precision (a no-op for fp32)."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def apply_backend_flags(self) -> None:
        """Set the process-wide backend flags, both ways: jobs of a sweep share a process."""
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32

    def prepare(self, module: nn.Module, sample: torch.Tensor, keep: Collection[str] = ()) -> int:
        """Put `module` (in place) in the chosen memory format and, when set, fold its paddings and
        BatchNorms, checked on `sample` (a few of its inputs); returns how many BatchNorms were
        folded. The outputs of the modules named in `keep` (layers whose activations are read: a
        CAM layer, a layer whose channels are maximised) stay what they were.
        """
        module.to(memory_format=self.memory_format)
        sample = sample.contiguous(memory_format=self.memory_format)
        if self.fold_padding:
            fold_padding(module, sample)
        if not self.fold_batchnorm:
            return 0
        return fold_batchnorm(module, sample, keep=keep)

    def compiled(self, module: nn.Module) -> nn.Module:
        """The module compiled in the chosen mode (sharing its parameters), or itself when eager."""
        if self.compile is None:
            return module
        return torch.compile(module, mode=self.compile)  # type: ignore[return-value]

    def row(self) -> dict[str, Any]:
        """The options as results-row fields."""
        return asdict(self)


def fold_batchnorm(
    model: nn.Module, sample: torch.Tensor, rtol: float = 1e-4, keep: Collection[str] = ()
) -> int:
    """Fold every eval-mode `BatchNorm2d` into the `Conv2d` registered just before it in the same
    parent (conv, then BN: the order of torchvision's and EfficientNet's blocks), in place; the BN
    becomes an identity. Module names, and so CAM layers and hooks, stay as they were, but a folded
    convolution outputs what its BatchNorm did: the convolutions named in `keep` (qualified names),
    whose own outputs are read, are not folded.

    Registration order is not execution order in every model, so the result is checked: when the
    logits on `sample` move by more than `rtol` of their scale the model is restored and nothing is
    folded. Returns the number of BatchNorms folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = []
    for prefix, parent in model.named_modules():
        names = list(parent._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[a], parent._modules[b]
            if (
                isinstance(conv, nn.Conv2d)
                and type(bn) is nn.BatchNorm2d
                and not bn.training
                and bn.track_running_stats
                and conv.out_channels == bn.num_features
                and (f"{prefix}.{a}" if prefix else a) not in keep
            ):
                pairs.append((parent, a, b, conv, bn))
    if not pairs:
        return 0
    with torch.no_grad():
        before = model(sample)
    for parent, a, b, conv, bn in pairs:
        parent._modules[a] = fuse_conv_bn_eval(conv, bn)
        parent._modules[b] = nn.Identity()
    if not _same_logits(model, sample, before, rtol):
        for parent, a, b, conv, bn in pairs:
            parent._modules[a], parent._modules[b] = conv, bn
        log.warning("fold_batchnorm: folding changed the logits (module order is not call order); not folded")
        return 0
    return len(pairs)


def fold_padding(model: nn.Module, sample: torch.Tensor, rtol: float = 1e-4) -> int:
    """Make each `Conv2d` that pads its input through a symmetric `nn.ZeroPad2d` child named
    `static_padding` (TensorFlow-style "same" padding fixed for one image size: EfficientNet-Lite's
    and `efficientnet_pytorch`'s convolutions) pad by itself, in place: the convolution's kernel
    reads the zeros it needs instead of a padded copy of the input, forward and backward. Asymmetric
    paddings (the strided convolutions' `(0, 1, 0, 1)`) have no `Conv2d` equivalent and stay.

    The result is checked as `fold_batchnorm`'s is (a module whose forward does not use its
    `static_padding` that way is restored). Returns the number of paddings folded.
    """
    convs = []
    for m in model.modules():
        pad = getattr(m, "static_padding", None)
        if isinstance(m, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and m.padding_mode == "zeros":
            left, right, top, bottom = pad.padding
            if left == right and top == bottom and tuple(m.padding) == (0, 0):
                convs.append((m, pad, (top, left)))
    if not convs:
        return 0
    with torch.no_grad():
        before = model(sample)
    for m, _, padding in convs:
        m.padding, m.static_padding = padding, nn.Identity()
    if not _same_logits(model, sample, before, rtol):
        for m, pad, _ in convs:
            m.padding, m.static_padding = (0, 0), pad
        log.warning("fold_padding: folding changed the logits; not folded")
        return 0
    return len(convs)


def _same_logits(model: nn.Module, sample: torch.Tensor, before: torch.Tensor, rtol: float) -> bool:
    try:
        with torch.no_grad():
            after = model(sample)
    except RuntimeError:
        return False
    return after.shape == before.shape and torch.allclose(
        after, before, rtol=rtol, atol=rtol * float(before.abs().max())
    )


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
