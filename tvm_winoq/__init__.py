"""tvm-winoq: data-free group-wise fully quantized int8 Winograd convolution for TVM.

Implements Pan et al., "Data-Free Group-Wise Fully Quantized Winograd Convolution via Learnable
Scales" (CVPR 2025): exact Cook-Toom transforms with learnable diagonal scales, an integer PyTorch
reference, data-free scale finetuning, and (in :mod:`tvm_winoq.relax`) a TVM compiler flow.
"""

from .config import (
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    WinoQConfig,
    default_config,
    groupwise,
    per_tensor,
)
from .convert import eligible_convs, fold_batchnorm, quantize_model
from .metrics import sqnr_db

__version__ = "0.1.0"

__all__ = [
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QuantSpec",
    "WinoQConfig",
    "default_config",
    "eligible_convs",
    "fold_batchnorm",
    "groupwise",
    "per_tensor",
    "quantize_model",
    "sqnr_db",
]
