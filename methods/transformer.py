"""Methods that read a vision transformer's attention: attention rollout (Abnar and Zuidema 2020,
arXiv:2005.00928), Chefer et al.'s gradient-weighted rollout (2021, "Generic attention-model
explainability", arXiv:2103.15679) and LeGrad (Bousselham et al. 2024, arXiv:2404.03214).

A transformer shows its attention by passing each block's probabilities, `[B, heads, N, N]` after the
softmax, through an `AttentionProbs` module: the harness's `shapes_vit` does so in its own forward,
and the harness rewrites torchvision's and timm's ViT attention to (`harness.models.attention`).
`captured` reads every block's in one forward, and the methods take the target logit's gradient with
respect to them in the same graph, so the logits are the model's own.

Tokens: `prefix_tokens` (the class token, and registers or a distillation token) come first, then the
patch grid, row by row; a map is the class token's row over the patch tokens, on the grid (`grid`, or
the square the token count makes), upsampled to the image bilinearly as the CAMs are.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

import torch
from annotated_types import Ge, Lt
from torch import nn

from methods.common import Count, chunked, method


class AttentionProbs(nn.Identity):
    """Where a transformer block's attention probabilities pass, `[B, heads, N, N]` (each row sums to
    one): the identity, marking them for `captured`.
    """


def has_attention(model: nn.Module) -> bool:
    """Whether the model passes its attention through `AttentionProbs` modules."""
    return any(isinstance(m, AttentionProbs) for m in model.modules())


def is_attention_layer(m: nn.Module) -> bool:
    """An attention layer: `nn.MultiheadAttention`, one that passes its probabilities through an
    `AttentionProbs` child (shapes_vit's, timm's once shown), or torchvision's Swin window attention.
    """
    return (
        isinstance(m, nn.MultiheadAttention)
        or any(isinstance(c, AttentionProbs) for c in m.children())
        or type(m).__name__.startswith("ShiftedWindowAttention")
    )


def usable_methods(model: nn.Module, probe: torch.Tensor) -> list[str]:
    """The methods a model can be explained by: those whose check of the model
    (`MethodTraits.check_model`, on `probe`) passes, or that have none; a method that reads the
    attention probabilities where the model shows them (`AttentionProbs`).
    """
    import methods

    usable = []
    for name in methods.__all__:
        fn = getattr(methods, name)
        if not hasattr(fn, "traits"):
            continue
        check = methods.traits_of(fn).check_model
        if check in (check_attention, check_transformer):  # answered here, not asked again
            layers = any(is_attention_layer(m) for m in model.modules())
            if has_attention(model) if check is check_attention else layers:
                usable.append(name)
            continue
        try:
            if check is not None:
                check(model, probe)
        except ValueError:
            continue
        usable.append(name)
    return sorted(usable)


def check_attention(model: nn.Module, probe: torch.Tensor) -> None:
    """Raise `ValueError` for a model that shows no attention, naming the methods it can use."""
    if has_attention(model):
        return
    raise ValueError(
        f"{type(model).__name__} shows no attention over a class token (no "
        "methods.transformer.AttentionProbs module: the harness's shapes_vit and torchvision's and timm's "
        "ViTs have them; a Swin's windowed attention has no class token); methods for it: "
        + ", ".join(usable_methods(model, probe))
    )


def check_transformer(model: nn.Module, probe: torch.Tensor) -> None:
    """Raise `ValueError` for a model without an attention layer, naming the methods it can use."""
    if not any(is_attention_layer(m) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no attention layer (nn.MultiheadAttention, timm's or shapes_vit's "
            "attention, Swin's window attention): it is no transformer; methods for it: "
            + ", ".join(usable_methods(model, probe))
        )


@contextmanager
def captured(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every block's attention probabilities of the forwards inside the block, in call order (with
    autograd, when it records); the hooks are always removed.
    """
    seen: list[torch.Tensor] = []

    def keep(_m: nn.Module, _a: tuple, out: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not out.requires_grad:  # attention that no input moves: still
            out = out.detach().requires_grad_(True)  # a node of the graph, for the logits' gradient
        seen.append(out)
        return out

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, AttentionProbs)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _patch_map(
    rows: torch.Tensor, prefix_tokens: int | None, grid: tuple[int, int] | None, x: torch.Tensor
) -> torch.Tensor:
    """The rows `[B, N]` over the patch tokens (after `prefix_tokens`, None: 1), as maps the size of
    the images `x`: `[B, 1, H, W]`.
    """
    prefix, size = 1 if prefix_tokens is None else prefix_tokens, (int(x.shape[2]), int(x.shape[3]))
    patches = rows[:, prefix:]
    if grid is None:
        side = round(patches.shape[1] ** 0.5)
        if side * side != patches.shape[1]:
            raise ValueError(
                f"{patches.shape[1]} patch tokens after {prefix} prefix tokens make no square grid; "
                "give grid=(rows, columns)"
            )
        grid = (side, side)
    if grid[0] * grid[1] != patches.shape[1]:
        raise ValueError(
            f"grid={tuple(grid)} holds {grid[0] * grid[1]} patches; the model has {patches.shape[1]}"
        )
    maps = patches.reshape(len(rows), 1, *grid)
    return bilinear(maps, size)


def bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`maps` `[B, C, h, w]` resized to `size` as `F.interpolate(mode="bilinear")` resizes them (half-pixel
    centres, no corner alignment), as two small matrix products: on the CPU four to five times faster
    than its kernel for a patch grid (the attention methods' maps, and Captum's CAM upsampling).
    """
    rows = _interpolation(maps.shape[-2], size[0], maps.dtype, maps.device)
    cols = _interpolation(maps.shape[-1], size[1], maps.dtype, maps.device)
    return rows @ maps @ cols.T


@functools.lru_cache(maxsize=64)
def _interpolation(n: int, out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The `[out, n]` matrix of linear interpolation from `n` samples to `out` (PyTorch's rule: source
    coordinate `(o + 0.5) * n / out - 0.5`, clamped at 0, the last sample repeated past the end).
    """
    src = ((torch.arange(out, dtype=torch.float64) + 0.5) * (n / out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = src - lo
    w = torch.zeros(out, n, dtype=torch.float64)
    w[torch.arange(out), lo] += 1 - frac
    w[torch.arange(out), hi] += frac
    return w.to(dtype=dtype, device=device)


def _fused(probs: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion == "mean":
        return probs.mean(dim=1)
    if head_fusion == "max":
        return probs.amax(dim=1)
    return probs.amin(dim=1)


HeadFusion = Literal["mean", "max", "min"]


@method(attention=True, forward_only=True, check_model=check_attention)
def attention_rollout(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, head_fusion: HeadFusion = "mean",
    discard_ratio: Annotated[float, Ge(0), Lt(1)] = 0.0, prefix_tokens: Annotated[int, Ge(0)] | None = None,
    grid: tuple[int, int] | None = None, chunk_size: Count = 64,
) -> torch.Tensor:  # fmt: skip
    """Attention rollout: each block's attention fused over heads (`head_fusion`), its smallest
    `discard_ratio` share of entries set to zero (never the class token's own), mixed half and half
    with the identity for the residual path and renormalised by row, then multiplied through the
    blocks, `R = A_L ... A_1`; the map is the class token's row of `R` over the patches. The target
    is not read (rollout explains the class token, whatever the class). `[B, 1, H, W]`.

    Args:
        model: a transformer that shows its attention (`AttentionProbs`).
        inputs: `[B, C, H, W]` images.
        target: `[B]` classes (unused).
        head_fusion: `mean`, `max` or `min` over the heads.
        discard_ratio: share of each block's fused entries, the smallest, set to zero (Abnar and
            Zuidema keep all; jacobgil's vit-explain discards, e.g. 0.9).
        prefix_tokens: tokens before the patches (class token, registers); None: 1 (the job binds the
            model's).
        grid: the patch grid `(rows, columns)`; None: the square the patch tokens make.
        chunk_size: images per forward.
    """
    shown = [m for m in model.modules() if isinstance(m, AttentionProbs)]

    def rollout(x: torch.Tensor, _t: torch.Tensor) -> torch.Tensor:
        # Each block's attention is fused over heads as the forward passes it, so that no block's full
        # probabilities outlive their block (holding them cost a plain forward 10 to 17% here).
        fused: list[torch.Tensor] = []

        def fold(_m: nn.Module, _a: tuple, probs: torch.Tensor) -> None:
            a = _fused(probs, head_fusion)
            if discard_ratio > 0:
                a = _discarded(a, discard_ratio)
            a.diagonal(dim1=-2, dim2=-1).add_(1.0)  # the residual path; halves cancel in the norm
            if head_fusion == "mean" and discard_ratio == 0:  # rows of one plus the identity's
                fused.append(a.mul_(0.5))
            else:
                fused.append(a.div_(a.sum(dim=-1, keepdim=True)))

        hooks = [m.register_forward_hook(fold) for m in shown]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()
        if not fused:
            raise ValueError(f"{type(model).__name__} passed no attention through an AttentionProbs module")
        # Only the class token's row of R = A_L ... A_1 is read: a row times each block's matrix from
        # the last block down (N^2 a block, not the N^3 of the matrix product).
        row = fused[-1][:, 0]
        for a in reversed(fused[:-1]):
            row = (row[:, None] @ a)[:, 0]
        return _patch_map(row, prefix_tokens, grid, x)

    return chunked(rollout, inputs, target, chunk_size)


def _discarded(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """`a` `[B, N, N]` with the `ratio` share of each image's smallest entries set to zero, the class
    token's attention to itself (entry 0) excepted.
    """
    flat = a.flatten(1).clone()
    k = int(flat.shape[1] * ratio)
    if k == 0:
        return a
    order = flat[:, 1:].argsort(dim=1, stable=True)[:, :k] + 1  # entry 0 never discarded
    flat.scatter_(1, order, 0.0)
    return flat.view_as(a)


@method(attention=True, check_model=check_attention)
def generic_attention(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *,
    prefix_tokens: Annotated[int, Ge(0)] | None = None, grid: tuple[int, int] | None = None,
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """Chefer et al.'s gradient-weighted rollout for self-attention (2021, eq. 5-6): each block's
    attention times the target logit's gradient with respect to it, its positive part averaged over
    the heads, `Ā = E_h[(∇A ⊙ A)^+]`, accumulated as `R ← R + Ā R` from `R = I`; the map is the class
    token's row over the patches. One forward and one backward. `[B, 1, H, W]`.

    Args:
        model: a transformer that shows its attention (`AttentionProbs`).
        inputs: `[B, C, H, W]` images.
        target: `[B]` classes.
        prefix_tokens: tokens before the patches; None: 1 (the job binds the model's).
        grid: the patch grid `(rows, columns)`; None: the square the patch tokens make.
        chunk_size: images per forward and backward.
    """

    def relevance(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad(), captured(model) as seen:
            logits = model(x)
            if not seen:
                raise ValueError(
                    f"{type(model).__name__} passed no attention through an AttentionProbs module"
                )
            grads = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), seen)
        # The class token's row of R = (I + A_L) ... (I + A_1), from the last block down.
        row = None
        for probs, grad in zip(reversed(seen), reversed(grads), strict=True):
            a = (grad * probs.detach()).clamp(min=0).mean(dim=1)
            if row is None:
                row = a[:, 0] + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)[0]
            else:
                row = row + (row[:, None] @ a)[:, 0]
        assert row is not None
        return _patch_map(row, prefix_tokens, grid, x)

    return chunked(relevance, inputs, target, chunk_size)


def _attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The block that holds each attention (the module two levels above its `AttentionProbs`: a
    block's attention layer, then the block), in the order the modules were assigned.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, AttentionProbs)]
    if any(n.count(".") < 2 for n in names):
        raise ValueError(
            "legrad reads the tokens of the block around each attention (block.attention.probs); "
            f"{type(model).__name__}'s AttentionProbs sit at {', '.join(names)}"
        )
    return [model.get_submodule(n.rsplit(".", 2)[0]) for n in names]


def _readout(model: nn.Module, names: list[str] | None) -> nn.Sequential:
    """The modules that map a pooled token to the logits: `names`, or torchvision's ViT's final norm
    and heads, or a model's `norm` (`fc_norm`) and `head` (shapes_vit, timm).
    """
    if names is None:
        if isinstance(getattr(getattr(model, "encoder", None), "ln", None), nn.Module) and hasattr(
            model, "heads"
        ):
            names = ["encoder.ln", "heads"]
        elif isinstance(getattr(model, "head", None), nn.Module) and isinstance(
            getattr(model, "norm", None), nn.Module
        ):
            names = [
                "norm",
                *(["fc_norm"] if isinstance(getattr(model, "fc_norm", None), nn.Module) else []),
                "head",
            ]
        else:
            raise ValueError(
                f"legrad: {type(model).__name__} has no final norm and head it knows (encoder.ln and "
                "heads, or norm and head); give readout=[the modules from a pooled token to the logits]"
            )
    return nn.Sequential(*(model.get_submodule(n) for n in names))


@method(attention=True, check_model=check_attention)
def legrad(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, *, layers: Count | None = None,
    pool: Literal["mean", "cls"] = "mean", readout: list[str] | None = None,
    prefix_tokens: Annotated[int, Ge(0)] | None = None, grid: tuple[int, int] | None = None,
    chunk_size: Count = 16,
) -> torch.Tensor:  # fmt: skip
    """LeGrad (Bousselham et al. 2024, arXiv:2404.03214, as torchcam 0.5 computes it): for each of the
    last `layers` blocks, the target's score read from that block's tokens (pooled by `pool`, through
    the model's final norm and head, `readout`), its gradient with respect to the block's attention
    probabilities, the positive part averaged over heads and queries; the blocks' maps averaged. The
    attention itself is not multiplied in: a patch counts by how its token would move the score,
    wherever the class token looks. One forward and a short backward per block. `[B, 1, H, W]`.

    Args:
        model: a transformer that shows its attention (`AttentionProbs`), each inside a block.
        inputs: `[B, C, H, W]` images.
        target: `[B]` classes.
        layers: the last blocks to read; None: every block.
        pool: `mean` of a block's tokens (torchcam's) or its class token (`cls`).
        readout: module names from a pooled token to the logits; None: the model's final norm and
            head (torchvision's ViT: `encoder.ln`, `heads`; shapes_vit and timm: `norm`, `head`).
        prefix_tokens: tokens before the patches; None: 1 (the job binds the model's).
        grid: the patch grid `(rows, columns)`; None: the square the patch tokens make.
        chunk_size: images per forward and backward.
    """
    project, blocks = _readout(model, readout), _attention_blocks(model)

    def relevance(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda _m, _a, out: outs.append(out)) for b in blocks]
        try:
            with torch.enable_grad(), captured(model) as seen:
                model(x)
                k = len(seen) if layers is None else min(layers, len(seen))
                maps = []
                for out, probs in zip(outs[-k:], seen[-k:], strict=True):
                    pooled = out.mean(dim=1) if pool == "mean" else out[:, 0]
                    score = project(pooled).gather(1, t[:, None]).sum()
                    (g,) = torch.autograd.grad(score, probs, retain_graph=True)
                    maps.append(g.clamp(min=0).mean(dim=(1, 2)))
        finally:
            for h in hooks:
                h.remove()
        rows = torch.stack(maps).mean(dim=0)
        return _patch_map(rows, prefix_tokens, grid, x)

    return chunked(relevance, inputs, target, chunk_size)
