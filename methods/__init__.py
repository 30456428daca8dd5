"""Attribution methods: `(model, inputs, target, *, params) -> [B, 1 or C, H, W]` on the inputs' device."""

from methods.attn_lrp import attn_lrp
from methods.baselines import oracle, random
from methods.cam import grad_cam, grad_cam_plus_plus, guided_grad_cam, hires_cam, layer_cam, xgrad_cam
from methods.cam_forward import ablation_cam, eigen_cam, score_cam
from methods.common import MethodTraits, method, traits_of
from methods.deeplift import deeplift, deeplift_shap
from methods.expected_gradients import expected_gradients
from methods.full_grad import full_grad
from methods.gradient import (
    gradient_shap,
    guided_backprop,
    input_x_gradient,
    integrated_gradients,
    saliency,
)
from methods.lrp import lrp
from methods.noise_tunnel import smoothgrad, smoothgrad_sq, vargrad
from methods.patches import patch_lime, patch_occlusion, patch_rise
from methods.path_ig import blur_ig, guided_ig
from methods.perturbation import occlusion, rise
from methods.surrogate import kernel_shap, lime
from methods.transformer import attention_rollout, generic_attention, legrad

__all__ = [
    "MethodTraits",
    "ablation_cam",
    "attention_rollout",
    "attn_lrp",
    "blur_ig",
    "deeplift",
    "deeplift_shap",
    "eigen_cam",
    "expected_gradients",
    "full_grad",
    "generic_attention",
    "grad_cam",
    "grad_cam_plus_plus",
    "gradient_shap",
    "guided_backprop",
    "guided_grad_cam",
    "guided_ig",
    "hires_cam",
    "input_x_gradient",
    "kernel_shap",
    "integrated_gradients",
    "layer_cam",
    "legrad",
    "lime",
    "lrp",
    "method",
    "occlusion",
    "oracle",
    "patch_lime",
    "patch_occlusion",
    "patch_rise",
    "random",
    "rise",
    "saliency",
    "score_cam",
    "smoothgrad",
    "smoothgrad_sq",
    "traits_of",
    "vargrad",
    "xgrad_cam",
]
