"""DeepLIFT's rescale rule (Shrikumar et al. 2017, arXiv:1704.02685, section 3.5.1) and DeepLIFT-SHAP
(Lundberg and Lee 2017, arXiv:1705.07874, section 4.2), at the model's own cost.

The multipliers come from one pass of the model (`methods.rescale`: a forward of the baselines, then
one forward and one backward of the images, each nonlinearity's call paired with the baseline's). A
model that calls what the pass does not cover (a softmax inside it, LayerNorm, GELU, a product of two
activations) gets Captum's `DeepLift`/`DeepLiftShap` instead, said once in the log: the two agree on
the models Captum handles (tests/test_deeplift.py), where Captum rescales only modules of the types
it knows, one module per call site (`harness.models.ReLU6`).
"""

from __future__ import annotations

import logging
import weakref
from typing import Annotated, Literal

import torch
from annotated_types import Ge
from captum.attr import DeepLift, DeepLiftShap
from torch import nn

from methods.common import Count, chunked, method
from methods.rescale import NotCovered, rescale

log = logging.getLogger("harness")
Implementation = Literal["auto", "captum"]


_CAPTUM_BECAUSE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _with_fallback(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, baselines: torch.Tensor, chunk: int,
    implementation: Implementation,
) -> torch.Tensor:  # fmt: skip
    if implementation == "auto" and model not in _CAPTUM_BECAUSE:
        try:
            return rescale(model, inputs, target, baselines, chunk)
        except NotCovered as e:
            _CAPTUM_BECAUSE[model] = str(e)
            log.info("deeplift: Captum's path for %s: it calls %s", type(model).__name__, e)
    k = baselines.shape[0]
    if k == 1:
        explainer = DeepLift(model)
        return chunked(lambda x, t: explainer.attribute(x, baselines, target=t), inputs, target, chunk)
    shap = DeepLiftShap(model)
    return chunked(lambda x, t: shap.attribute(x, baselines, target=t), inputs, target, max(1, chunk // k))


@method(eager_only=True)
def deeplift(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, implementation: Implementation = "auto",
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """DeepLIFT's rescale rule from a zero baseline (Shrikumar et al. 2017, arXiv:1704.02685), equal
    to Captum's `DeepLift`: `implementation=auto` takes the rescale pass of this module where it
    covers the model (Captum's otherwise), `captum` always Captum's. `[B, C, H, W]`.
    """
    return _with_fallback(model, inputs, target, torch.zeros_like(inputs[:1]), chunk_size, implementation)


@method(eager_only=True, stochastic=True)
def deeplift_shap(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, n_baselines: Count = 10,
    stdev: Annotated[float, Ge(0)] = 1.0, implementation: Implementation = "auto", chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """DeepLIFT-SHAP (Lundberg and Lee 2017, arXiv:1705.07874, section 4.2): DeepLIFT's attributions
    averaged over `n_baselines` baselines, here images of Gaussian noise of std `stdev` around zero
    in the normalised input space (the data's mean image), drawn once per call from torch's
    generator; equal to Captum's `DeepLiftShap` on the same baselines. `chunk_size` image-baseline
    pairs per forward. `[B, C, H, W]`.
    """
    baselines = stdev * torch.randn(
        (n_baselines, *inputs.shape[1:]), device=inputs.device, dtype=inputs.dtype
    )
    return _with_fallback(model, inputs, target, baselines, chunk_size, implementation)
