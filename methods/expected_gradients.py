"""Expected Gradients (Erion et al. 2021): integrated gradients averaged over baselines drawn from the data.

phi(x) = E_{x' ~ D, alpha ~ U(0, 1)} [(x - x') * grad f(x' + alpha (x - x'))], estimated with
`n_samples` (reference, alpha) draws per image; the references are images held out of the job's own
(`harness.data.references`), bound by the job. Each image's draws come from torch's generator
(seeded by the job) in image order, all its samples at once, so the map does not depend on
`chunk_size`; image-sample pairs are forwarded `chunk_size` at a time across images. Captum's
`GradientShap` with `stdevs=0` computes the same estimate from the same draws.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.common import Count, input_gradients, like_inputs, method


def draw(samples: int, references: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's draws: `samples` reference indices and points on the path in [0, 1)."""
    index = torch.randint(references, (samples,))
    alpha = torch.rand(samples)
    return index.to(device), alpha.to(device)


@method(stochastic=True, references=True)
def expected_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    references: torch.Tensor,
    n_samples: Count = 32,
    n_references: Count = 12,
    chunk_size: Count = 16,
) -> torch.Tensor:
    """Expected Gradients (Erion et al. 2021, arXiv:1906.10670, eq. 5): the mean over `n_samples`
    draws of (x - x') times the gradient of the target logit at x' + alpha (x - x'), x' one of the
    first `n_references` of `references` `[R, C, H, W]` (images held out of the data), alpha uniform.
    `[B, C, H, W]`.
    """
    refs = references[:n_references].to(device=inputs.device, dtype=inputs.dtype)
    out = torch.empty_like(inputs)
    per_group = max(1, chunk_size // n_samples)  # images whose samples go forward together
    for start in range(0, inputs.shape[0], per_group):
        x, t = inputs[start : start + per_group], target[start : start + per_group]
        baselines, alphas = [], []
        for _ in range(len(x)):
            index, alpha = draw(n_samples, len(refs), inputs.device)
            baselines.append(refs[index])
            alphas.append(alpha)
        base, alpha = torch.cat(baselines), torch.cat(alphas)[:, None, None, None].to(inputs.dtype)
        delta = x.repeat_interleave(n_samples, dim=0) - base
        points = like_inputs(base + alpha * delta, x)
        targets = t.repeat_interleave(n_samples)
        grads = input_gradients(model, points, targets, chunk_size)
        out[start : start + len(x)] = (delta * grads).view(len(x), n_samples, *x.shape[1:]).mean(dim=1)
    return out
