"""Baselines computed with the same primitives: int8 direct convolution and FP references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import QuantSpec
from .ops import expand_groups, group_absmax, quantize, scale_from_absmax
from .reference import quantize_input


def quantize_weight_per_channel(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[K, C, kh, kw]`` weights per output channel (or per tensor): ``(w_q, s_w [K])``."""
    k = weight.shape[0]
    flat = weight.detach().to(torch.float64).reshape(1, 1, k, -1).permute(0, 1, 3, 2).reshape(1, -1, k)
    s = scale_from_absmax(group_absmax(flat, spec), spec.qmax)  # 1, 1, G
    s_k = expand_groups(s, k, spec.granularity.group_size(k)).reshape(k)
    return quantize(
        weight.detach().to(torch.float64), s_k[:, None, None, None], spec.qmax, spec.rounding
    ), s_k.to(torch.float32)


def direct_conv2d_int8(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: tuple[int, int],
    spec_w: QuantSpec,
    act_qmax: int = 127,
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """int8 direct convolution: per-tensor activations, per-channel weights, exact int32 accumulation."""
    x_q, s_x = quantize_input(x, act_qmax)
    w_q, s_w = quantize_weight_per_channel(weight, spec_w)
    acc = F.conv2d(
        x_q.to(torch.float64), w_q, None, stride=stride, padding=padding, dilation=dilation, groups=groups
    )  # exact integers in float64
    y = acc.to(torch.float32) * (s_w * s_x)[None, :, None, None]
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :, None, None]
    return y
