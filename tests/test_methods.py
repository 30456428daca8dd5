"""Every method: contract, determinism, batch and chunk invariance; analytic and naive references."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import methods
from methods.common import seed_all, traits_of
from methods.perturbation import rise_masks
from tests.conftest import CONF, Linear, PatchDetector, method_configs

# An image's draws depend on the images before it (the noise tunnel, Expected Gradients, LIME and
# KernelSHAP draw image by image, in order, whatever the chunk) or, in Captum's GradientShap, on which
# images share a call; RISE's masks are shared, so it stays exact.
BATCH_DEPENDENT = {
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
    "expected_gradients",
    "lime",
    "patch_lime",
    "kernel_shap",
    "gradient_shap",
}
CHUNK_DEPENDENT = {"gradient_shap"}
CHEAP = {"n_steps": 8, "nt_samples": 4, "n_samples": 4, "n_masks": 24, "window": 8, "stride": 4, "steps": 6}
CHEAP |= {"max_sigma": 4.0}  # Blur IG's strongest blur on 32-pixel images
# LIME's and KernelSHAP's regions: a grid (SLIC finds one superpixel in these noise images).
CHEAP |= {"segments": "grid"}


def configured(name: str, chunk_size: int = 4, **overrides):
    """The method as its config builds it, with cheap settings for the small CNN."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", [f"method={name}", "model=small_cnn", "device=cpu", "device.batch_size=4"])
    params = {k: v for k, v in cfg.method.items() if not k.startswith("_")}
    kw = {k: CHEAP[k] for k in params if k in CHEAP}
    if "chunk_size" in params:
        kw["chunk_size"] = chunk_size
    if params.get("grid", 0) is None:  # the patch grid the job binds: the small transformer's (model_for)
        kw["grid"] = (4, 4)
    fn = instantiate(cfg.method, **kw, **overrides)
    return fn


# Reference images for a method that draws baselines from the data (the job binds held-out images).
REFERENCES = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(5))


_VIT: list[torch.nn.Module] = []


def model_for(name: str, small_cnn) -> torch.nn.Module:
    """The small CNN, or for a method that reads attention a small transformer (random weights)."""
    if not traits_of(getattr(methods, name)).attention:
        return small_cnn.module
    if not _VIT:
        from harness.models.shapes_vit import ShapesViT

        torch.manual_seed(0)
        _VIT.append(ShapesViT(5, input_size=32, dim=32, depth=2, heads=4).eval())
    return _VIT[0]


def call(fn, model, x, t, seed=0):
    seed_all(seed)
    if traits_of(fn).references:
        return fn(model, x, t, references=REFERENCES)
    if traits_of(fn).ground_truth:  # the oracle: each image's "object" is where its red channel is positive
        from metrics import GroundTruth

        return fn(model, x, t, ground_truth=GroundTruth.from_masks(x[:, 0] > 0))
    return fn(model, x, t)


@pytest.mark.parametrize("name", method_configs())
def test_contract_shape_device_finite_repeatable(name, small_cnn, images):
    fn = configured(name)
    t = torch.tensor([0, 1, 2, 3, 4])
    a = call(fn, model_for(name, small_cnn), images, t)
    assert isinstance(a, torch.Tensor) and a.device == images.device
    assert a.shape[0] == 5 and a.shape[1] in (1, 3) and a.shape[2:] == (32, 32)
    assert torch.isfinite(a).all()
    assert a.abs().sum() > 0
    torch.testing.assert_close(call(fn, model_for(name, small_cnn), images, t), a)


@pytest.mark.parametrize("name", method_configs())
def test_declared_traits_hold(name, small_cnn, images):
    """Each method's traits say what it does: a method not declared stochastic gives the same map
    whatever the generators' state; a forward-only one never backpropagates.
    """
    fn, t = configured(name), torch.tensor([0, 1, 2, 3, 4])
    traits = traits_of(fn)
    backwards = []

    def count_backward(module, args, out):
        if out.requires_grad:  # fires only when something backpropagates through the logits
            out.register_hook(lambda grad: backwards.append(1))

    model = model_for(name, small_cnn)
    # LeGrad backpropagates from each block's own score, not through the logits: its blocks' outputs too.
    watched = [model, *(m for m in model.modules() if type(m).__name__ == "Block")]
    handles = [m.register_forward_hook(count_backward) for m in watched]
    try:
        first, second = (
            call(fn, model_for(name, small_cnn), images, t, seed=0),
            call(fn, model_for(name, small_cnn), images, t, seed=1),
        )
    finally:
        for handle in handles:
            handle.remove()
    assert traits.forward_only == (not backwards), name
    if not traits.stochastic:
        torch.testing.assert_close(first, second, rtol=0, atol=0)
    else:
        assert not torch.equal(first, second), name


@pytest.mark.parametrize("name", sorted(set(method_configs()) - BATCH_DEPENDENT))
def test_batch_equals_each_image_alone(name, small_cnn, images):
    fn = configured(name)
    t = torch.tensor([4, 0, 3, 1, 2])
    batch = call(fn, model_for(name, small_cnn), images, t)
    if name == "random":  # one draw per batch: the first image alone gets the first draw
        torch.testing.assert_close(call(fn, model_for(name, small_cnn), images[:1], t[:1]), batch[:1])
        return
    for i in range(5):
        alone = call(fn, model_for(name, small_cnn), images[i : i + 1], t[i : i + 1])
        torch.testing.assert_close(alone, batch[i : i + 1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(n for n in method_configs() if n not in CHUNK_DEPENDENT | {"random"}))
def test_chunk_size_does_not_change_the_map(name, small_cnn, images):
    t = torch.tensor([1, 1, 0, 2, 4])
    ref = call(configured(name, chunk_size=1), model_for(name, small_cnn), images, t)
    for chunk in (3, 16):
        other = call(configured(name, chunk_size=chunk), model_for(name, small_cnn), images, t)
        # fp32: the same map to 1e-5 of its scale: its largest value, or for occlusion (differences
        # of probabilities, which carry the probabilities' rounding) the probability range, 1.
        scale = 1.0 if name == "occlusion" else float(ref.abs().max())
        torch.testing.assert_close(other, ref, rtol=1e-5, atol=1e-5 * scale)


def test_saliency_of_linear_model_is_abs_weight():
    model = Linear((3, 8, 8))
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(methods.saliency(model, x, t), model.weight[t].abs().detach())
    torch.testing.assert_close(methods.input_x_gradient(model, x, t), (model.weight[t] * x).detach())


@pytest.mark.parametrize("fn", [methods.integrated_gradients, methods.deeplift])
def test_completeness_on_linear_model(fn):
    # Integrated gradients and DeepLIFT from a zero baseline sum to f(x) - f(0) (IG paper, prop. 1).
    model = Linear((3, 8, 8))
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    a = fn(model, x, t)
    gap = (model(x) - model(torch.zeros_like(x))).gather(1, t[:, None])[:, 0].detach()
    torch.testing.assert_close(a.sum(dim=(1, 2, 3)), gap, rtol=1e-4, atol=1e-4)


def test_integrated_gradients_completeness_on_cnn(small_cnn, images):
    t = torch.tensor([0, 1, 2, 3, 4])
    a = methods.integrated_gradients(small_cnn.module, images, t, n_steps=200)
    m = small_cnn.module
    gap = (m(images) - m(torch.zeros_like(images))).gather(1, t[:, None])[:, 0].detach()
    torch.testing.assert_close(a.sum(dim=(1, 2, 3)), gap, rtol=2e-2, atol=2e-3)


def naive_occlusion(model, x, target, window, stride):
    """Per image, per window: the drop in softmax probability, averaged over covering windows."""
    _, _, h, w = x.shape
    out = torch.zeros(len(x), 1, h, w)
    with torch.no_grad():
        for b in range(len(x)):
            clean = model(x[b : b + 1]).softmax(1)[0, target[b]]
            total, count = torch.zeros(h, w), torch.zeros(h, w)
            for r in range(0, h - window + 1, stride):
                for c in range(0, w - window + 1, stride):
                    occluded = x[b : b + 1].clone()
                    occluded[:, :, r : r + window, c : c + window] = 0
                    drop = clean - model(occluded).softmax(1)[0, target[b]]
                    total[r : r + window, c : c + window] += drop
                    count[r : r + window, c : c + window] += 1
            out[b, 0] = total / count
    return out


def test_occlusion_equals_naive_loop_for_every_chunk_size(small_cnn, images):
    t = torch.tensor([0, 1, 2, 3, 4])
    ref = naive_occlusion(small_cnn.module, images, t, window=8, stride=4)
    for chunk in (1, 2, 5, 7, 49, 256):
        a = methods.occlusion(small_cnn.module, images, t, window=8, stride=4, chunk_size=chunk)
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-6)


def test_occlusion_peaks_on_the_planted_patch_not_transposed():
    rows, cols = slice(0, 8), slice(16, 24)  # top row band, right of centre: transposing moves it
    model = PatchDetector(rows, cols)
    x = torch.rand(2, 3, 32, 32) + 1.0
    a = methods.occlusion(model, x, torch.ones(2, dtype=torch.long), window=8, stride=8)
    for b in range(2):
        peak = divmod(int(a[b, 0].argmax()), 32)
        assert 0 <= peak[0] < 8 and 16 <= peak[1] < 24
        assert a[b, 0, rows, cols].min() > 0 and a[b, 0, cols, rows].abs().max() == 0


def test_occlusion_refuses_windows_that_leave_strips():
    with pytest.raises(ValueError, match="window=8, stride=5"):
        methods.occlusion(
            Linear((3, 32, 32)), torch.randn(1, 3, 32, 32), torch.tensor([0]), window=8, stride=5
        )


def test_rise_equals_naive_loop(small_cnn, images):
    t = torch.tensor([0, 1, 2, 3, 4])
    torch.manual_seed(0)
    fast = methods.rise(small_cnn.module, images, t, n_masks=20, cells=4, p_keep=0.5, chunk_size=7)
    torch.manual_seed(0)  # the same draws, in the same order, as rise() makes them
    grids = (torch.rand(20, 4, 4) < 0.5).float()
    shifts = torch.stack([torch.randint(0, 8, (20,)), torch.randint(0, 8, (20,))], dim=1)
    masks = rise_masks(grids, shifts, (32, 32), 4)
    ref = torch.zeros(5, 1, 32, 32)
    with torch.no_grad():
        for b in range(5):
            for n in range(20):
                p = small_cnn.module(images[b : b + 1] * masks[n]).softmax(1)[0, t[b]]
                ref[b] += p * masks[n]
    torch.testing.assert_close(fast, ref / (20 * 0.5), rtol=1e-4, atol=1e-6)


def test_rise_masks_are_smooth_crops_of_the_grid():
    grid = torch.zeros(1, 2, 2)
    grid[0, 0, 0] = 1.0  # only the top-left cell kept
    # The 2x2 grid is upsampled to 3 cells of 4 pixels (12x12): pixel o's centre sits at grid
    # coordinate c = (o + 0.5) / 6 - 0.5. Mode 'reflect' (skimage, as the authors) mirrors the
    # grid without repeating its edge cell, so the top-left cell's weight along an axis is 1 - |c|
    # for c <= 1 and c - 1 beyond (coordinate c reads cell 2 - c past the last cell).
    c = (torch.arange(12) + 0.5) / 6 - 0.5
    p = torch.where(c <= 1, 1 - c.abs(), c - 1)
    m = rise_masks(grid, torch.tensor([[0, 0]]), (8, 8), 2)[0, 0]
    assert m.shape == (8, 8)
    assert abs(float(m[0, 0]) - (7 / 12) ** 2) < 1e-6 and abs(float(m[-1, -1]) - 0.0625) < 1e-6
    torch.testing.assert_close(m, torch.outer(p[:8], p[:8]))
    shifted = rise_masks(grid, torch.tensor([[2, 3]]), (8, 8), 2)[0, 0]
    torch.testing.assert_close(shifted, torch.outer(p[2:10], p[3:11]))


def test_grad_cam_equals_hand_computation(small_cnn, images):
    model = small_cnn.module
    layer = model.get_submodule("features.4")
    t = torch.tensor([0, 1, 2, 3, 4])
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.update(act=o))
    try:
        x = images.clone().requires_grad_()
        score = model(x).gather(1, t[:, None]).sum()
    finally:
        handle.remove()
    grads = torch.autograd.grad(score, store["act"])[0]
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * store["act"]).sum(1, keepdim=True))
    ref = torch.nn.functional.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)
    a = methods.grad_cam(model, images, t, layer="features.4")
    torch.testing.assert_close(a, ref.detach(), rtol=1e-4, atol=1e-6)
    assert not layer._forward_hooks  # hooks released


def test_grad_cam_names_a_missing_layer(small_cnn, images):
    with pytest.raises(ValueError, match="layer='layer4'"):
        methods.grad_cam(small_cnn.module, images, torch.zeros(5, dtype=torch.long), layer="layer4")


def test_guided_backprop_passes_only_positive_gradients_through_relu():
    # One hidden ReLU unit: guided backprop zeroes the negative gradient that saliency keeps.
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(4, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)
    )
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        model[1].bias.zero_()
        model[3].weight.copy_(torch.tensor([[-1.0, 2.0]]))
    x = torch.ones(1, 1, 2, 2)
    gb = methods.guided_backprop(model, x, torch.tensor([0]))
    assert gb.flatten().tolist() == [0.0, 2.0, 0.0, 0.0]


def test_every_method_is_exported_under_its_config_name():
    for name in method_configs():
        assert callable(getattr(methods, name)), name
