"""`shapes_vit`: a small vision transformer that the harness trains, in-process, on the generated
shapes, exactly as `shapes_cnn` (`harness.models.shapes`): on the data's `train` split, its held-out
accuracy measured on `val`, cached in `$HARNESS_CACHE` under its settings, refused below
`min_accuracy`.

A convolutional patch embedding (four convolutions of total stride 8, BatchNorm and ReLU between: one
token per 8x8 patch, each seeing 23x23 pixels; the "hybrid" ViT of Dosovitskiy et al. 2021), a class
token and learned position embeddings, pre-norm blocks of standard multi-head self-attention and a
GELU MLP, and the class token's final state to the logits. With a single linear patch projection, or
three convolutions seeing 11x11 pixels, the model reached 60% and 86% held-out accuracy in 8 epochs on
the 2-core CPU; this one reaches 97% in 6 (about two minutes). Each block's attention probabilities
pass through a `methods.transformer.AttentionProbs` module, where the attention methods read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from annotated_types import Gt, Interval
from torch import nn

from harness.models.classifier import Classifier, Count, Side, seeded
from harness.models.shapes import MEAN, STD, generator_settings, trained_once
from methods.transformer import AttentionProbs

PATCH = 8  # the patch embedding's stride: one token per 8x8 pixels


class SelfAttention(nn.Module):
    """Multi-head self-attention, its probabilities `[B, heads, N, N]` through `probs`."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.probs = AttentionProbs()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        probs = self.probs((q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1))
        return self.proj((probs @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: `x + attention(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ShapesViT(nn.Module):
    """Patch embedding, class token, position embeddings, `depth` blocks, the class token's logits."""

    def __init__(
        self, num_classes: int, input_size: int = 64, dim: int = 64, depth: int = 3, heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        grid = input_size // PATCH
        self.embed = nn.Sequential(
            nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 48, 3, 2, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(),
            nn.Conv2d(48, 48, 3, 1, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(),
            nn.Conv2d(48, dim, 3, 2, 1),
        )  # fmt: skip
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + grid * grid, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def shapes_vit(
    data: Mapping[str, Any],
    input_size: Side = 64,
    dim: Count = 64,
    depth: Count = 3,
    heads: Count = 4,
    mlp_ratio: Count = 2,
    train_images: Count = 12000,
    val_images: Count = 2000,
    epochs: Count = 6,
    batch_size: Count = 64,
    lr: Annotated[float, Gt(0)] = 3e-3,
    min_accuracy: Annotated[float, Interval(ge=0, le=1)] = 0.95,
    seed: int = 0,
    cam_layer: str | None = None,
    cam_layout: str = "tokens",
    blocks: list[str | list[str]] | None = None,
) -> Classifier:
    """The shapes transformer for the job's `data` (its config node, which must be `data=shapes`),
    trained once and cached (see the module's docstring); its held-out accuracy goes into the row.

    Args:
        data: the job's data config; the model learns the classes that it generates.
        input_size: side of the input, a multiple of 8 (the data is generated at this size).
        dim: the tokens' width.
        depth: transformer blocks.
        heads: attention heads per block (dividing `dim`).
        mlp_ratio: the MLP's hidden width over `dim`.
        train_images: images of the training split.
        val_images: images of the held-out split, for the accuracy.
        epochs: passes over the training split.
        batch_size: images per step.
        lr: the one-cycle schedule's peak learning rate (AdamW).
        min_accuracy: a model whose held-out accuracy is lower is refused.
        seed: draws the initial weights and the batches.
        cam_layer: the layer that Grad-CAM explains (its tokens); None: the last block's first norm
            (the last block's output reaches the logits through its class token only, so its patch
            tokens get no gradient).
        cam_layout: how that layer holds its map: `tokens` (the class token, then the patches).
        blocks: stages for the sanity checks, in forward order; None: the embedding, each block, and
            the final norm with the head.
    """
    from harness.config import HarnessError

    if input_size % PATCH:
        raise HarnessError(f"model.input_size={input_size}: shapes_vit needs a multiple of {PATCH}")
    if dim % heads:
        raise HarnessError(f"model.dim={dim} is not a multiple of model.heads={heads}")
    gen = generator_settings(data, "shapes_vit")
    settings = {
        "input_size": input_size, "dim": dim, "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio,
        "train_images": train_images, "val_images": val_images, "epochs": epochs, "batch_size": batch_size,
        "lr": lr, "seed": seed,
    }  # fmt: skip
    classes = list(gen["classes"])
    with seeded(seed):
        module = ShapesViT(len(classes), input_size, dim, depth, heads, mlp_ratio)
    facts = trained_once(module, "shapes_vit", gen, settings, min_accuracy)
    grid = input_size // PATCH
    return Classifier.from_module(
        module, "shapes_vit", input_size, class_names=classes, num_classes=len(classes), pretrained=True,
        mean=MEAN, std=STD, cam_layer=cam_layer or f"blocks.{depth - 1}.norm1", cam_layout=cam_layout,
        blocks=blocks or ["embed", *(f"blocks.{i}" for i in range(depth)), ["norm", "head"]],
        tokens=(1, grid, grid),
        facts={k: facts[k] for k in ("held_out_accuracy", "held_out_images", "train_images", "train_s")},
    )  # fmt: skip
