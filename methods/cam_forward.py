"""The CAMs of forwards alone: Score-CAM (each channel of the layer masks the image), Ablation-CAM (each
channel zeroed in turn) and EigenCAM (the layer's first principal component). Score-CAM and
Ablation-CAM skip the channels that are zero everywhere, which changes neither map. Every map is
upsampled to the input bilinearly, as Grad-CAM's.
"""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import LayerAttribution
from torch import nn
from torch.nn import functional as F

from methods.cam import Layout, logits_and_output, output_of, submodule, to_nchw
from methods.common import Count, chunked, method


@method(forward_only=True, eager_only=True)
@torch.no_grad()
def score_cam(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, layer: str, layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """Score-CAM (Wang et al. 2020, arXiv:1910.01279, section 3), as pytorch-grad-cam computes it
    (`score_cam_at_layer`), upsampled as Grad-CAM. Costs one forward per image and one per channel
    and image (a channel that is zero everywhere: none), `chunk_size` masked images per forward, no
    backward. `[B, 1, H, W]`.
    """
    cam = score_cam_at_layer(model, inputs, target, layer, layout, chunk_size)
    return LayerAttribution.interpolate(cam, tuple(inputs.shape[2:]), interpolate_mode="bilinear")


@torch.no_grad()
def score_cam_at_layer(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, layer: str, layout: str, chunk: int
) -> torch.Tensor:
    """Score-CAM at the layer's resolution, `[B, 1, h, w]`: each channel of the layer's output,
    upsampled bilinearly (corners aligned) to the input and scaled to [0, 1], masks the image; the
    channels' weights are the softmax, over the channels, of the target logit of each masked image;
    the map is relu(sum_c w_c A_c).
    """
    module, size = submodule(model, layer), tuple(inputs.shape[2:])
    maps = []
    for lo in range(0, len(inputs), chunk):
        acts = to_nchw(output_of(model, module, inputs[lo : lo + chunk]), layout)
        for x, t, a in zip(inputs[lo : lo + chunk], target[lo : lo + chunk], acts, strict=True):
            weights = torch.softmax(_masked_scores(model, x, int(t), a, size, chunk), dim=0)
            maps.append(torch.relu((weights[:, None, None] * a.float()).sum(dim=0))[None, None])
    return torch.cat(maps)


def _masked_scores(
    model: nn.Module, x: torch.Tensor, t: int, acts: torch.Tensor, size: tuple[int, ...], chunk: int
) -> torch.Tensor:
    """The target logit of image `x` masked by each channel of `acts` `[C, h, w]` (upsampled with
    corners aligned, scaled to [0, 1]), `chunk` masked images per forward: `[C]`. A channel that is
    zero everywhere masks the whole image to zero: those share one forward of the zeroed image.
    """
    live = acts.flatten(1).abs().amax(dim=1) > 0
    scores = torch.empty(len(acts), device=acts.device)
    if not bool(live.all()):
        scores[~live] = model(x[None] * 0)[0, t].float()
    channels = live.nonzero()[:, 0]
    for lo in range(0, len(channels), chunk):
        some = channels[lo : lo + chunk]
        masks = F.interpolate(acts[some, None].float(), size, mode="bilinear", align_corners=True)
        flat = masks.flatten(1)
        low, high = flat.min(dim=1).values, flat.max(dim=1).values
        masks = (masks - low[:, None, None, None]) / (high - low + 1e-8)[:, None, None, None]
        scores[some] = model(x[None] * masks)[:, t].float()
    return scores


@method(forward_only=True, eager_only=True)
@torch.no_grad()
def ablation_cam(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, layer: str, layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """Ablation-CAM (Desai and Ramaswamy 2020, WACV, eq. 2-3), as pytorch-grad-cam computes it
    (`ablation_cam_at_layer`), upsampled as Grad-CAM. Costs one forward per image and one per channel
    and image (a channel that is zero everywhere: none), `chunk_size` ablated copies per forward, no
    backward. `[B, 1, H, W]`.
    """
    cam = ablation_cam_at_layer(model, inputs, target, layer, layout, chunk_size)
    return LayerAttribution.interpolate(cam, tuple(inputs.shape[2:]), interpolate_mode="bilinear")


@torch.no_grad()
def ablation_cam_at_layer(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, layer: str, layout: str, chunk: int
) -> torch.Tensor:
    """Ablation-CAM at the layer's resolution, `[B, 1, h, w]`: channel c's weight is the relative drop
    of the target logit y when the layer's channel c is set to zero everywhere (every token, for a
    tokens layer), `(y - y_c) / y`; the map is relu(sum_c w_c A_c). pytorch-grad-cam writes 0 too
    where the layer's smallest value is 0 (after a ReLU); elsewhere it writes a large negative value.
    """
    module = submodule(model, layer)
    channel_dim = {"nchw": 1, "nhwc": 3, "tokens": 2}[layout]
    maps = []
    for lo in range(0, len(inputs), chunk):
        x, t = inputs[lo : lo + chunk], target[lo : lo + chunk]
        logits, acts = logits_and_output(model, module, x)
        scores = logits.gather(1, t[:, None])[:, 0].float()
        for i in range(len(x)):
            # Zeroing a channel that is zero everywhere changes nothing: its weight is 0, no forward.
            live = acts[i : i + 1].abs().amax(dim=[d for d in range(acts.dim()) if d != channel_dim]) > 0
            dropped = scores[i].repeat(len(live))
            channels = live.nonzero()[:, 0].tolist()
            for c in range(0, len(channels), chunk):
                some = channels[c : c + chunk]
                dropped[some] = _ablated_scores(model, module, x[i], int(t[i]), channel_dim, some)
            weights = (scores[i] - dropped) / scores[i]
            a = to_nchw(acts[i : i + 1], layout)[0].float()
            maps.append(torch.relu((weights[:, None, None] * a).sum(dim=0))[None, None])
    return torch.cat(maps)


def _ablated_scores(
    model: nn.Module, module: nn.Module, x: torch.Tensor, t: int, channel_dim: int, channels: list[int]
) -> torch.Tensor:
    """The target logit of image `x` with the layer's channel `c` zeroed, for each `c` in `channels`:
    one forward of `len(channels)` copies of the image.
    """

    def ablate(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        rows = torch.arange(len(channels), device=out.device)
        zeroed = torch.tensor(channels, device=out.device)
        out.movedim(channel_dim, 1)[rows, zeroed] = 0  # copy `row` has channel `channels[row]` zeroed
        return out

    handle = module.register_forward_hook(ablate)
    try:
        return model(x[None].expand(len(channels), *x.shape))[:, t].float()
    finally:
        handle.remove()


def eigen_projection(a: torch.Tensor) -> torch.Tensor:
    """EigenCAM's map before its ReLU, `[B, 1, h, w]` from `[B, C, h, w]`: the activations as
    positions x channels M, each channel centred over the positions, projected on their first right
    singular vector v: M v = s u, with u and s^2 the top eigenvector and eigenvalue of M M^T (or
    M v, v that of M^T M, whichever of the two is smaller), in float64. The vector's sign is
    arbitrary in any SVD; it is chosen here so that the map agrees (a positive inner product) with
    the mean of the channels, where the layer is active.
    """
    b, c, h, w = a.shape
    m = a.double().flatten(2).transpose(1, 2)  # [B, hw, C]
    m = m - m.mean(dim=1, keepdim=True)
    if h * w <= c:
        values, vectors = torch.linalg.eigh(m @ m.transpose(1, 2))  # ascending: the last is the top
        p = vectors[:, :, -1] * values[:, -1:].clamp(min=0).sqrt()
    else:
        p = (m @ torch.linalg.eigh(m.transpose(1, 2) @ m).eigenvectors[:, :, -1:])[..., 0]
    agree = (p * a.double().flatten(2).mean(dim=1)).sum(dim=1, keepdim=True)
    p = torch.where(agree < 0, -p, p)
    return p.reshape(b, 1, h, w).to(a.dtype if a.is_floating_point() else torch.float32)


@method(forward_only=True, eager_only=True)
@torch.no_grad()
def eigen_cam(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, layer: str, layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """EigenCAM (Muhammad and Yeasin 2020, arXiv:2008.00299): the ReLU of the layer's activations
    projected on their first principal component (`eigen_projection`), upsampled as Grad-CAM. One
    forward, no backward; the same map for every class (`target` is not read). `[B, 1, H, W]`.
    """
    module, size = submodule(model, layer), tuple(inputs.shape[2:])

    def attribute(x: torch.Tensor, _t: torch.Tensor) -> torch.Tensor:
        cam = torch.relu(eigen_projection(to_nchw(output_of(model, module, x), layout)))
        return LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")

    return chunked(attribute, inputs, target, chunk_size)
