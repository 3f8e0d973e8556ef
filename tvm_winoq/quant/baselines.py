"""Baselines computed with the same primitives: int8 direct convolution and FP references."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import QuantSpec
from .ops import expand_groups, group_absmax, int_dtype, quantize, scale_from_absmax
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


@dataclass
class DirectTrace:
    """Intermediate tensors of one int8 direct convolution (what the TIR ``direct`` kernel reproduces).

    ``x_q`` [N,C,H,W] int8, ``s_x`` float32 scalar, ``w_q`` [K,C/groups,kh,kw] int8, ``s_w`` [K]
    float32, ``acc`` [N,K,OH,OW] int32 (exact), ``y`` [N,K,OH,OW] float32.
    """

    x_q: torch.Tensor
    s_x: torch.Tensor
    w_q: torch.Tensor
    s_w: torch.Tensor
    acc: torch.Tensor
    y: torch.Tensor


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
    return_trace: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, DirectTrace]:
    """int8 direct convolution: per-tensor activations, per-channel weights, exact int32 accumulation.

    ``y = float32(acc) * (s_w * s_x) + bias``; with ``return_trace`` also the :class:`DirectTrace`.
    """
    x_q, s_x = quantize_input(x, act_qmax)
    w_q, s_w = quantize_weight_per_channel(weight, spec_w)
    acc = F.conv2d(
        x_q.to(torch.float64), w_q, None, stride=stride, padding=padding, dilation=dilation, groups=groups
    )  # exact integers in float64
    y = acc.to(torch.float32) * (s_w * s_x)[None, :, None, None]
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :, None, None]
    if not return_trace:
        return y
    fits = acc.abs().max().item() < 2**31 if acc.numel() else True
    trace = DirectTrace(x_q=x_q.to(torch.int8 if act_qmax <= 127 else torch.int16), s_x=s_x,
                        w_q=w_q.to(int_dtype(spec_w.bits)), s_w=s_w,
                        acc=acc.to(torch.int32 if fits else torch.int64), y=y)
    return y, trace
