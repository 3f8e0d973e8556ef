"""Quantization primitives shared by the integer reference, the fake-quant pipeline and the compiler.

All scales are symmetric: ``s = absmax / qmax`` (a zero absmax gives ``s = 1``), ``q = clamp(round(x *
(1 / s)), -qmax, qmax)`` with round-half-to-even.  In float32 these are single IEEE operations, so any
backend that performs the same operations (TIR ``nearbyint``, divide, multiply, max) reproduces them bit
for bit.  The reciprocal is rounded once per scale and then multiplied: a kernel divides once per scale
instead of once per element (a vector divide costs ~10x a multiply; it was a quarter of the x86 input
and output kernels), and every implementation (this module, the TIR kernels, NumPy) rounds the same way.
"""

from __future__ import annotations

import math

import torch

from ..config import QuantSpec


def int_dtype(bits: int) -> torch.dtype:
    """Smallest signed integer dtype holding ``bits``-bit symmetric values."""
    return torch.int8 if bits <= 8 else torch.int16


def n_groups(channels: int, group: int) -> int:
    """Number of channel groups of size ``group`` (the last one may be partial)."""
    return -(-channels // group)


def group_absmax(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Absolute maxima of ``t`` (``[P, R, C]``) per the granularity of ``spec``: ``[P|1, R|1, G]``."""
    p, r, c = t.shape
    g = spec.granularity.group_size(c)
    ng = n_groups(c, g)
    a = t.abs()
    if ng * g != c:
        a = torch.nn.functional.pad(a, (0, ng * g - c))
    a = a.reshape(p, r, ng, g).amax(dim=-1)
    if not spec.per_position:
        a = a.amax(dim=0, keepdim=True)
    if not spec.per_row:
        a = a.amax(dim=1, keepdim=True)
    return a


def scale_from_absmax(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """``absmax / qmax`` in the dtype of ``absmax``, with 1 where the absmax is 0."""
    s = absmax / qmax
    return torch.where(s == 0, torch.ones_like(s), s)


def expand_groups(s: torch.Tensor, channels: int, group: int) -> torch.Tensor:
    """Repeat group scales ``[..., G]`` (groups of ``group`` channels) over ``[..., channels]``."""
    if n_groups(channels, group) != s.shape[-1]:
        raise ValueError(f"{s.shape[-1]} scales do not cover {channels} channels in groups of {group}")
    return s.repeat_interleave(group, dim=-1)[..., :channels]


def round_nearest(x: torch.Tensor, rounding: str = "half-even") -> torch.Tensor:
    """Round to nearest; ties to even (``half-even``) or away from zero (``half-away``)."""
    r = torch.round(x)
    if rounding == "half-away":
        tie = (x - torch.trunc(x)).abs() == 0.5
        r = torch.where(tie, torch.trunc(x) + torch.sign(x), r)
    return r


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale``, one IEEE division per element (what every quantizer multiplies by)."""
    return torch.ones_like(scale) / scale


def quantize(t: torch.Tensor, scale: torch.Tensor, qmax: int, rounding: str = "half-even") -> torch.Tensor:
    """``clamp(round(t * (1 / scale)), -qmax, qmax)`` (values stay in ``t``'s float dtype)."""
    return torch.clamp(round_nearest(t * reciprocal(scale), rounding), -qmax, qmax)


def quantize_grouped(t: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[P, R, C]`` per ``spec``; returns ``(q, group scales [P|1, R|1, G])``."""
    c = t.shape[-1]
    s = scale_from_absmax(group_absmax(t, spec), spec.qmax)
    return quantize(t, expand_groups(s, c, spec.granularity.group_size(c)), spec.qmax, spec.rounding), s


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g


def fake_quant_grouped(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Differentiable fake quantization of ``[P, R, C]`` (straight-through rounding)."""
    c = t.shape[-1]
    s = expand_groups(scale_from_absmax(group_absmax(t, spec), spec.qmax), c, spec.granularity.group_size(c))
    return torch.clamp(_RoundSTE.apply(t * reciprocal(s)), -spec.qmax, spec.qmax) * s


def fake_quant_tensor(t: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-tensor fake quantization (straight-through)."""
    s = scale_from_absmax(t.abs().amax(), qmax)
    return torch.clamp(_RoundSTE.apply(t * reciprocal(s)), -qmax, qmax) * s


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Exactly rounded float32 fused multiply-add ``round32(a * b + c)``.

    The float64 product of two float32 values is exact; the float64 sum is made round-to-odd with an
    error-free TwoSum, after which rounding to float32 is correct (Boldo & Melquiond, 2008).
    """
    p = a.to(torch.float64) * b.to(torch.float64)
    c64 = c.to(torch.float64)
    s = p + c64
    bv = s - p
    err = (p - (s - bv)) + (c64 - bv)
    even = (s.view(torch.int64) & 1) == 0
    fix = (err != 0) & even
    toward = torch.where(err > 0, torch.full_like(s, math.inf), torch.full_like(s, -math.inf))
    s = torch.where(fix, torch.nextafter(s, toward), s)
    return s.to(torch.float32)
