"""Robustness of attribution maps: max-sensitivity and infidelity (Yeh, Hsieh, Suggala, Inouye, Ravikumar,
On the (In)fidelity and Sensitivity of Explanations, NeurIPS 2019, https://arxiv.org/abs/1901.09392).

Both go through Captum's own `captum.metrics.sensitivity_max` and `captum.metrics.infidelity`. Their
random perturbations are drawn here, not by Captum, so that an image's value does not depend on the
batch it came in nor on `chunk_size`: each call draws `n_samples` noise patterns `[n_samples, C, H, W]`
once from torch's global generator on the inputs' device (the job seeds it before each metric), and
sample k of every image gets pattern k. Captum is called per chunk of images, and slices the samples of
a chunk into sub-batches itself; `SharedNoise` hands each sub-batch the patterns of its sample indices.
At most about `chunk_size` (image, sample) pairs are explained or forwarded at once.

**Max-sensitivity** (definition 3.1): per image, the largest relative change of the map over
`n_samples` perturbations d_k drawn uniformly from the L-infinity ball of radius `radius` in the model's
normalised input space (Captum's default perturbation): max_k ||expl(x + d_k) - expl(x)|| / ||expl(x)||,
the norm over all the map's values (`fro`: the Euclidean norm). The paper defines it without the
division; Captum (like the paper's code) divides by ||expl(x)||, so the value does not depend on the
map's scale and methods compare. Where ||expl(x)|| is 0, Captum divides by 1, i.e. the value is the
absolute change. Captum computes expl(x) itself by calling `explain` on the unperturbed images, so both
maps come from the same call (for a random method, two draws); `attributions` is only checked for
shape. The patterns are `(torch.rand((n_samples, C, H, W), device=inputs.device) * 2 - 1) * radius`.
Defaults are Captum's: radius 0.02 (about 0.0045, or 1.2/255, in [0, 1] pixel units for ImageNet's
std: an invisible change), 10 samples, the Frobenius norm.

**Infidelity** (definition 2.1): per image, E_I[(I . phi - (f(x) - f(x - I)))^2] over `n_samples`
Gaussian perturbations I of standard deviation `std` in the model's normalised input space, where f is
the model's logit of `target` (Captum's forward with `target`; no softmax) and phi the attribution.
With `normalize` (Captum's, as in the paper's code), phi is first scaled by the per-image least-squares
factor beta = E[(I . phi)(f(x) - f(x - I))] / E[(I . phi)^2], so that the value does not depend on the
map's scale: the right choice for maps whose scale is arbitrary (saliency, CAMs, RISE), and a plain
`normalize=False` for maps in the model's units (IG, DeepLIFT). Captum's perturbed input is x - I, the
perturbation returned with it is I. The patterns are
`torch.randn((n_samples, C, H, W), device=inputs.device) * std`. The default std 0.1 (normalised units;
about 0.023, or 6/255, in [0, 1] pixel units for ImageNet's std) is a small, invisible perturbation, of
the size of common adversarial budgets, so that the first-order question "does I . phi predict the
change of the logit" is asked where it is meaningful but well above float32 noise. The paper's code
uses std 0.2 in [0, 1] pixel units on MNIST (about 0.9 normalised for ImageNet: a heavily noised
image); Captum's docstring example uses 0.003.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from captum.metrics import infidelity as captum_infidelity
from captum.metrics import sensitivity_max
from torch import nn

from metrics.complexity import check_chunk_size, check_maps
from metrics.contract import Result, metric

Explain = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NORMS = ("fro", "inf")


def _check_positive(name: str, value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
        raise ValueError(f"{name}={value!r}; expected {what}, a finite number > 0")


def _check_n_samples(n_samples: object) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r}; expected a positive number of perturbations per image")


def _norm_ord(norm: str | float) -> str | float:
    """Captum's `norm_ord` for a norm setting: `fro`, or p (`inf` read as float('inf'))."""
    return math.inf if norm == "inf" else norm


def check_max_sensitivity(
    *, radius: float = 0.02, n_samples: int = 10, norm: str | float = "fro", chunk_size: int = 16, **_: object
) -> None:
    """Raise `ValueError` naming a bad `max_sensitivity` setting and what is allowed."""
    _check_positive("radius", radius, "the L-infinity radius of the perturbations")
    _check_n_samples(n_samples)
    p = _norm_ord(norm)
    if p != "fro" and (isinstance(p, bool) or not isinstance(p, int | float) or not p >= 1):
        raise ValueError(f"norm={norm!r}; expected 'fro', 'inf' or a number p >= 1 (the vector p-norm)")
    check_chunk_size(chunk_size=chunk_size)


def check_infidelity(
    *, std: float = 0.1, n_samples: int = 10, normalize: bool = True, chunk_size: int = 16, **_: object
) -> None:
    """Raise `ValueError` naming a bad `infidelity` setting and what is allowed."""
    _check_positive("std", std, "the standard deviation of the Gaussian perturbations")
    _check_n_samples(n_samples)
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize={normalize!r}; expected true or false")
    check_chunk_size(chunk_size=chunk_size)


def split(images: int, n_samples: int, chunk_size: int) -> tuple[int, int]:
    """Images per Captum call and samples per sub-batch: at most `chunk_size` pairs, at least one of each."""
    per_call = max(1, min(images, chunk_size // n_samples))
    return per_call, max(1, min(n_samples, chunk_size // per_call))


class SharedNoise:
    """Noise pattern k for sample k of every image, over the sub-batches of one Captum call.

    Captum repeats a chunk of b images with `repeat_interleave` into b * m rows (row r is image r // m,
    its sample r % m of the sub-batch) and calls the perturbation once per sub-batch, the sub-batches in
    order; the count of samples handed out so far gives the sub-batch's first sample index.

    Attributes:
        noise: `[S, C, H, W]` one pattern per sample index.
        images: b, the images in the Captum call.
        done: samples per image handed out so far.
    """

    def __init__(self, noise: torch.Tensor, images: int) -> None:
        self.noise, self.images, self.done = noise, images, 0

    def take(self, rows: int) -> torch.Tensor:
        """The patterns of the next sub-batch, `[rows, C, H, W]` with rows = b * m."""
        m = rows // self.images
        if m * self.images != rows or self.done + m > len(self.noise):
            raise RuntimeError(
                f"Captum asked for {rows} perturbations after {self.done} of {len(self.noise)}"
            )
        patterns = self.noise[self.done : self.done + m].repeat(self.images, 1, 1, 1)
        self.done += m
        return patterns

    def add(self, inputs: torch.Tensor) -> torch.Tensor:
        """Sensitivity's `perturb_func`: the perturbed inputs x + d."""
        return inputs + self.take(inputs.shape[0])

    def subtract(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Infidelity's `perturb_func`: the perturbation I and the perturbed inputs x - I."""
        patterns = self.take(inputs.shape[0])
        return patterns, inputs - patterns

    def finish(self) -> None:
        """Raise unless every pattern was used once (a guard against a change in Captum's slicing)."""
        if self.done != len(self.noise):
            raise RuntimeError(f"Captum drew {self.done} perturbations per image; expected {len(self.noise)}")


def by_chunks(
    call: Callable[[slice, SharedNoise, int], torch.Tensor], images: int, noise: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """`call(rows, shared, per_batch)` on chunks of the images (`split`), each chunk's samples drawn
    from `noise` through its own `SharedNoise` (checked used up) and sliced by Captum into batches of
    `per_batch` (image, sample) pairs; the values `[B]` concatenated.
    """
    per_call, samples = split(images, len(noise), chunk_size)
    values = []
    for lo in range(0, images, per_call):
        rows = slice(lo, min(lo + per_call, images))
        shared = SharedNoise(noise, rows.stop - rows.start)
        values.append(call(rows, shared, (rows.stop - rows.start) * samples))
        shared.finish()
    return torch.cat(values)


@metric(better={"": "lower"}, needs=("explain",), check=check_max_sensitivity)
def max_sensitivity(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    explain: Explain,
    radius: float = 0.02,
    n_samples: int = 10,
    norm: str | float = "fro",
    chunk_size: int = 16,
) -> Result:
    """Max-sensitivity (Yeh et al. 2019, https://arxiv.org/abs/1901.09392, definition 3.1), through
    Captum's `sensitivity_max`; lower is better: the largest relative change of the map over
    perturbations d_k in an L-infinity ball, max_k ||expl(x + d_k) - expl(x)|| / ||expl(x)|| (the
    module's docstring says how, and why divided).

    Args:
        model: unused (the method inside `explain` holds it; part of the metric contract).
        inputs: `[B, C, H, W]` normalised images.
        attributions: `[B, 1 or C, H, W]` maps of the method; only their shape is read.
        target: `[B]` classes the method explains.
        explain: the method, `(x [N, C, H, W], target [N]) -> [N, 1 or C, H, W]`; it is called with
            gradients enabled (Captum runs the metric under `torch.no_grad`).
        radius: L-infinity radius of the perturbations in the normalised input space.
        n_samples: perturbations per image.
        norm: `fro`, `inf` or a number p >= 1: the vector norm of the flattened maps.
        chunk_size: (image, sample) pairs per call of `explain`, about.

    Returns:
        `Result` with `values[""]`, the max-sensitivity per image `[B]` (the row's `max_sensitivity`).
    """
    check_max_sensitivity(radius=radius, n_samples=n_samples, norm=norm, chunk_size=chunk_size)
    check_maps(inputs, attributions, target)
    b, c, h, w = inputs.shape
    noise = ((torch.rand((n_samples, c, h, w), device=inputs.device) * 2 - 1) * radius).to(inputs.dtype)

    def explanation_func(
        x: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor
    ) -> tuple[torch.Tensor]:
        # Captum passes the unperturbed inputs as a 1-tuple and the perturbed ones as a tensor, and
        # iterates over what comes back: a tensor would be read image by image, so return a 1-tuple.
        # It repeats a target of one element not at all (a scalar to its own methods): `explain` wants [N].
        x = x[0] if isinstance(x, tuple) else x
        with torch.enable_grad():
            # Contiguous: Captum views the maps flat, and channels-last maps cannot be.
            return (explain(x, target.reshape(-1).expand(len(x))).detach().contiguous(),)

    def sensitivity(rows: slice, shared: SharedNoise, per_batch: int) -> torch.Tensor:
        return sensitivity_max(
            explanation_func,
            inputs[rows],
            perturb_func=shared.add,
            n_perturb_samples=n_samples,
            norm_ord=_norm_ord(norm),
            max_examples_per_batch=per_batch,
            target=target[rows],
        )

    return Result({"": by_chunks(sensitivity, b, noise, chunk_size)})


@metric(better={"": "lower"}, check=check_infidelity)
def infidelity(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: torch.Tensor,
    *,
    std: float = 0.1,
    n_samples: int = 10,
    normalize: bool = True,
    chunk_size: int = 16,
) -> Result:
    """Infidelity (Yeh et al. 2019, https://arxiv.org/abs/1901.09392, definition 2.1), through Captum's
    `infidelity`; lower is better: E_I[(I . phi - (f(x) - f(x - I)))^2] over Gaussian perturbations I,
    f the target's logit, phi the map (scaled by its least-squares factor with `normalize`; the
    module's docstring says how, and why the default std).

    Args:
        model: classifier returning logits `[N, K]`.
        inputs: `[B, C, H, W]` normalised images.
        attributions: `[B, 1 or C, H, W]` maps; a one-channel map is expanded (not divided) to C channels.
        target: `[B]` classes whose logit is explained.
        std: standard deviation of the Gaussian perturbations in the normalised input space.
        n_samples: perturbations per image.
        normalize: scale phi by the optimal beta per image first (Captum's `normalize`).
        chunk_size: (image, sample) pairs per forward pass, about (plus the unperturbed images).

    Returns:
        `Result` with `values[""]`, the infidelity per image `[B]` (the row's `infidelity`).
    """
    check_infidelity(std=std, n_samples=n_samples, normalize=normalize, chunk_size=chunk_size)
    check_maps(inputs, attributions, target)
    b, c, h, w = inputs.shape
    noise = (torch.randn((n_samples, c, h, w), device=inputs.device) * std).to(inputs.dtype)
    # Captum wants a map of the inputs' shape. A one-channel map gives each pixel one value phi_p for
    # all its channels, so I . phi = sum_p (sum_c I_cp) phi_p: the same phi_p on every channel, i.e.
    # expanded; dividing by C would score the map against a C times smaller change of the logit.
    phi = attributions.to(inputs.dtype).expand(b, c, h, w).contiguous()  # Captum views it flat

    def fidelity(rows: slice, shared: SharedNoise, per_batch: int) -> torch.Tensor:
        return captum_infidelity(
            model,
            shared.subtract,
            inputs[rows],
            phi[rows],
            target=target[rows],
            n_perturb_samples=n_samples,
            max_examples_per_batch=per_batch,
            normalize=normalize,
        )

    return Result({"": by_chunks(fidelity, b, noise, chunk_size)})
