"""Metrics of attribution maps: `(model, inputs, attributions, target, *, params) -> Result`, one file per
family, each function marked with its traits (`metrics.contract`).
"""

from metrics.complexity import complexity, sparseness
from metrics.contract import Curve, MetricTraits, Result, field_name, metric, traits_of
from metrics.faithfulness import deletion, insertion
from metrics.imputation import noisy_linear_impute
from metrics.road import road
from metrics.robustness import infidelity, max_sensitivity

__all__ = [
    "Curve",
    "MetricTraits",
    "Result",
    "complexity",
    "deletion",
    "field_name",
    "infidelity",
    "insertion",
    "max_sensitivity",
    "metric",
    "noisy_linear_impute",
    "road",
    "sparseness",
    "traits_of",
]
