"""The arrays behind the model pictures, batched over images and on the model's device. Every function
leaves the model as it found it: hooks it adds are removed before it returns, even on an error.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from harness.inspect.layers import conv_layer, layer
from methods import guided_backprop, occlusion, saliency


def saliency_panels(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, chunk_size: int = 16
) -> dict[str, torch.Tensor]:
    """FlashTorch's saliency figure's arrays, from the harness's own methods: per image the plain
    gradient's magnitude (`saliency`) and the guided one (`guided_backprop`) across the RGB channels
    `[B, 3, H, W]`, and the maximum of each's magnitude over the channels `[B, H, W]`.
    """
    plain = saliency(model, images, target, chunk_size=chunk_size).detach()
    guided = guided_backprop(model, images, target, chunk_size=chunk_size).detach()
    return {
        "plain": plain,
        "plain_max": plain.abs().amax(dim=1),
        "guided": guided,
        "guided_max": guided.abs().amax(dim=1),
    }


def filter_tiles(
    model: nn.Module, name: str, max_filters: int, max_channels: int, normalise: str
) -> np.ndarray:
    """The weights of convolution `name` as tiles in [0, 1].

    A layer with 3 input channels (and no groups) gives RGB tiles `[F, kh, kw, 3]`; any other gives
    one grey tile per (filter, input channel) `[F, C, kh, kw]`, at most `max_channels` channels.
    `normalise`: `tile` scales each tile from its own minimum to its maximum, `layer` all the tiles
    shown by their common minimum and maximum. At most `max_filters` filters, the first ones.
    """
    if normalise not in ("tile", "layer"):
        raise ValueError(f"filters.normalise={normalise!r}; expected 'tile' or 'layer'")
    conv = conv_layer(model, name)
    w = conv.weight.detach().float().cpu()[:max_filters]  # [F, C/groups, kh, kw]
    rgb = w.shape[1] == 3 and conv.groups == 1
    w = w.permute(0, 2, 3, 1) if rgb else w[:, :max_channels]  # tiles: [F, kh, kw, 3] or [F, C, kh, kw]
    axes = tuple(range(1, w.dim())) if rgb else (2, 3)  # what one tile spans
    lo = w.amin(dim=axes, keepdim=True) if normalise == "tile" else w.min()
    hi = w.amax(dim=axes, keepdim=True) if normalise == "tile" else w.max()
    return ((w - lo) / (hi - lo).clamp_min(1e-12)).numpy()


@contextmanager
def outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that keep the outputs of layers `names`, removed on leaving."""
    kept: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            module = layer(model, name)
            handles.append(module.register_forward_hook(lambda _m, _i, out, n=name: kept.__setitem__(n, out)))
        yield kept
    finally:
        for h in handles:
            h.remove()


def feature_maps(
    model: nn.Module, images: torch.Tensor, names: Sequence[str], max_channels: int
) -> dict[str, np.ndarray]:
    """Each layer's output for the images, its first `max_channels` channels: `[B, C, h, w]`."""
    with outputs(model, names) as kept, torch.no_grad():
        model(images)
    return {n: kept[n][:, :max_channels].float().cpu().numpy() for n in names}


def weight_histograms(model: nn.Module, bins: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per convolution and linear layer, the histogram of its weights: (counts, bin edges)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            out[name] = np.histogram(m.weight.detach().float().cpu().numpy().ravel(), bins=bins)
    return out


def top_k(model: nn.Module, images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image the `k` most probable classes and their softmax probabilities, `[B, k]` each."""
    with torch.no_grad():
        probs = model(images).float().softmax(dim=1)
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return indices.cpu().numpy(), values.cpu().numpy()


def occlusion_map(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, window: int, stride: int, baseline: float
) -> np.ndarray:
    """The harness's occlusion (`methods.occlusion`: the drop of the target's probability, averaged
    over the windows covering each pixel) `[B, H, W]`, rows from the top as the image's.
    """
    return (
        occlusion(model, images, target, window=window, stride=stride, baseline=baseline)[:, 0].cpu().numpy()
    )
