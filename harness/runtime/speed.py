"""How the model runs: autocast precision, memory format, cuDNN and TF32 flags, `torch.compile`, and
BatchNorm and padding folding (`harness.runtime.folding`), each recorded in the results row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from harness.config import DeviceSettings, SpeedSettings
from harness.runtime.folding import fold_batchnorm, fold_padding

# The dtype of each precision's autocast (None: no autocast).
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SpeedOptions(SpeedSettings):
    """The speed settings (`harness.config.SpeedSettings`) put to work on a model and its calls;
    `tf32` and `cudnn_benchmark` act on CUDA only.
    """

    @classmethod
    def from_settings(cls, device: DeviceSettings) -> SpeedOptions:
        """The speed options of the device settings."""
        return cls(**{f.name: getattr(device, f.name) for f in fields(SpeedSettings)})

    @classmethod
    def from_config(cls, node: Any) -> SpeedOptions:
        """From a device config node (checked as `DeviceSettings`; missing keys take the defaults)."""
        return cls.from_settings(DeviceSettings.from_config(node))

    @property
    def memory_format(self) -> torch.memory_format:  # noqa: D102
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the chosen precision (a no-op for fp32)."""
        dtype = DTYPES[self.precision]
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
