"""Quantization: primitives, the offline layer plan, the integer reference and the fake-quant path."""

from .baselines import DirectTrace, direct_conv2d_int8, quantize_weight_per_channel
from .fakequant import winograd_conv2d_fakequant
from .plan import LayerScales, WinogradLayerPlan, plan_layer, transforms_for
from .reference import IntTrace, winograd_conv2d_int

__all__ = [
    "DirectTrace",
    "IntTrace",
    "LayerScales",
    "WinogradLayerPlan",
    "direct_conv2d_int8",
    "plan_layer",
    "quantize_weight_per_channel",
    "transforms_for",
    "winograd_conv2d_fakequant",
    "winograd_conv2d_int",
]
