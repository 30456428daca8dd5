"""Class activation maps: Grad-CAM and guided Grad-CAM through Captum for convolutional layers, and
Grad-CAM of layers whose output is laid out otherwise (a Swin stage's `[B, H, W, C]`, a ViT
block's tokens `[B, 1 + h*w, C]`), taken to `[B, C, h, w]` first; the gradient CAM family
(Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM) as rules on one capture of a layer; Score-CAM and
Ablation-CAM from masked or ablated forwards; EigenCAM from the layer's principal component; FullGrad
from the biases of every layer. Every map is upsampled to the input bilinearly, as Grad-CAM's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from captum.attr import GuidedGradCam, LayerAttribution, LayerGradCam
from torch import nn
from torch.nn import functional as F

from methods.common import Count, chunked, method


def _layer(model: nn.Module, layer: str) -> nn.Module:
    try:
        return model.get_submodule(layer)
    except AttributeError as e:
        children = [name for name, _ in model.named_children()]
        raise ValueError(
            f"layer={layer!r} is not a submodule of {type(model).__name__}; "
            f"give a qualified name such as one of {children} (see model.cam_layer)"
        ) from e


LAYOUTS = ("nchw", "nhwc", "tokens")
Layout = Literal["nchw", "nhwc", "tokens"]


def to_nchw(a: torch.Tensor, layout: str) -> torch.Tensor:
    """A layer's output as `[B, C, h, w]`: `nhwc` permuted; `tokens` `[B, N, C]` without the class
    token when `N - 1` is a square (else all `N` tokens, which must be a square), as a `h x h` grid.
    """
    if layout == "nchw":
        return a
    if layout == "nhwc":
        return a.permute(0, 3, 1, 2)
    n = a.shape[1]
    for skip in (1, 0):
        side = math.isqrt(n - skip)
        if side * side == n - skip and side > 0:
            grid = a[:, skip:]
            return grid.transpose(1, 2).reshape(a.shape[0], a.shape[2], side, side)
    raise ValueError(f"a tokens layer's output has {n} tokens, neither a square nor 1 + a square")


@method(eager_only=True)
def grad_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    layer: str,
    layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391, eq. 1-2): ReLU of the layer's activations
    weighted by their spatially averaged gradients, upsampled bilinearly to the input size.

    `layer` is a qualified submodule name (the model config's `cam_layer`), `layout` how its output
    is laid out (`nchw`, `nhwc`, `tokens`: the model config's `cam_layout`). `[B, 1, H, W]`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {', '.join(LAYOUTS)}")
    size = tuple(inputs.shape[2:])
    if layout != "nchw":  # Captum's LayerGradCam takes [B, C, h, w] only: the same sums on to_nchw
        return _cam_family(grad_cam_rule, model, inputs, target, layer, layout, chunk_size)
    explainer = LayerGradCam(model, _layer(model, layer))

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cam = explainer.attribute(x, target=t, relu_attributions=True)
        return LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")

    return chunked(attribute, inputs, target, chunk_size)


@method(eager_only=True)
def guided_grad_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    layer: str,
    layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017, section 3.1): guided backprop times the upsampled
    Grad-CAM map. `[B, C, H, W]`; layers with `nchw` output only.
    """
    if layout != "nchw":
        raise ValueError(
            f"guided_grad_cam needs a layer with [B, C, H, W] output; the model's cam_layout is {layout}"
        )
    explainer = GuidedGradCam(model, _layer(model, layer))

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return explainer.attribute(x, target=t, interpolate_mode="bilinear")

    return chunked(attribute, inputs, target, chunk_size)


# The gradient CAM family: one capture of a layer's activations A and of the gradient g of each image's
# target logit with respect to them, then a rule that weighs them into a map at the layer's resolution.
# The ReLU and Grad-CAM's bilinear upsampling follow, as in `grad_cam`; each map equals
# pytorch-grad-cam's before its upsampling and min-max scaling (tests/test_cams.py).


def layer_capture(
    model: nn.Module, module: nn.Module, layout: str, x: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output A and d(logit of each image's target)/dA, both `[B, C, h, w]` (`to_nchw`).

    The target logits are summed before one backward pass: in eval mode an image's logit depends on
    its own activations only, so each image's gradient is its own.
    """
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            grad = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), seen[0])[0]
    finally:
        handle.remove()
    return to_nchw(seen[0].detach(), layout), to_nchw(grad, layout)


def _spatial_sum(a: torch.Tensor) -> torch.Tensor:
    return a.sum(dim=(2, 3), keepdim=True)


def grad_cam_rule(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM's (eq. 1-2): channel weights the spatial mean of g, as Captum's `LayerGradCam`."""
    return (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True)


def grad_cam_plus_plus_rule(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018, arXiv:1710.11063, eq. 19 with the ReLU of eq. 7): channel
    weights sum_ij relu(g) alpha_ij with alpha = g^2 / (2 g^2 + sum_ab A_ab g^3), 0 where g is 0;
    1e-6 in the denominator where it vanishes (as pytorch-grad-cam).
    """
    g2 = g * g
    alpha = g2 / (2 * g2 + _spatial_sum(a) * g2 * g + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return (_spatial_sum(torch.relu(g) * alpha) * a).sum(dim=1, keepdim=True)


def xgrad_cam_rule(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020, arXiv:2008.02312, eq. 9): channel weights sum_ij g A / sum_ij A
    (1e-7 added to the sum where it vanishes, as pytorch-grad-cam).
    """
    return (_spatial_sum(g * a / (_spatial_sum(a) + 1e-7)) * a).sum(dim=1, keepdim=True)


def layer_cam_rule(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021, IEEE TIP 30, eq. 5): each position weighted by its own positive
    gradient, sum_c relu(g) A.
    """
    return (torch.relu(g) * a).sum(dim=1, keepdim=True)


def hires_cam_rule(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos and Carin 2020, arXiv:2011.08891, eq. 5): sum_c g A, the element-wise
    product that Grad-CAM averages away.
    """
    return (g * a).sum(dim=1, keepdim=True)


Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RULES: dict[str, Rule] = {
    "grad_cam_plus_plus": grad_cam_plus_plus_rule,
    "xgrad_cam": xgrad_cam_rule,
    "layer_cam": layer_cam_rule,
    "hires_cam": hires_cam_rule,
}


def layer_map(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, layer: str, layout: str, rule: str
) -> torch.Tensor:
    """A CAM of the family at the layer's resolution, `[B, 1, h, w]`, after its ReLU."""
    a, g = layer_capture(model, _layer(model, layer), layout, inputs, target)
    return torch.relu(RULES[rule](a, g))


def _cam_family(
    rule: Rule,
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    layer: str,
    layout: str,
    chunk: int,
) -> torch.Tensor:
    size, module = tuple(inputs.shape[2:]), _layer(model, layer)  # a missing layer named before any pass

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cam = torch.relu(rule(*layer_capture(model, module, layout, x, t)))
        return LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")

    return chunked(attribute, inputs, target, chunk)


@method(eager_only=True)
def grad_cam_plus_plus(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, layer: str, layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """Grad-CAM++ (`grad_cam_plus_plus_rule`) of `layer`, upsampled bilinearly as Grad-CAM. `[B, 1, H, W]`."""
    return _cam_family(grad_cam_plus_plus_rule, model, inputs, target, layer, layout, chunk_size)


@method(eager_only=True)
def xgrad_cam(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, layer: str, layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """XGrad-CAM (`xgrad_cam_rule`) of `layer`, upsampled bilinearly as Grad-CAM. `[B, 1, H, W]`."""
    return _cam_family(xgrad_cam_rule, model, inputs, target, layer, layout, chunk_size)


@method(eager_only=True)
def layer_cam(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, layer: str, layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """LayerCAM (`layer_cam_rule`) of `layer`, upsampled bilinearly as Grad-CAM. `[B, 1, H, W]`."""
    return _cam_family(layer_cam_rule, model, inputs, target, layer, layout, chunk_size)


@method(eager_only=True)
def hires_cam(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, layer: str, layout: Layout = "nchw",
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """HiResCAM (`hires_cam_rule`) of `layer`, upsampled bilinearly as Grad-CAM. `[B, 1, H, W]`."""
    return _cam_family(hires_cam_rule, model, inputs, target, layer, layout, chunk_size)


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
    module, size = _layer(model, layer), tuple(inputs.shape[2:])
    maps = []
    for lo in range(0, len(inputs), chunk):
        acts = to_nchw(_output_of(model, module, inputs[lo : lo + chunk]), layout)
        for x, t, a in zip(inputs[lo : lo + chunk], target[lo : lo + chunk], acts, strict=True):
            weights = torch.softmax(_masked_scores(model, x, int(t), a, size, chunk), dim=0)
            maps.append(torch.relu((weights[:, None, None] * a.float()).sum(dim=0))[None, None])
    return torch.cat(maps)


def _logits_and_output(
    model: nn.Module, module: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and the module's output in one forward of the model on `x`."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen[0]


def _output_of(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's output in a forward of the model on `x`."""
    return _logits_and_output(model, module, x)[1]


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
    module = _layer(model, layer)
    channel_dim = {"nchw": 1, "nhwc": 3, "tokens": 2}[layout]
    maps = []
    for lo in range(0, len(inputs), chunk):
        x, t = inputs[lo : lo + chunk], target[lo : lo + chunk]
        logits, acts = _logits_and_output(model, module, x)
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
    module, size = _layer(model, layer), tuple(inputs.shape[2:])

    def attribute(x: torch.Tensor, _t: torch.Tensor) -> torch.Tensor:
        cam = torch.relu(eigen_projection(to_nchw(_output_of(model, module, x), layout)))
        return LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")

    return chunked(attribute, inputs, target, chunk_size)


def _bias(module: nn.Module) -> torch.Tensor | None:
    """What a layer adds to each channel: a convolution's bias; BatchNorm's (in eval mode)
    beta - mean * gamma / std.
    """
    if isinstance(module, nn.Conv2d):
        return None if module.bias is None else module.bias.detach()
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if isinstance(module, nn.BatchNorm2d) and mean is not None and var is not None:
        gamma = module.weight.detach() if module.weight is not None else torch.ones_like(mean)
        beta = module.bias.detach() if module.bias is not None else torch.zeros_like(mean)
        return beta - mean * gamma / torch.sqrt(var + module.eps)
    return None


def _unit_sum(a: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The sum over channels of the maps |w_c| a_c of `a` `[B, C, h, w]` (`a` >= 0; w = 1 without
    `weight` `[C]`), each shifted to 0 and scaled by its range (+1e-7) first, as pytorch-grad-cam's
    FullGrad normalises every term: `[B, 1, h, w]`. |w_c| a_c's range is |w_c| times a_c's.
    """
    low, high = a.amin(dim=(2, 3)), a.amax(dim=(2, 3))  # [B, C]; no copy in either memory format
    k = torch.ones_like(low[0]) if weight is None else weight.abs().to(low.dtype)
    scale = k / (k * (high - low) + 1e-7)  # [B, C]
    b, c, h, w = a.shape
    if a.is_contiguous():  # the weighted sum over channels as a product, on a view of `a`
        summed = scale[:, None, :] @ a.flatten(2)
    else:  # channels-last (or any other layout: copied); one matrix-vector product per image
        rows = a.permute(0, 2, 3, 1).reshape(b, h * w, c)
        summed = torch.stack([torch.mv(rows[i], scale[i]) for i in range(b)])[:, None]
    return summed.view(b, 1, h, w) - (low * scale).sum(dim=1)[:, None, None, None]


class _Scratch:
    """One buffer for the largest output, allocated once the forward has run, that holds |g| of each
    term in turn: on the CPU a fresh tensor of an activation's size costs more in page faults than
    the arithmetic on it.
    """

    def __init__(self) -> None:
        self.numel = 0
        self.buffer: torch.Tensor | None = None

    def abs(self, g: torch.Tensor) -> torch.Tensor:
        dense = g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last)
        if (
            not dense
            or self.buffer is None
            or self.buffer.numel() < g.numel()
            or self.buffer.dtype != g.dtype
        ):
            return g.abs()
        return torch.abs(g, out=self.buffer[: g.numel()].as_strided(g.shape, g.stride()))


@method(eager_only=True)
def full_grad(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, chunk_size: Count = 16
) -> torch.Tensor:
    """FullGrad (Srinivas and Fleuret 2019, arXiv:1905.00780, eq. 5-6), as pytorch-grad-cam computes
    it: |x * dy/dx| for each input channel plus, for every Conv2d with a bias and every BatchNorm2d,
    |b_c * dy/dz_c| for each of its channels c (z its output, b what it adds to the channel), each
    map normalised to [0, 1] on its own (`_unit_sum`) and upsampled bilinearly to the input, all summed.
    Reads every such layer, not one; one forward and one backward. `[B, 1, H, W]`.
    """
    size = tuple(inputs.shape[2:])
    biases = {m: b for m in model.modules() if (b := _bias(m)) is not None}

    def attribute(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Upsampling is linear: the normalised maps of one resolution are summed, then upsampled once.
        by_size: dict[tuple[int, ...], torch.Tensor] = {}
        scratch = _Scratch()

        def add(bias: torch.Tensor, g: torch.Tensor) -> None:
            # Each term made while the backward runs (the gradient itself flows on, unchanged).
            term = _unit_sum(scratch.abs(g.detach()), bias).float()
            key = tuple(term.shape[2:])
            by_size[key] = term if key not in by_size else by_size[key] + term

        def keep(module: nn.Module, _i: Any, out: torch.Tensor) -> None:
            # A tensor hook: the gradient of this output even if a ReLU later overwrites it in place;
            # a layer that the target logit does not depend on gets none and adds nothing.
            out.register_hook(partial(add, biases[module]))
            scratch.numel = max(scratch.numel, out.numel())

        hooks = [m.register_forward_hook(keep) for m in biases]
        try:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                score = model(x).gather(1, t[:, None]).sum()
                scratch.buffer = x.new_empty(scratch.numel)
                (gx,) = torch.autograd.grad(score, x)
        finally:
            for h in hooks:
                h.remove()
        total = _unit_sum((x.detach() * gx).abs_()).float()
        for term in by_size.values():
            total = total + F.interpolate(term, size, mode="bilinear", align_corners=False)
        return total

    return chunked(attribute, inputs, target, chunk_size)
