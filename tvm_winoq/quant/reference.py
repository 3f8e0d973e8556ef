"""PyTorch integer reference of the fully quantized Winograd convolution (the oracle).

Executes a :class:`~tvm_winoq.quant.plan.WinogradLayerPlan` exactly as ``docs/integer_contract.md``
specifies; every integer tensor it returns in :class:`IntTrace` must be reproduced bit for bit by the
TIR kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..winograd.tiling import TileGeometry, assemble_tiles, extract_tiles, geometry
from .ops import (
    expand_groups,
    fma_f32,
    group_absmax,
    int_dtype,
    quantize,
    quantize_grouped,
    scale_from_absmax,
)
from .plan import WinogradLayerPlan


@dataclass
class IntTrace:
    """Intermediate tensors of one integer Winograd convolution.

    ``x_q`` [N,C,H,W] int8, ``s_x`` float32 scalar; ``v_q`` [P,T,C] int8, ``s_v`` [P|1,T|1,Gv] float32;
    ``acc`` [P,T,K,Gg] int32; ``m_f`` [P,T,K] float32 (dequantized GEMM, pre-quantization);
    ``m_q`` [P,T,K] int8, ``s_m`` [P|1,T|1,Gm] float32; ``y`` [N,K,OH,OW] float32.
    """

    geo: TileGeometry
    x_q: torch.Tensor
    s_x: torch.Tensor
    v_q: torch.Tensor
    s_v: torch.Tensor
    acc: torch.Tensor
    m_f: torch.Tensor
    m_q: torch.Tensor
    s_m: torch.Tensor
    y: torch.Tensor


def quantize_input(
    x: torch.Tensor, qmax: int, rounding: str = "half-even"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor dynamic quantization of the float32 input: ``(x_q as float32, s_x)``."""
    x = x.to(torch.float32)
    s_x = scale_from_absmax(x.abs().amax(), qmax)
    return quantize(x, s_x, qmax, rounding), s_x


def input_transform_int(x_q: torch.Tensor, plan: WinogradLayerPlan, geo: TileGeometry) -> torch.Tensor:
    """Exact integer input transform ``BT_int d BT_int^T`` of every tile: ``[P, T, C]`` int64."""
    d = extract_tiles(x_q.to(torch.float64), geo)  # T, C, n, n (integers)
    bt = plan.bt_int.to(torch.float64)
    v = bt @ d @ bt.T  # exact: |values| << 2^53
    t, c, n, _ = v.shape
    return v.permute(2, 3, 0, 1).reshape(n * n, t, c).to(torch.int64)


def winograd_gemm_int(v_q: torch.Tensor, u_q: torch.Tensor, group: int) -> torch.Tensor:
    """Group-wise int8 x int8 -> int32 GEMM: ``acc[p, t, k, g] = sum_{c in g} v_q[p,t,c] u_q[p,k,c]``."""
    p, t, c = v_q.shape
    k = u_q.shape[1]
    ng = -(-c // group)
    pad = ng * group - c
    qv = int(v_q.abs().max()) if v_q.numel() else 0
    qu = int(u_q.abs().max()) if u_q.numel() else 0
    # float32 sums of integers are exact below 2^24, float64 below 2^53: pick the cheaper exact one
    dt = torch.float32 if group * qv * qu < 2**24 else torch.float64
    v = torch.nn.functional.pad(v_q.to(dt), (0, pad)).reshape(p, t, ng, group).permute(0, 2, 1, 3)
    u = torch.nn.functional.pad(u_q.to(dt), (0, pad)).reshape(p, k, ng, group).permute(0, 2, 3, 1)
    acc = torch.matmul(v, u).permute(0, 2, 3, 1)  # P, T, K, G (exact: see dtype choice)
    fits = acc.abs().max().item() < 2**31 if acc.numel() else True
    return acc.to(torch.int32 if fits else torch.int64)


def _group_of(scale: torch.Tensor, group: int, gemm_group: int, channels: int) -> torch.Tensor:
    """Pick, for each GEMM group, the scale of the (coarser or equal) quantization group holding it."""
    return expand_groups(scale, channels, group)[..., ::gemm_group]


def dequantize_gemm(acc: torch.Tensor, s_v: torch.Tensor, plan: WinogradLayerPlan) -> torch.Tensor:
    """``M[p,t,k] = fma-chain over groups g of acc[p,t,k,g] * (s_v[p,t,g] * s_u[p,k,g])`` in float32."""
    c, gg = plan.in_channels, plan.gemm_group
    sv = _group_of(s_v, plan.v.granularity.group_size(c), gg, c)[:, :, None, :]  # P|1, T|1, 1, Gg
    su = _group_of(plan.s_u, plan.u.granularity.group_size(c), gg, c)[:, None, :, :]  # P|1, 1, K|1, Gg
    w = sv * su  # float32 multiply, one rounding
    shape = torch.broadcast_shapes(acc.shape[:3], w.shape[:3])
    m = torch.zeros(shape, dtype=torch.float32)
    accf = acc.to(torch.float32)
    for g in range(acc.shape[-1]):
        m = fma_f32(accf[..., g].expand(shape), w[..., g].expand(shape), m)
    return m


def winograd_conv2d_int(
    x: torch.Tensor, plan: WinogradLayerPlan, return_trace: bool = False
) -> torch.Tensor | tuple[torch.Tensor, IntTrace]:
    """Run the fully quantized Winograd convolution on float32 NCHW ``x``.

    Returns the float32 output ``[N, K, OH, OW]`` (and the :class:`IntTrace` with ``return_trace``).
    """
    if x.dim() != 4 or x.shape[1] != plan.in_channels:
        raise ValueError(f"expected input [N, {plan.in_channels}, H, W], got {tuple(x.shape)}")
    geo = geometry(tuple(x.shape), plan.m, 3, plan.padding)
    x_q, s_x = quantize_input(x, plan.act.qmax, plan.act.rounding)
    v_int = input_transform_int(x_q, plan, geo)
    v_s = v_int.to(torch.float32) * plan.beta.reshape(-1, 1, 1)
    v_q, s_v = quantize_grouped(v_s, plan.v)
    acc = winograd_gemm_int(v_q, plan.u_q, plan.gemm_group)
    m_f = dequantize_gemm(acc, s_v, plan)
    s_m = scale_from_absmax(group_absmax(m_f, plan.m_spec), plan.m_spec.qmax)
    s_m_k = expand_groups(s_m, plan.out_channels, plan.m_spec.granularity.group_size(plan.out_channels))
    m_q = quantize(m_f, s_m_k, plan.m_spec.qmax, plan.m_spec.rounding)
    y = output_transform(m_q * s_m_k, plan, geo, x.shape[0]) * s_x
    if plan.bias is not None:
        y = y + plan.bias[None, :, None, None]
    if not return_trace:
        return y
    trace = IntTrace(
        geo=geo,
        x_q=x_q.to(int_dtype(plan.act.bits)),
        s_x=s_x,
        v_q=v_q.to(int_dtype(plan.v.bits)),
        s_v=s_v,
        acc=acc,
        m_f=m_f,
        m_q=m_q.to(int_dtype(plan.m_spec.bits)),
        s_m=s_m,
        y=y,
    )
    return y, trace


def output_transform(m: torch.Tensor, plan: WinogradLayerPlan, geo: TileGeometry, batch: int) -> torch.Tensor:
    """``A_s^T M A_s`` per tile for ``m`` ``[P, T, K]`` (float32) -> ``[N, K, OH, OW]``."""
    n = plan.n
    p, t, k = m.shape
    tiles = m.reshape(n, n, t, k).permute(2, 3, 0, 1)  # T, K, n, n
    y = plan.at_s @ tiles @ plan.at_s.T
    return assemble_tiles(y, geo, batch)
