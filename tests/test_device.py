"""Speed options and the memory budget: the same answers whatever the chunk, precision or compile
mode; chunk sizes that fit the budget; out-of-memory halving, simulated on CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import methods
import metrics
from harness.config import HarnessError
from harness.job import run_job
from harness.results import read_maps
from harness.runtime import (
    MemoryModel,
    SpeedOptions,
    fitting_sizes,
    fold_batchnorm,
    fold_padding,
    halving_on_oom,
    image_memory,
    is_out_of_memory,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
CPU = torch.device("cpu")


def job_config(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(
            "config",
            [
                "model=small_cnn",
                "device=cpu",
                "data.num_images=3",
                "method=saliency",
                "metric=[deletion]",
                *overrides,
            ],
        )


def close_maps(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> None:
    """fp32 agreement: to 1e-5 relative, and 1e-5 of the map's scale (default: its largest value)."""
    scale = float(b.abs().max()) if scale is None else scale
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)


# Out of memory ---------------------------------------------------------------------------------------


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def test_halving_on_oom_halves_until_it_fits():
    tried = []

    def call(chunk: int) -> str:
        tried.append(chunk)
        if chunk > 3:
            raise oom()
        return f"ran at {chunk}"

    assert halving_on_oom(call, 16, CPU, "test") == ("ran at 2", 2, 3)
    assert tried == [16, 8, 4, 2]
    assert halving_on_oom(call, 3, CPU, "test") == ("ran at 3", 3, 0)


def test_halving_on_oom_gives_up_at_one_image_and_passes_other_errors():
    def never(chunk: int) -> None:
        raise oom()

    with pytest.raises(HarnessError, match="method x ran out of cpu memory with one image per chunk"):
        halving_on_oom(never, 4, CPU, "method x")

    def broken(chunk: int) -> None:
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        halving_on_oom(broken, 4, CPU, "test")


def test_out_of_memory_is_recognised_on_both_devices():
    assert is_out_of_memory(oom())
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_job_halves_its_chunks_on_out_of_memory_and_records_it(tmp_path, monkeypatch):
    """A method and a metric that fail above 2 images per chunk run at 2 after two halvings (8, 4,
    2), and give the same maps and AUCs as a run that asked for 2 in the first place.
    """
    plain = run_job(job_config("device.batch_size=2", "device.grad_batch_size=2"), tmp_path / "plain")
    real_saliency, real_deletion = methods.saliency, metrics.deletion
    calls = {"saliency": [], "deletion": []}

    def saliency(model, x, t, *, chunk_size):
        calls["saliency"].append(chunk_size)
        if chunk_size > 2:
            raise oom()
        return real_saliency(model, x, t, chunk_size=chunk_size)

    def deletion(model, x, a, t, *, chunk_size, **kw):
        calls["deletion"].append(chunk_size)
        if chunk_size > 2:
            raise oom()
        return real_deletion(model, x, a, t, chunk_size=chunk_size, **kw)

    saliency.traits, deletion.traits = real_saliency.traits, real_deletion.traits
    monkeypatch.setattr(methods, "saliency", saliency)
    monkeypatch.setattr(metrics, "deletion", deletion)
    row = run_job(job_config("device.batch_size=8", "device.grad_batch_size=8"), tmp_path / "oom")
    assert calls["saliency"][:3] == [8, 4, 2] and set(calls["saliency"][3:]) == {2}
    assert calls["deletion"][:3] == [8, 4, 2] and set(calls["deletion"][3:]) == {2}
    assert (row["method_chunk_size"], row["method_oom_retries"]) == (2, 2)
    assert (row["deletion_chunk_size"], row["deletion_oom_retries"]) == (2, 2)
    assert row["grad_batch_size"] == 8  # asked for; the chunk that ran is the one above
    assert row["deletion_auc"] == pytest.approx(plain["deletion_auc"], abs=1e-6)
    a, b = (torch.from_numpy(read_maps(tmp_path / d)["maps"]) for d in ("oom", "plain"))
    close_maps(a, b)
    scores = [pd.read_csv(tmp_path / d / "scores.csv")["deletion_auc"] for d in ("oom", "plain")]
    assert (scores[0] - scores[1]).abs().max() <= 1e-6


# Memory budget ---------------------------------------------------------------------------------------


def test_memory_estimate_counts_live_and_saved_tensors():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 2),
    )
    x = torch.randn(2, 3, 8, 8)
    image, act = 3 * 64 * 4, 4 * 64 * 4  # bytes of one image and of one conv or ReLU output
    plain = image_memory(model, x, CPU, False, torch.contiguous_format)
    # The image and the largest layer's input and output (ReLU or Flatten: act + act).
    assert (plain.per_image, plain.how) == (image + 2 * act, "activations")
    grad = image_memory(model, x, CPU, True, torch.contiguous_format)
    # Saved for backward: the ReLU's output (the conv's saved input is the image, the Linear's the
    # same storage, the weights are parameters); the backward's gradients: twice the largest pair.
    assert grad.per_image == image + act + 2 * (2 * act)


def test_fitting_sizes_keep_what_fits_and_name_the_budget_when_nothing_does():
    memory = MemoryModel(fixed=100.0, per_image=10.0, how="allocator")
    assert fitting_sizes([1, 2, 4, 8, 16], memory, budget=185.0, what="forward") == [1, 2, 4, 8]
    with pytest.raises(HarnessError, match=r"no chunk size of \[4, 8\] fits the memory budget for forward"):
        fitting_sizes([8, 4], memory, budget=120.0, what="forward")


def test_budget_sets_the_chunk_sizes(tmp_path, monkeypatch):
    """With room for 2.5 images of forward+backward, the gradient chunk is at most 2."""
    import harness.job.builder

    x = torch.zeros(1, 3, 32, 32)
    from harness.models import small_cnn

    per_image = image_memory(
        small_cnn(num_classes=10, width=16).module, x, CPU, True, torch.channels_last
    ).per_image
    monkeypatch.setattr(harness.job.builder, "available_memory", lambda device: int(2.5 * per_image / 0.5))
    row = run_job(job_config("device.memory_budget=0.5"), tmp_path / "job")
    assert row["grad_batch_size"] in (1, 2) and row["method_chunk_size"] == row["grad_batch_size"]
    assert row["batch_size"] >= row["grad_batch_size"] and row["deletion_chunk_size"] == row["batch_size"]
    assert row["memory_budget_mb"] == pytest.approx(2.5 * per_image / 2**20)
    with pytest.raises(HarnessError, match="device.memory_budget=1.5; expected a fraction"):
        run_job(job_config("device.memory_budget=1.5"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_forward_only_jobs_time_and_size_no_backward_passes(tmp_path):
    """Occlusion, and re-scoring saved maps, run plain forwards only: no forward+backward loops
    are timed and no forward+backward memory is estimated; the bounds stay forward bounds.
    """
    saliency = run_job(job_config(), tmp_path / "saliency")
    occlusion = run_job(
        job_config("method=occlusion", "method.window=16", "method.stride=16"), tmp_path / "occ"
    )
    rescored = run_job(job_config("phase=evaluate", f"maps_from={tmp_path}"), tmp_path / "evaluate")
    for row in (occlusion, rescored):
        assert row["grad_batch_size"] is None and row["forward_backward_ms_by_batch"] == {}
        assert row["forward_backward_ms_per_image"] is None and row["forward_backward_mb_per_image"] is None
        assert row["batch_size"] >= 1 and row["deletion_bound_ratio"] > 0
    assert occlusion["method_bound_ratio"] > 0 and occlusion["method_backwards_per_image"] == 0
    assert saliency["grad_batch_size"] >= 1 and saliency["forward_backward_ms_per_image"] > 0
    assert rescored["deletion_auc"] == pytest.approx(saliency["deletion_auc"], abs=1e-6)


# Same answers ----------------------------------------------------------------------------------------


def bn_net(seed: int = 0) -> torch.nn.Module:
    """Conv-BN-ReLU twice and a head, in eval mode, with BatchNorm statistics far from the identity."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def test_fold_batchnorm_gives_the_same_maps_and_aucs(images):
    net, t = bn_net(), torch.tensor([0, 1, 2, 3, 4])
    plain = maps_and_aucs(net, images, t)
    assert fold_batchnorm(net, images[:2]) == 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    compare(maps_and_aucs(net, images, t), plain)


def test_fold_batchnorm_undoes_a_fold_that_changes_the_model(images):
    class BNFirst(torch.nn.Module):
        """Registers conv then BN but calls BN first: folding by registration order would be wrong."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(x)).mean((2, 3))

    net = BNFirst().eval()
    net.bn.running_mean.fill_(2.0)
    with torch.no_grad():
        before = net(images)
    assert fold_batchnorm(net, images[:2]) == 0
    assert isinstance(net.bn, torch.nn.BatchNorm2d)
    torch.testing.assert_close(net(images).detach(), before)


def test_fold_batchnorm_keeps_the_output_of_a_layer_that_is_read(images):
    """A folded convolution outputs what its BatchNorm did; one named in `keep` (a CAM layer, a layer
    inspected) keeps its own output, and the others are folded as before.
    """
    net, t = bn_net(), torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        own = net[3][0](net[:3](images))
    cam = methods.grad_cam(net, images, t, layer="3.0")
    folded_all = fold_batchnorm(copy.deepcopy(net), images[:2])
    assert fold_batchnorm(net, images[:2], keep={"3.0"}) == 1 and folded_all == 2
    assert isinstance(net[1], torch.nn.Identity) and isinstance(net[3][1], torch.nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(net[3][0](net[:3](images)), own)
    close_maps(methods.grad_cam(net, images, t, layer="3.0"), cam)


class SamePadConv(torch.nn.Conv2d):
    """TensorFlow-style "same" padding as a `static_padding` child, as EfficientNet-Lite's convolutions."""

    def __init__(self, cin: int, cout: int, k: int, pad: tuple[int, int, int, int], **kw) -> None:
        super().__init__(cin, cout, k, **kw)
        self.static_padding = torch.nn.ZeroPad2d(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PadsItselfConv(SamePadConv):
    """Pads through its child but ignores `self.padding`: folding must be undone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride)


def test_fold_padding_gives_the_same_function_and_leaves_asymmetric_paddings(images):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        SamePadConv(3, 4, 3, (1, 1, 1, 1)),
        torch.nn.ReLU(),
        SamePadConv(4, 4, 3, (0, 1, 0, 1), stride=2),
        torch.nn.ReLU(),
        SamePadConv(4, 4, 5, (2, 2, 2, 2), groups=4),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 5),
    ).eval()
    x = images.clone().requires_grad_(True)
    net(x)[:, 1].sum().backward()
    with torch.no_grad():
        logits = net(images)
    assert fold_padding(net, images[:2]) == 2
    pads = [type(m.static_padding).__name__ for m in net if isinstance(m, SamePadConv)]
    assert pads == ["Identity", "ZeroPad2d", "Identity"] and net[0].padding == (1, 1)
    y = images.clone().requires_grad_(True)
    net(y)[:, 1].sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(net(images), logits)
    torch.testing.assert_close(y.grad, x.grad)

    other = torch.nn.Sequential(PadsItselfConv(3, 4, 3, (1, 1, 1, 1)), torch.nn.Flatten()).eval()
    assert fold_padding(other, images[:2]) == 0
    assert isinstance(other[0].static_padding, torch.nn.ZeroPad2d) and other[0].padding == (0, 0)


def test_fold_padding_on_efficientnet_lite0_folds_its_symmetric_paddings():
    from harness.models import efficientnet_lite0

    model = efficientnet_lite0().module.eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
    assert fold_padding(model, x) == 12  # of 17 padded convolutions; 5 strided ones pad asymmetrically
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_options_are_checked_and_recorded():
    with pytest.raises(
        HarnessError, match=r"device.precision='fp8'; expected one of \('fp32', 'bf16', 'fp16'\)"
    ):
        SpeedOptions(precision="fp8")
    with pytest.raises(HarnessError, match="device.compile='fastest'; expected null or one of"):
        SpeedOptions(compile="fastest")
    row = SpeedOptions(precision="bf16", channels_last=True, compile="default").row()
    assert row == {
        "precision": "bf16",
        "channels_last": True,
        "cudnn_benchmark": False,
        "tf32": False,
        "compile": "default",
        "fold_batchnorm": False,
        "fold_padding": False,
    }


CHEAP = {
    "saliency": lambda m, x, t: methods.saliency(m, x, t, chunk_size=4),
    "integrated_gradients": lambda m, x, t: methods.integrated_gradients(m, x, t, n_steps=8, chunk_size=8),
    "occlusion": lambda m, x, t: methods.occlusion(m, x, t, window=8, stride=4, chunk_size=16),
    "rise": lambda m, x, t: (torch.manual_seed(0), methods.rise(m, x, t, n_masks=16, chunk_size=8))[1],
}


def maps_and_aucs(model, x, t):
    out = {}
    for name, fn in CHEAP.items():
        a = fn(model, x, t)
        out[name] = (a, metrics.deletion(model, x, a, t, steps=7, chunk_size=8).values["auc"])
    return out


def compare(fast, plain):
    for name, (a, auc) in fast.items():
        ref, ref_auc = plain[name]
        close_maps(a, ref, scale=1.0 if name == "occlusion" else None)
        torch.testing.assert_close(auc, ref_auc, rtol=0, atol=1e-6)


def test_channels_last_gives_the_same_maps_and_aucs(small_cnn, images):
    model, t = small_cnn.module, torch.tensor([0, 1, 2, 3, 4])
    plain = maps_and_aucs(model, images, t)
    model.to(memory_format=torch.channels_last)
    compare(maps_and_aucs(model, images.contiguous(memory_format=torch.channels_last), t), plain)


def test_compiled_model_gives_the_same_maps_and_aucs(small_cnn, images):
    model, t = small_cnn.module, torch.tensor([0, 1, 2, 3, 4])
    plain = maps_and_aucs(model, images, t)
    compiled = SpeedOptions(compile="default").compiled(model)
    assert compiled is not model
    compare(maps_and_aucs(compiled, images, t), plain)


def test_half_precision_curves_on_the_pretrained_model():
    """The same fp32 saliency maps of EfficientNet-Lite0 on two photos, scored under autocast: fp16
    moves the mean deletion and insertion AUCs by at most 0.005 (the report's "safe"); bf16, with
    three fewer mantissa bits, moves them more (0.0005 and 0.005 on the eight photos) but stays
    within 0.02.
    """
    from harness.data import photos
    from harness.models import efficientnet_lite0

    clf = efficientnet_lite0()
    data = photos(num_images=2, size=clf.input_size, mean=clf.mean, std=clf.std)
    model, x = clf.module, data.images
    with torch.no_grad():
        t = model(x).argmax(1)
    a = methods.saliency(model, x, t, chunk_size=2)

    def aucs(precision: str) -> list[float]:
        with SpeedOptions(precision=precision).autocast(CPU):
            return [
                float(m(model, x, a, t, chunk_size=8).values["auc"].mean())
                for m in (metrics.deletion, metrics.insertion)
            ]

    full = aucs("fp32")
    for precision, margin in (("fp16", 0.005), ("bf16", 0.02)):
        moved = [abs(h - f) for h, f in zip(aucs(precision), full, strict=True)]
        assert max(moved) <= margin, (precision, moved)
        assert max(moved) > 0  # autocast did act
