"""Data: each loader returns `Images`, already resized and normalised for the model.

`photos` (the sample photos that installed packages ship, `images`), `image_folder` (an ImageNet
validation layout, `folder`, with bounding boxes from `boxes`), and `shapes` (generated images whose
evidence is known, `generated`). `load_data` builds a data config for a model; `held_out` gives images
held out of a config's explained ones (`references`).
"""

from harness.data.boxes import ground_truth, read_boxes
from harness.data.folder import class_index, image_folder
from harness.data.generated import CLASSES, generate, shapes
from harness.data.images import Images, load_data, photo_sources, photos, rgb, to_model_input
from harness.data.references import held_out, reference_photo_sources

__all__ = [
    "CLASSES",
    "Images",
    "class_index",
    "generate",
    "ground_truth",
    "held_out",
    "image_folder",
    "load_data",
    "photo_sources",
    "photos",
    "read_boxes",
    "reference_photo_sources",
    "rgb",
    "shapes",
    "to_model_input",
]
