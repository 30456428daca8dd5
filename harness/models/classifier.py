"""The model contract: a `Classifier` is an eval-mode module plus the facts the harness needs, and
`Classifier.from_module` the one constructor every builder ends with.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
import torchvision
from annotated_types import Ge, Gt
from torch import nn

from harness.config import HarnessError, read_listing
from harness.models.attention import show_attention, token_layout
from harness.models.weights import load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Blocks = list[str | list[str]]
# The builders' settings' types and ranges, read by the config's checks before any model work
# (`harness.config.check_node`): a count of at least 1; an input side of at least 8 pixels (fewer give
# maps with nothing to rank and break the models' strided stages); three channel means; three positive
# channel deviations.
Count = Annotated[int, Ge(1)]
Side = Annotated[int, Ge(8)]
Rgb = tuple[float, float, float]
RgbScale = tuple[Annotated[float, Gt(0)], Annotated[float, Gt(0)], Annotated[float, Gt(0)]]


@dataclass
class Classifier:
    """A classifier and what the harness must know about it.

    Attributes:
        module: `nn.Module` in eval mode mapping `[B, 3, H, W]` normalised images to logits `[B, K]`.
        name: config name of the model, the value of `model` in the results row.
        input_size: side of the square input in pixels.
        mean: per-channel mean used for normalisation (pixel values in [0, 1]).
        std: per-channel standard deviation used for normalisation.
        cam_layer: qualified name of the layer that Grad-CAM explains (`module.get_submodule`).
        cam_layout: how that layer's output holds its feature map: `nchw` (convolutions), `nhwc`
            (Swin's stages) or `tokens` (`[B, 1 + h*w, C]`, a ViT's class token first).
        class_names: one name per logit.
        pretrained: whether trained weights were loaded (false means random weights).
        seed: the seed that drew the random weights, or None when weights were loaded.
        blocks: the model's top-level stages in the order of its forward pass, for the sanity
            checks that re-initialise them; each a module name or a list of names taken together.
        facts: what the builder measured about the model (e.g. a trained model's held-out
            accuracy), carried into the row as `model_<key>`.
        tokens: a transformer's token layout, `(prefix, rows, columns)`: the tokens before the
            patches (class token, registers) and the patch grid; None for a CNN. `from_module` makes
            the attention of torchvision's and timm's ViTs shown (`harness.models.attention`) and
            reads their layout.
    """

    module: nn.Module
    name: str
    input_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    cam_layer: str = ""
    cam_layout: str = "nchw"
    class_names: list[str] = field(default_factory=list)
    pretrained: bool = False
    seed: int | None = None
    blocks: Blocks = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    tokens: tuple[int, int, int] | None = None

    @property
    def pixel_range(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The lowest and highest value of each input channel: pixel values 0 and 1, normalised."""
        low = tuple((0.0 - m) / s for m, s in zip(self.mean, self.std, strict=True))
        return low, tuple((1.0 - m) / s for m, s in zip(self.mean, self.std, strict=True))

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        name: str,
        input_size: int,
        *,
        class_names: str | Sequence[str] | None,
        num_classes: int,
        pretrained: bool,
        seed: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        cam_layer: str = "",
        cam_layout: str = "nchw",
        blocks: Any = None,
        facts: dict[str, Any] | None = None,
        tokens: tuple[int, int, int] | None = None,
    ) -> Classifier:
        """The classifier of a built module: the module in eval mode with no in-place activations,
        its class names (a file's, ImageNet's for 1000 classes, else the indices; or the names
        given), the seed of its random weights kept only when none were loaded (`pretrained`).
        """
        check_finite(module, name)
        if show_attention(module) and tokens is None:
            tokens = token_layout(module)
        if class_names is None or isinstance(class_names, str):
            names = class_names_from(class_names, num_classes)
        else:
            names = list(class_names)
        return cls(
            module=prepare(module),
            name=name,
            input_size=input_size,
            mean=tuple(mean),
            std=tuple(std),
            cam_layer=cam_layer,
            cam_layout=cam_layout,
            class_names=names,
            pretrained=pretrained,
            seed=None if pretrained else seed,
            blocks=plain_blocks(blocks),
            facts=dict(facts or {}),
            tokens=None if tokens is None else (int(tokens[0]), int(tokens[1]), int(tokens[2])),
        )


def check_finite(module: nn.Module, name: str) -> None:
    """Every weight and buffer of the module finite: a NaN or inf in one makes every score NaN."""
    bad = [k for k, t in module.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f", ... ({len(bad)} in all)" if len(bad) > 3 else "")
        raise HarnessError(
            f"model {name}: weights hold NaN or inf ({shown}); expected finite weights (was the "
            "checkpoint saved after training diverged?)"
        )


def prepare(module: nn.Module) -> nn.Module:
    """Eval mode, no in-place activations (Captum's hooks need the pre-activation values)."""
    for m in module.modules():
        if hasattr(m, "inplace"):
            setattr(m, "inplace", False)  # noqa: B010 (typed modules do not declare it)
    return module.eval()


def plain_blocks(blocks: Any) -> Blocks:
    """Blocks as plain lists and strings (configs give OmegaConf lists)."""
    return [b if isinstance(b, str) else [str(n) for n in b] for b in (blocks or [])]


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's metadata (no download)."""
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def class_names_from(path: str | None, n: int) -> list[str]:
    """One class name per logit: from a file (one per line, or a JSON list, or ImageNet's
    `{"0": ["n01440764", "tench"]}`), ImageNet's for 1000 logits, else the indices.
    """
    if path is None:
        return imagenet_classes() if n == 1000 else [str(i) for i in range(n)]
    found = read_listing(path, "model.class_names", "one class name per line")
    if isinstance(found, dict):  # {"0": "tench", ...} or ImageNet's {"0": ["n01440764", "tench"]}
        found = [found[k][-1] if isinstance(found[k], list) else found[k] for k in sorted(found, key=int)]
    names = [str(v) for v in found] if isinstance(found, list) else []
    if len(names) != n:
        raise HarnessError(f"model.class_names={path!r} has {len(names)} names; the model has {n} classes")
    return names


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's CPU generator seeded with `seed` inside the block, and leave the generator
    as it was outside it: random weights then depend on the seed alone, not on what ran before in
    the process (the jobs of a sweep share one under the basic launcher, not under joblib).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_or_loaded(
    build: Callable[[], nn.Module], weights: str | None, seed: int, **load: Any
) -> nn.Module:
    """The module with random weights drawn from `seed`, then loaded from the file `weights`
    (`load`: the keyword arguments of `harness.models.weights.load_weights`).
    """
    with seeded(seed):
        module = build()
    if weights is not None:
        load_weights(module, str(weights), **load)
    return module


def check_arch(arch: str, known: list[str], what: str, listing: str) -> None:
    """Refuse an architecture name the library does not know, with the closest names.

    Args:
        arch: the name given (`model.arch`).
        known: the library's names.
        what: what the library builds, e.g. `a timm model`.
        listing: how to list the names, e.g. `timm.list_models() lists them`.
    """
    if arch not in known:
        close = difflib.get_close_matches(str(arch), known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise HarnessError(f"model.arch={arch!r} is not {what}; {hint}{listing}")


def check_num_classes(num_classes: Any) -> None:
    """Refuse a number of classes that is not a positive integer."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise HarnessError(f"model.num_classes={num_classes!r}; expected a positive number of classes")
