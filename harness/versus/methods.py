"""LIME, KernelSHAP, Guided IG, Blur IG, LRP and LeGrad against the libraries that define them, side by
side on one machine.

`python -m harness.versus.methods --out results/published/<machine>` times, on EfficientNet-Lite0 at
224x224 and the sample photos:

- LIME and KernelSHAP against Captum's `Lime` and `KernelShap` with their defaults (a Lasso of alpha
  0.01 for LIME, `perturbations_per_eval=1`), the same SLIC regions and the same number of samples
  (`--samples`) per photo, on `--images` photos;
- Guided IG and Blur IG against PAIR's `saliency` 0.2.1 (its NumPy core, one image at a time, a
  `call_model_function` that runs the model as a user would: one forward+backward per call, batch 1
  for Guided IG, PAIR's default `batch_size=1` for Blur IG), with PAIR's default steps (200, 100).
- LRP (EpsilonPlusFlat) against zennit's own: its `Gradient` attributor with the same composite, and
  EfficientNet-Lite's residual sums and global mean made zennit `Sum` and pooling layers by a
  canonizer (`zennit_lite_canonizer`), the way zennit's ResNet canonizer rewrites torchvision's blocks.
- LeGrad against torchcam's, on torchvision's ViT-B/16 at 224 with random weights (`legrad`).
- The model alone (`ceilings`): its forward, and its forward+backward, on the eight photos at batch 1
  against ours: the most any method whose work is the model's passes can win by batching them.

Ours run with the harness's defaults (channels_last, BatchNorm folded) at its calibrated chunk sizes.
The calls alternate, ours first, after one warm-up call each; every figure is the best of `--repeats`
calls. It writes `versus_methods.csv` and `versus_methods.md` into `--out`.
"""

from __future__ import annotations

import argparse
import logging
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import methods
from harness.runtime import machine_id
from harness.versus.cams import _row, best_of, write
from harness.versus.captum import Setup, _setup
from methods.surrogate import regions

log = logging.getLogger("harness")
SETTING = "efficientnet_lite0@224"
COMPARISONS = ("surrogates", "paths", "lrp", "legrad", "attn_lrp", "patches", "ceilings")


def surrogates(
    s: Setup, device: torch.device, repeats: int, images: int, samples: int
) -> list[dict[str, Any]]:
    """LIME and KernelSHAP, ours and Captum's, on `images` photos of `samples` samples each."""
    from captum.attr import KernelShap, Lime

    x, t = s.x[:images], s.t[:images]
    masks = regions(x, "slic", 50, 10.0, 8)

    def captum(kind: type) -> Callable[[], Any]:
        explainer = kind(s.captum_model)

        def call() -> list[torch.Tensor]:
            return [
                explainer.attribute(
                    x[i : i + 1], target=int(t[i]), feature_mask=masks[i][None, None], n_samples=samples
                )
                for i in range(len(x))
            ]

        return call

    rows = []
    for name, kind in (("lime", Lime), ("kernel_shap", KernelShap)):
        ours = getattr(methods, name)
        calls: dict[str, Callable[[], Any]] = {
            "ours": partial(ours, s.model, x, t, n_samples=samples, chunk_size=s.bs),
            "captum": captum(kind),
        }
        log.info("%s on %d photo(s), %d samples each", name, images, samples)
        rows.append(_row(f"{name} ({samples} samples)", images, best_of(calls, device, repeats)))
    return rows


def _pair_model(
    model: torch.nn.Module, target: int, device: torch.device
) -> Callable[..., dict[str, np.ndarray]]:
    """PAIR's `call_model_function`: `[N, H, W, C]` arrays in, the target logit's gradients out."""
    from saliency.core.base import INPUT_OUTPUT_GRADIENTS

    def call(batch: Any, call_model_args: Any = None, expected_keys: Any = None) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.asarray(batch, dtype=np.float32)).permute(0, 3, 1, 2).to(device)
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(model(x)[:, target].sum(), x)
        return {INPUT_OUTPUT_GRADIENTS: g.permute(0, 2, 3, 1).cpu().numpy()}

    return call


def paths(s: Setup, device: torch.device, repeats: int, images: int) -> list[dict[str, Any]]:
    """Guided IG and Blur IG, ours and PAIR's, on `images` photos with PAIR's default settings."""
    import saliency.core.guided_ig as pair_guided
    from saliency.core import BlurIG, GuidedIG

    # saliency 0.2.1 calls np.quantile(..., interpolation=), a keyword NumPy 2 renamed `method`.
    shim = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    shim.quantile = lambda a, q, interpolation="linear", **kw: np.quantile(a, q, method=interpolation, **kw)
    pair_guided.np = shim
    x, t = s.x[:images], s.t[:images]
    hwc = [x[i].permute(1, 2, 0).cpu().numpy() for i in range(images)]
    models = [_pair_model(s.captum_model, int(t[i]), device) for i in range(images)]
    guided = {
        "ours": lambda: methods.guided_ig(s.model, x, t, chunk_size=s.grad_bs),
        "pair-saliency": lambda: [GuidedIG().GetMask(hwc[i], models[i]) for i in range(images)],
    }
    blur = {
        "ours": lambda: methods.blur_ig(s.model, x, t, chunk_size=s.grad_bs),
        "pair-saliency": lambda: [BlurIG().GetMask(hwc[i], models[i]) for i in range(images)],
    }
    log.info("guided_ig and blur_ig on %d photo(s)", images)
    return [
        _row("guided_ig (200 steps)", images, best_of(guided, device, repeats)),
        _row("blur_ig (100 steps)", images, best_of(blur, device, repeats)),
    ]


def zennit_lite_canonizer() -> Any:
    """Zennit's canonizers for the harness's EfficientNet-Lite: BatchNorm merged, each residual block's
    sum a zennit `Sum` layer and the global mean an average pooling layer (zennit's route for a model's
    own additions; `methods.lrp` handles them per call instead).
    """
    from zennit.canonizers import AttributeCanonizer, CompositeCanonizer, MergeBatchNorm
    from zennit.layer import Sum

    from harness.models.efficientnet_lite import EfficientNetLite, LiteBlock

    # The modules the canonizer adds are read by name (`canonizer_sum`, `canonizer_pool`).
    def block_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        return self.canonizer_sum(torch.stack([self.project(self.depthwise(y)), x], dim=-1))

    def net_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.canonizer_pool(self.head(self.blocks(self.stem(x)))).flatten(1))

    def attributes(_name: str, module: torch.nn.Module) -> dict[str, Any] | None:
        if isinstance(module, LiteBlock) and module.skip:
            return {"forward": types.MethodType(block_forward, module), "canonizer_sum": Sum()}
        if isinstance(module, EfficientNetLite):
            pool = torch.nn.AdaptiveAvgPool2d(1)
            return {"forward": types.MethodType(net_forward, module), "canonizer_pool": pool}
        return None

    class MergeEachBatchNorm(MergeBatchNorm):
        """Zennit's merge for every convolution followed by BatchNorm in a `Sequential` (its own
        `SequentialMergeBatchNorm` skips EfficientNet's convolutions, which hold their padding as a
        module), with the BatchNorm made an exact identity: zennit leaves its `eps` in place, so it
        divides by `sqrt(1 + eps)`, 0.9995 for EfficientNet's 1e-3, at every merged layer.
        """

        def register(self, linears: Any, batch_norm: torch.nn.Module) -> None:
            super().register(linears, batch_norm)
            self.eps = float(getattr(batch_norm, "eps"))  # noqa: B009
            setattr(batch_norm, "eps", 0.0)  # noqa: B010

        def remove(self) -> None:
            setattr(self.batch_norm, "eps", self.eps)  # noqa: B010
            super().remove()

        def apply(self, root_module: torch.nn.Module) -> list[Any]:
            merged = []
            for seq in root_module.modules():
                if isinstance(seq, torch.nn.Sequential):
                    for conv, bn in zip(seq, list(seq)[1:], strict=False):
                        if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                            instance = self.copy()
                            instance.register((conv,), bn)
                            merged.append(instance)
            return merged

    return CompositeCanonizer([MergeEachBatchNorm(), AttributeCanonizer(attributes)])


def zennit_lrp(model: torch.nn.Module, composite: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Zennit's own LRP: its `Gradient` attributor, the output seeded with the target logit."""
    from zennit.attribution import Gradient

    with Gradient(model=model, composite=composite) as attributor:
        logits = attributor.model(x).detach()
        seed = torch.zeros_like(logits).scatter_(1, t[:, None], logits.gather(1, t[:, None]))
        _, relevance = attributor(x, seed)
    return relevance


def lrp(s: Setup, device: torch.device, repeats: int, images: int) -> list[dict[str, Any]]:
    """LRP's EpsilonPlusFlat, ours and zennit's own, on `images` photos at once."""
    from zennit.composites import EpsilonPlusFlat

    x, t = s.x[:images], s.t[:images]
    calls = {
        "ours": lambda: methods.lrp(s.model, x, t, chunk_size=s.grad_bs),
        "zennit": lambda: zennit_lrp(s.model, EpsilonPlusFlat(canonizers=[zennit_lite_canonizer()]), x, t),
    }
    log.info("lrp on %d photo(s)", images)
    return [_row("lrp (epsilon_plus_flat)", images, best_of(calls, device, repeats))]


def legrad(s: Setup, device: torch.device, repeats: int, images: int) -> list[dict[str, Any]]:
    """LeGrad, ours and torchcam's, over every block of torchvision's ViT-B/16 at 224 (random weights,
    its zero-initialised head drawn anew: no ViT weights ship offline) on `images` photos.
    """
    import copy

    import torchvision
    from torchcam.methods import LeGrad

    from harness.models.attention import show_attention

    torch.manual_seed(0)
    plain = torchvision.models.vit_b_16(weights=None).eval().to(device)
    torch.nn.init.normal_(plain.heads.head.weight, std=0.02)
    shown = copy.deepcopy(plain)
    show_attention(shown)
    x = s.x[:images].contiguous()
    with torch.no_grad():
        t = plain(x).argmax(1)

    def torchcam() -> torch.Tensor:
        with LeGrad(plain, list(plain.encoder.layers)) as extractor:
            return extractor(t.tolist(), plain(x), normalized=False)[0]

    calls = {
        "ours": lambda: methods.legrad(shown, x, t, prefix_tokens=1, grid=(14, 14), chunk_size=images),
        "torchcam": torchcam,
    }
    log.info("legrad on %d photo(s), ViT-B/16", images)
    return [_row("legrad (vit_b_16, 12 blocks)", images, best_of(calls, device, repeats))]


@contextmanager
def lxt_patched() -> Iterator[None]:
    """The patches lxt makes for torchvision's ViT (torch's GELU, LayerNorm and MultiheadAttention) and of
    zennit's hooks, undone at the end: lxt patches the classes, for every model in the process.
    """
    from torch import nn
    from zennit.core import BasicHook

    saved = [
        (cls, name, cls.__dict__.get(name))
        for cls in (nn.GELU, nn.LayerNorm, nn.MultiheadAttention, BasicHook)
        for name in ("forward", "backward", "original_forward")
    ]
    import torchvision
    from lxt.efficient import monkey_patch, monkey_patch_zennit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkey_patch(torchvision.models.vision_transformer)
        monkey_patch_zennit()
    try:
        yield
    finally:
        for cls, name, value in saved:
            if value is not None:
                setattr(cls, name, value)
            elif name in cls.__dict__:
                delattr(cls, name)


def lxt_relevance(
    model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conv_gamma: float, linear_gamma: float
) -> torch.Tensor:
    """AttnLRP as lxt's ViT example computes it (its patches on, `lxt_patched`; zennit's gamma rule on
    convolutions and linear layers), for the images `x` at once: `x * grad`, `[B, C, H, W]`.
    """
    from zennit import rules
    from zennit.composites import LayerMapComposite

    composite = LayerMapComposite(
        [(torch.nn.Conv2d, rules.Gamma(conv_gamma)), (torch.nn.Linear, rules.Gamma(linear_gamma))]
    )
    image = x.detach().clone().requires_grad_(True)
    with composite.context(model):
        model(image).gather(1, t[:, None]).sum().backward()
    assert image.grad is not None
    return (image * image.grad).detach()


def attn_lrp(s: Setup, device: torch.device, repeats: int, images: int) -> list[dict[str, Any]]:
    """AttnLRP, ours and lxt's, on torchvision's ViT-B/16 at 224 (random weights, its zero-initialised
    head drawn anew) on `images` photos: lxt's patches applied around each of its calls only.
    """
    import copy

    import torchvision

    from harness.models.attention import show_attention

    torch.manual_seed(0)
    plain = torchvision.models.vit_b_16(weights=None).eval().to(device)
    torch.nn.init.normal_(plain.heads.head.weight, std=0.02)
    for p in plain.parameters():
        p.requires_grad_(False)
    shown = copy.deepcopy(plain)
    show_attention(shown)
    x = s.x[:images].contiguous()
    with torch.no_grad():
        t = plain(x).argmax(1)

    def lxt() -> torch.Tensor:
        with lxt_patched():
            return lxt_relevance(plain, x, t, 0.25, 0.05)

    calls = {"ours": lambda: methods.attn_lrp(shown, x, t, chunk_size=images), "lxt": lxt}
    log.info("attn_lrp on %d photo(s), ViT-B/16", images)
    return [_row("attn_lrp (vit_b_16, gamma 0.25 / 0.05)", images, best_of(calls, device, repeats))]


def patches(s: Setup, device: torch.device, repeats: int, images: int) -> list[dict[str, Any]]:
    """Occlusion of whole patches, ours and Captum's `Occlusion` with a patch for window and stride,
    on a ViT-Tiny-sized torchvision ViT at 224 (4 blocks of width 192, 16-pixel patches, random
    weights), softmax scores, on `images` photos.
    """
    import torchvision
    from captum.attr import Occlusion

    from harness.models.attention import show_attention

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=224, patch_size=16, num_layers=4, num_heads=3, hidden_dim=192, mlp_dim=768
    ).eval().to(device)  # fmt: skip
    torch.nn.init.normal_(vit.heads.head.weight, std=0.02)
    show_attention(vit)
    x = s.x[:images].contiguous()
    with torch.no_grad():
        t = vit(x).argmax(1)
    scorer = torch.nn.Sequential(vit, torch.nn.Softmax(dim=1))
    calls = {
        "ours": lambda: methods.patch_occlusion(vit, x, t, grid=(14, 14), chunk_size=s.bs * images),
        "captum": lambda: Occlusion(scorer).attribute(
            x, sliding_window_shapes=(3, 16, 16), strides=(3, 16, 16), target=t
        ),
    }
    log.info("patch_occlusion on %d photo(s), a 4-block ViT", images)
    return [_row("patch_occlusion (vit, 4 blocks, 196 patches)", images, best_of(calls, device, repeats))]


def ceilings(s: Setup, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """The model alone on the eight photos, as the libraries run it (batch 1, the model as a user
    passes it) and as ours does (its calibrated batch sizes, BatchNorm folded): the most that batching
    and the harness's model options can win for a method whose work is the model's passes, as LIME's
    and KernelSHAP's is forwards and Guided IG's forwards and backwards.
    """

    def forwards(model: torch.nn.Module, bs: int) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                for i in range(0, len(s.x), bs):
                    model(s.x[i : i + bs])

        return call

    def backwards(model: torch.nn.Module, bs: int) -> Callable[[], None]:
        def call() -> None:
            for i in range(0, len(s.x), bs):
                x = s.x[i : i + bs].detach().requires_grad_(True)
                torch.autograd.grad(model(x).gather(1, s.t[i : i + bs, None]).sum(), x)

        return call

    log.info("the model's own passes at batch 1 and at ours")
    fwd = {"ours": forwards(s.model, s.bs), "batch-1": forwards(s.captum_model, 1)}
    fb = {"ours": backwards(s.model, s.grad_bs), "batch-1": backwards(s.captum_model, 1)}
    return [
        _row("the model's forward", len(s.x), best_of(fwd, device, repeats)),
        _row("the model's forward+backward", len(s.x), best_of(fb, device, repeats)),
    ]


def main(argv: list[str] | None = None) -> None:
    """Run the comparisons and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for versus_methods.csv and .md")
    parser.add_argument("--repeats", type=int, default=2, help="repeats per figure; the best is kept")
    parser.add_argument("--images", type=int, default=2, help="photos per call")
    parser.add_argument("--samples", type=int, default=200, help="LIME's and KernelSHAP's samples per photo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--only", nargs="+", choices=COMPARISONS, default=COMPARISONS,
        help="the comparisons to run (default: all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    device = torch.device(args.device)
    s = _setup(SETTING, device)
    rows = []
    if "surrogates" in args.only:
        rows += surrogates(s, device, args.repeats, args.images, args.samples)
    if "paths" in args.only:
        rows += paths(s, device, args.repeats, args.images)
    if "lrp" in args.only:
        rows += lrp(s, device, args.repeats, len(s.x))
    if "legrad" in args.only:
        rows += legrad(s, device, args.repeats, args.images)
    if "attn_lrp" in args.only:
        rows += attn_lrp(s, device, args.repeats, args.images)
    if "patches" in args.only:
        rows += patches(s, device, args.repeats, args.images)
    if "ceilings" in args.only:
        rows += ceilings(s, device, args.repeats)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"# Methods against the libraries that define them ({machine_id()}, {args.device}, {SETTING})"
    write(args.out, "versus_methods", title, table, args.repeats, s)


if __name__ == "__main__":
    main()
