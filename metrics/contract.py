"""What every metric returns and declares, whatever its family.

A metric is a plain function `(model, inputs, attributions, target, *, params) -> Result`, marked with
`@metric(...)`: the direction of each value it returns (higher or lower is better) and what it needs
beyond its four arguments (`explain`, the method as a callable that re-explains perturbed inputs;
`ground_truth`, the data's known evidence). The job, the report and the tests read these traits from
the function (`traits_of`); no list of metric names lives anywhere else.

A result holds per-image values `[B]` keyed by what they are (`auc`, `morf_auc`, ...; `""` for a metric
whose value is the metric itself) and optional curves. The row names a value `<metric>_<key>` (or
`<metric>` for `""`): `deletion` returns `{"auc": ...}`, hence the row's `deletion_auc`.

`GroundTruth` is the known evidence of a batch of images (object masks and boxes): the data loaders
make it, the localisation metrics and the `oracle` method read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar

import torch

Better = Literal["higher", "lower"]
NEEDS = ("explain", "explain_with", "trained", "ground_truth", "normalization")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Curve:
    """Scores along a curve of perturbations.

    Attributes:
        fractions: `[S+1]` fraction of pixels changed at each point, 0 to 1.
        scores: `[B, S+1]` score of the target class at each point.
        auc: `[B]` area under each image's curve (how, the metric says).
    """

    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor


@dataclass
class GroundTruth:
    """The known evidence of a batch of images.

    Attributes:
        mask: `[B, H, W]` bool, the pixels of the object (or of its boxes, where only boxes are known).
        box: `[B, H, W]` bool, the object's bounding box (or the union of its boxes).
    """

    mask: torch.Tensor
    box: torch.Tensor

    @classmethod
    def from_masks(cls, mask: torch.Tensor) -> GroundTruth:
        """The ground truth of exact masks `[B, H, W]`; each box is its mask's bounding box."""
        rows, cols = mask.any(dim=2), mask.any(dim=1)
        idx_r, idx_c = torch.arange(mask.shape[1]), torch.arange(mask.shape[2])
        big = max(mask.shape[1], mask.shape[2])
        top = torch.where(rows, idx_r, big).amin(dim=1)
        bottom = torch.where(rows, idx_r, -1).amax(dim=1)
        left = torch.where(cols, idx_c, big).amin(dim=1)
        right = torch.where(cols, idx_c, -1).amax(dim=1)
        box = (
            (idx_r[None, :, None] >= top[:, None, None])
            & (idx_r[None, :, None] <= bottom[:, None, None])
            & (idx_c[None, None, :] >= left[:, None, None])
            & (idx_c[None, None, :] <= right[:, None, None])
        )
        return cls(mask, box)

    def __getitem__(self, rows: slice | torch.Tensor) -> GroundTruth:
        return GroundTruth(self.mask[rows], self.box[rows])

    def to(self, device: torch.device | str) -> GroundTruth:
        """The same ground truth on `device`."""
        return GroundTruth(self.mask.to(device), self.box.to(device))


@dataclass
class Result:
    """A metric's answer for a batch of images.

    Attributes:
        values: per-image values `[B]` by key; the metric's traits give each key's direction.
        curves: curves by key (`""` for the metric's only curve), for the tables and plots.
        arrays: per-image arrays `[B, ...]` by key for the figures (the sanity checks' maps of the
            randomised models), saved with the job's maps as `<metric>_<key>`.
    """

    values: dict[str, torch.Tensor]
    curves: dict[str, Curve] = field(default_factory=dict)
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricTraits:
    """What a metric declares about itself.

    Attributes:
        better: direction of each value key the metric can return.
        needs: what the job must pass besides (model, inputs, attributions, target): `explain`, a
            callable `(inputs [N, C, H, W], target [N]) -> maps [N, 1 or C, H, W]` that re-runs the
            method; `explain_with`, the same with the model to run as first argument; `trained`, the
            model as loaded (eager, fp32, before speed options), which the metric must not modify;
            `ground_truth` (`GroundTruth` of the images); `normalization`, the
            model's `mean` and `std` per channel (tuples) that map [0, 1] pixels to its inputs.
        check: raises `ValueError` naming a bad parameter value and what is allowed; called with the
            metric's keyword parameters before any model work (and by the metric itself).
    """

    better: Mapping[str, Better]
    needs: frozenset[str] = frozenset()
    check: Callable[..., None] | None = None


def metric(
    *, better: Mapping[str, Better], needs: Iterable[str] = (), check: Callable[..., None] | None = None
) -> Callable[[F], F]:
    """Mark a function as a metric with its traits (see `MetricTraits`)."""
    needs = frozenset(needs)
    unknown = needs - set(NEEDS)
    if unknown or any(b not in ("higher", "lower") for b in better.values()):
        raise ValueError(f"metric traits: needs {sorted(needs)} must be among {NEEDS}; better {dict(better)}")

    def mark(fn: F) -> F:
        fn.traits = MetricTraits(dict(better), needs, check)  # type: ignore[attr-defined]
        return fn

    return mark


def traits_of(fn: Any) -> MetricTraits:
    """The traits of a metric function, or of a `functools.partial` of one (what Hydra builds)."""
    while isinstance(fn, partial):
        fn = fn.func
    found = getattr(fn, "traits", None)
    if not isinstance(found, MetricTraits):
        raise TypeError(f"{getattr(fn, '__name__', fn)!r} is not a metric: mark it with @metrics.metric(...)")
    return found


def field_name(metric_name: str, key: str) -> str:
    """The row's name of a value or curve: `<metric>_<key>`, or `<metric>` for key `""`."""
    return f"{metric_name}_{key}" if key else metric_name
