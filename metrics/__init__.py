"""Metrics of attribution maps: `(model, inputs, attributions, target, *, params) -> Result`, one file per
family, each function marked with its traits (`metrics.contract`).
"""

from metrics.complexity import complexity, sparseness
from metrics.contract import Curve, GroundTruth, MetricTraits, Result, field_name, metric, traits_of
from metrics.faithfulness import deletion, insertion
from metrics.imputation import noisy_linear_impute
from metrics.localisation import (
    energy_pointing_game,
    pointing_game,
    relevance_mass,
    relevance_rank,
)
from metrics.road import road
from metrics.robustness import infidelity, max_sensitivity
from metrics.sanity import model_randomisation, random_logit

__all__ = [
    "Curve",
    "GroundTruth",
    "MetricTraits",
    "Result",
    "complexity",
    "deletion",
    "energy_pointing_game",
    "field_name",
    "infidelity",
    "insertion",
    "max_sensitivity",
    "metric",
    "model_randomisation",
    "noisy_linear_impute",
    "pointing_game",
    "random_logit",
    "relevance_mass",
    "relevance_rank",
    "road",
    "sparseness",
    "traits_of",
]
