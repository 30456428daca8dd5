"""Attribution methods: `(model, inputs, target, *, params) -> [B, 1 or C, H, W]` on the inputs' device."""

from methods.baselines import random
from methods.cam import grad_cam, guided_grad_cam
from methods.gradient import (
    deeplift,
    gradient_shap,
    guided_backprop,
    input_x_gradient,
    integrated_gradients,
    saliency,
    smoothgrad,
)
from methods.perturbation import occlusion, rise

# Methods that hook or rewrite modules inside the model (Captum's module hooks): they get the eager
# model even when the device config compiles it, and the row says so (`method_compiled: false`).
EAGER_ONLY = frozenset({"deeplift", "grad_cam", "guided_backprop", "guided_grad_cam"})
# Methods that only run plain forwards (no autograd): their configs take `${device.batch_size}`,
# and their jobs neither time nor size forward+backward passes.
FORWARD_ONLY = frozenset({"occlusion", "rise", "random"})

__all__ = [
    "EAGER_ONLY",
    "FORWARD_ONLY",
    "deeplift",
    "grad_cam",
    "gradient_shap",
    "guided_backprop",
    "guided_grad_cam",
    "input_x_gradient",
    "integrated_gradients",
    "occlusion",
    "random",
    "rise",
    "saliency",
    "smoothgrad",
]
