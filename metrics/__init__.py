"""Faithfulness metrics: `(model, inputs, attributions, target, *, params) -> Curve`."""

from metrics.faithfulness import HIGHER_IS_BETTER, Curve, deletion, insertion

__all__ = ["HIGHER_IS_BETTER", "Curve", "deletion", "insertion"]
