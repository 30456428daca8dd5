"""SmoothGrad, SmoothGrad-squared and VarGrad against Captum's `NoiseTunnel` of `Saliency` given the same
noise, and their moments against a naive loop over the samples. The contract, determinism and chunk
tests of every method (tests/test_methods.py) pick them up from conf/method.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import NoiseTunnel, Saliency

import methods
from methods import noise_tunnel


def recording(monkeypatch) -> list[torch.Tensor]:
    """Every noise draw the methods make, in order (each `[samples, C, H, W]`, standard normal)."""
    draws: list[torch.Tensor] = []
    draw = noise_tunnel.draw_noise

    def record(samples, image):
        draws.append(draw(samples, image))
        return draws[-1]

    monkeypatch.setattr(noise_tunnel, "draw_noise", record)
    return draws


def captum_given(monkeypatch, noise: torch.Tensor):
    """Captum's NoiseTunnel with its draws replaced by `noise` `[B * samples, C, H, W]` (already scaled):
    one partition of all samples, image-major as Captum repeats the inputs.
    """

    def add(input, stdev, samples):
        return input.repeat_interleave(samples, dim=0) + noise

    monkeypatch.setattr(NoiseTunnel, "_add_noise_to_input", staticmethod(add))


@pytest.mark.parametrize(
    ("name", "nt_type", "absolute"),
    [
        ("smoothgrad", "smoothgrad", True),
        ("smoothgrad", "smoothgrad", False),
        ("smoothgrad_sq", "smoothgrad_sq", False),
        ("vargrad", "vargrad", False),
        ("vargrad", "vargrad", True),
    ],
)
def test_each_type_equals_captums_noise_tunnel_given_the_same_noise(
    name, nt_type, absolute, small_cnn, images, monkeypatch
):
    model, t, samples = small_cnn.module, torch.tensor([0, 1, 2, 3, 4]), 6
    draws = recording(monkeypatch)
    kw = {} if name == "smoothgrad_sq" else {"absolute": absolute}
    torch.manual_seed(0)
    ours = getattr(methods, name)(model, images, t, nt_samples=samples, noise_level=0.2, chunk_size=4, **kw)
    assert len(draws) == len(images) and draws[0].shape == (samples, *images.shape[1:])
    sigma = 0.2 * (images.flatten(1).amax(1) - images.flatten(1).amin(1))
    noise = torch.cat([s * d for s, d in zip(sigma, draws, strict=True)])
    captum_given(monkeypatch, noise)
    ref = NoiseTunnel(Saliency(model)).attribute(
        images, target=t, nt_type=nt_type, nt_samples=samples, nt_samples_batch_size=samples, abs=absolute
    )
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_the_three_maps_share_their_samples_and_are_the_naive_moments(small_cnn, images):
    """For one seed the three methods see the same noisy copies: the moments of the gradients at
    copies drawn by hand, one sample at a time.
    """
    model, t, samples, level = small_cnn.module, torch.tensor([3, 1, 4, 1, 0]), 5, 0.1
    maps = {}
    for name in ("smoothgrad", "smoothgrad_sq", "vargrad"):
        torch.manual_seed(7)
        kw = {"absolute": False} if name != "smoothgrad_sq" else {}
        maps[name] = getattr(methods, name)(
            model, images, t, nt_samples=samples, noise_level=level, chunk_size=3, **kw
        )
    torch.manual_seed(7)
    grads = []
    for x, c in zip(images, t, strict=True):
        noise = torch.randn(samples, *x.shape) * level * (x.max() - x.min())
        per_image = []
        for k in range(samples):
            copy = (x + noise[k])[None].requires_grad_(True)
            (g,) = torch.autograd.grad(model(copy)[0, c], copy)
            per_image.append(g[0])
        grads.append(torch.stack(per_image))
    g = torch.stack(grads)  # [B, samples, C, H, W]
    scale = float(g.abs().max())
    torch.testing.assert_close(maps["smoothgrad"], g.mean(1), rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(maps["smoothgrad_sq"], (g * g).mean(1), rtol=0, atol=1e-6 * scale**2)
    torch.testing.assert_close(maps["vargrad"], g.var(1, unbiased=False), rtol=0, atol=1e-6 * scale**2)


def test_no_noise_gives_the_gradient_and_zero_variance(small_cnn, images):
    model, t = small_cnn.module, torch.tensor([0, 1, 2, 3, 4])
    plain = methods.saliency(model, images, t)
    torch.testing.assert_close(methods.smoothgrad(model, images, t, nt_samples=3, noise_level=0.0), plain)
    variance = methods.vargrad(model, images, t, nt_samples=3, noise_level=0.0)
    assert float(variance.abs().max()) <= 1e-6 * float(plain.max()) ** 2
