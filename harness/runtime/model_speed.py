"""The model's own speed on a device, the unit of every bound: loops of plain forward and of
forward+backward passes at each candidate batch size, and the choice of batch sizes from them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from harness.runtime.clock import synchronize, timed

# The two kinds of model pass: plain forwards (perturbations, curves) and forward+backward (gradients).
KINDS = ("forward", "forward_backward")


def tile_images(
    sample: torch.Tensor, n: int, device: torch.device, memory_format: torch.memory_format
) -> torch.Tensor:
    """`n` images on `device`: the sample's images repeated in order."""
    x = sample.repeat((-(-n // len(sample)), 1, 1, 1))[:n]
    return x.to(device).contiguous(memory_format=memory_format)


def forward_step(model: nn.Module, x: torch.Tensor) -> None:
    """One plain forward pass, no autograd: what perturbation methods and the curves pay per image."""
    with torch.no_grad():
        model(x)


def forward_backward_step(model: nn.Module, x: torch.Tensor) -> None:
    """One forward+backward pass to the input only, as attribution methods take gradients."""
    xg = x.detach().requires_grad_()
    torch.autograd.grad(model(xg).float().logsumexp(dim=1).sum(), xg)


def fastest(per_image_ms: dict[int, float], tolerance: float = 0.05, largest: bool = True) -> int:
    """Of the batch sizes whose time per image is within `tolerance` of the best one's, the largest
    (or, with `largest=False`, the smallest).

    A GPU runs a large batch as fast per image as a smaller one once it is saturated, and fewer
    chunks mean fewer launches: the largest. A CPU gains nothing from a batch larger than it needs,
    and on the 2-core test machine the largest candidate (16 EfficientNet-Lite0 images) ran from
    7.9 to 14 ms per image depending on the process, where 4 and 8 held at 7.6 to 9.8: the smallest.

    Example:
        >>> fastest({1: 3.0, 8: 1.0, 16: 1.04, 32: 1.2}), fastest({1: 3.0, 8: 1.0, 16: 1.04}, largest=False)
        (16, 8)
    """
    best = min(per_image_ms.values())
    near = [b for b, ms in per_image_ms.items() if ms <= best * (1 + tolerance)]
    return max(near) if largest else min(near)


class ModelSpeed:
    """The model's own cost per image on a device: the unit of every bound.

    Times loops of plain forward passes (no autograd) and of forward+backward passes (gradient to
    the input only, as attribution methods take it) on real inputs, each loop covering at least
    `min_images` images and one batch. Each batch size is warmed up once, before its first loop: on
    a CPU the first pass at a new batch size ran 7% to 60% slower than the next ones.

    Attributes:
        per_batch_ms: per kind (`forward`, `forward_backward`), the best time per image of each
            batch size measured (see `calibrate`) or adopted from a measurement made before.
        batch_size: images per plain forward: the largest size at the best speed.
        grad_batch_size: images per forward+backward, chosen the same way (None: not measured).
        forward_ms: the best forward time per image seen so far (at `batch_size`).
        forward_backward_ms: the best forward+backward time per image seen so far (None: not measured).
    """

    def __init__(
        self,
        model: nn.Module,
        sample: torch.Tensor,
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
        min_images: int = 8,
    ) -> None:
        self.model, self.sample, self.device = model, sample, device
        self.memory_format, self.min_images = memory_format, min_images
        self.per_batch_ms: dict[str, dict[int, float]] = {}
        self.batch_size: int = 1
        self.grad_batch_size: int | None = None
        self.forward_ms = float("inf")
        self.forward_backward_ms: float | None = None
        self._tiled: dict[int, torch.Tensor] = {}
        self._warm: set[tuple[str, int]] = set()
        self._last: dict[str, tuple[float, float]] = {}  # kind -> (when it ended, ms per image)

    def _inputs(self, bs: int) -> torch.Tensor:
        """The sample tiled to `bs` images on the device, built once per batch size."""
        if bs not in self._tiled:
            self._tiled[bs] = tile_images(self.sample, bs, self.device, self.memory_format)
        return self._tiled[bs]

    def loop_ms(self, kind: str, bs: int) -> float:
        """Time per image of one loop of `kind` passes at batch size `bs` over at least `min_images`
        images, warmed up on the first use of the size.
        """
        x, calls = self._inputs(bs), -(-self.min_images // bs)
        step = forward_backward_step if kind == "forward_backward" else forward_step
        if (kind, bs) not in self._warm:
            step(self.model, x)
            synchronize(self.device)
            self._warm.add((kind, bs))

        def loop() -> None:
            for _ in range(calls):
                step(self.model, x)

        synchronize(self.device)
        _, ms = timed(loop, self.device)
        return ms / (calls * bs)

    def calibrate(self, sizes: Mapping[str, Sequence[int]], rounds: int = 3) -> dict[str, dict[int, float]]:
        """Time a loop at every (kind, size) in turn, `rounds` times over, and keep the best of each.

        Going round all sizes before repeating any, rather than repeating each size in a row, spreads
        a noisy stretch of time over all of them instead of over the few that it happened to hit;
        the best of the rounds then leaves it out. Returns and adopts (see `adopt`) the tables.
        """
        best = {kind: dict.fromkeys(sorted(table), float("inf")) for kind, table in sizes.items()}
        for _ in range(rounds):
            for kind, table in best.items():
                for bs in table:
                    table[bs] = min(table[bs], self.loop_ms(kind, bs))
        self.adopt(best)
        return best

    def adopt(self, per_batch_ms: dict[str, dict[int, float]]) -> None:
        """Take the loop speeds by kind and batch size (measured now, or in an earlier job of the
        sweep) and choose each kind's batch size from them (see `fastest`: the smallest size near
        the best speed on a CPU, the largest on a GPU).
        """
        self.per_batch_ms |= {kind: dict(table) for kind, table in per_batch_ms.items() if table}
        largest = self.device.type != "cpu"
        forward = self.per_batch_ms.get("forward")
        if forward:
            self.batch_size = fastest(forward, largest=largest)
            self.forward_ms = forward[self.batch_size]
        backward = self.per_batch_ms.get("forward_backward")
        if backward:
            self.grad_batch_size = fastest(backward, largest=largest)
            self.forward_backward_ms = backward[self.grad_batch_size]

    @property
    def per_batch_backward_ms(self) -> dict[int, float]:
        """Forward+backward time per image by batch size ({} when not measured)."""
        return self.per_batch_ms.get("forward_backward", {})

    def now(self, kinds: Iterable[str], max_age_s: float = 0.0) -> dict[str, float]:
        """Per image, in ms: one loop of each kind asked for at its chosen batch size, timed now, or
        the last such loop when it ended less than `max_age_s` ago. Keeps the best seen.
        """
        out = {}
        for kind in kinds:
            bs = self.batch_size if kind == "forward" else self.grad_batch_size
            if bs is None:
                raise RuntimeError("a call backpropagated in a job that timed no forward+backward passes")
            ended, ms = self._last.get(kind, (-float("inf"), float("nan")))
            if time.perf_counter() - ended >= max_age_s:
                ms = self.loop_ms(kind, bs)
                self._last[kind] = (time.perf_counter(), ms)
            out[kind] = ms
            if kind == "forward":
                self.forward_ms = min(self.forward_ms, ms)
            else:
                self.forward_backward_ms = min(self.forward_backward_ms or float("inf"), ms)
        return out
