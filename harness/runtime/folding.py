"""Folding that computes the same function faster: BatchNorm into the convolution before it, and a
convolution's "same" padding module into its own padding; each checked on the logits and undone
when they move.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import torch
from torch import nn

log = logging.getLogger("harness")


def fold_batchnorm(
    model: nn.Module, sample: torch.Tensor, rtol: float = 1e-4, keep: Collection[str] = ()
) -> int:
    """Fold every eval-mode `BatchNorm2d` into the `Conv2d` registered just before it in the same
    parent (conv, then BN: the order of torchvision's and EfficientNet's blocks), in place; the BN
    becomes an identity. Module names, and so CAM layers and hooks, stay as they were, but a folded
    convolution outputs what its BatchNorm did: the convolutions named in `keep` (qualified names),
    whose own outputs are read, are not folded.

    Registration order is not execution order in every model, so the result is checked: when the
    logits on `sample` move by more than `rtol` of their scale the model is restored and nothing is
    folded. Returns the number of BatchNorms folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = []
    for prefix, parent in model.named_modules():
        names = list(parent._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[a], parent._modules[b]
            if (
                isinstance(conv, nn.Conv2d)
                and type(bn) is nn.BatchNorm2d
                and not bn.training
                and bn.track_running_stats
                and conv.out_channels == bn.num_features
                and (f"{prefix}.{a}" if prefix else a) not in keep
            ):
                pairs.append((parent, a, b, conv, bn))
    if not pairs:
        return 0
    with torch.no_grad():
        before = model(sample)
    for parent, a, b, conv, bn in pairs:
        parent._modules[a] = fuse_conv_bn_eval(conv, bn)
        parent._modules[b] = nn.Identity()
    if not _same_logits(model, sample, before, rtol):
        for parent, a, b, conv, bn in pairs:
            parent._modules[a], parent._modules[b] = conv, bn
        log.warning("fold_batchnorm: folding changed the logits (module order is not call order); not folded")
        return 0
    return len(pairs)


def fold_padding(model: nn.Module, sample: torch.Tensor, rtol: float = 1e-4) -> int:
    """Make each `Conv2d` that pads its input through a symmetric `nn.ZeroPad2d` child named
    `static_padding` (TensorFlow-style "same" padding fixed for one image size: EfficientNet-Lite's
    and `efficientnet_pytorch`'s convolutions) pad by itself, in place: the convolution's kernel
    reads the zeros it needs instead of a padded copy of the input, forward and backward. Asymmetric
    paddings (the strided convolutions' `(0, 1, 0, 1)`) have no `Conv2d` equivalent and stay.

    The result is checked as `fold_batchnorm`'s is (a module whose forward does not use its
    `static_padding` that way is restored). Returns the number of paddings folded.
    """
    convs = []
    for m in model.modules():
        pad = getattr(m, "static_padding", None)
        if isinstance(m, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and m.padding_mode == "zeros":
            left, right, top, bottom = pad.padding
            if left == right and top == bottom and tuple(m.padding) == (0, 0):
                convs.append((m, pad, (top, left)))
    if not convs:
        return 0
    with torch.no_grad():
        before = model(sample)
    for m, _, padding in convs:
        m.padding, m.static_padding = padding, nn.Identity()
    if not _same_logits(model, sample, before, rtol):
        for m, pad, _ in convs:
            m.padding, m.static_padding = (0, 0), pad
        log.warning("fold_padding: folding changed the logits; not folded")
        return 0
    return len(convs)


def _same_logits(model: nn.Module, sample: torch.Tensor, before: torch.Tensor, rtol: float) -> bool:
    try:
        with torch.no_grad():
            after = model(sample)
    except RuntimeError:
        return False
    return after.shape == before.shape and torch.allclose(
        after, before, rtol=rtol, atol=rtol * float(before.abs().max())
    )
