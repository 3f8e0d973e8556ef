"""Differentiable fake-quant (straight-through) version of the quantized Winograd convolution.

Numerically it follows the integer reference (same scales, same rounding points) but keeps every
stage in float so gradients reach the learnable diagonal scales ``S_B`` and ``S_G``.
"""

from __future__ import annotations

import torch

from ..config import WinoQConfig
from ..winograd.cook_toom import WinogradMatrices
from ..winograd.scaled import scaled_transforms
from ..winograd.tiling import assemble_tiles, extract_tiles, geometry
from .ops import fake_quant_grouped
from .reference import quantize_input


def winograd_conv2d_fakequant(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: tuple[int, int],
    cfg: WinoQConfig,
    mats: WinogradMatrices,
    s_b: torch.Tensor,
    s_g: torch.Tensor,
    u_cache: dict[str, torch.Tensor] | None = None,
    fast: bool | None = None,
) -> torch.Tensor:
    """Fake-quantized Winograd convolution, differentiable in ``s_b`` and ``s_g`` (float32 compute).

    When V and U are quantized per Winograd position, their quantization is invariant to the diagonal
    scales (a per-position scale absorbs them), so V and U are fake-quantized once with standard
    transforms and only ``M``'s quantization and the output transform see ``S_B S_G``: the same
    numbers up to float32 ties, much cheaper (``fast=False`` forces the general path).
    ``u_cache`` (a dict owned by the caller) keeps the fake-quantized U of a
    layer across calls on that fast path.
    """
    n = mats.n
    tr = scaled_transforms(mats, s_b, s_g, dtype=torch.float32)
    geo = geometry(tuple(x.shape), mats.m, 3, padding)
    can = cfg.v.per_position and cfg.u.per_position
    fast = can if fast is None else (fast and can)
    with torch.no_grad():
        x_q, s_x = quantize_input(x, cfg.act.qmax)
        d = extract_tiles(x_q, geo)  # T, C, n, n
    t_, c = d.shape[:2]
    if fast:
        std = scaled_transforms(mats, None, None, dtype=torch.float32)
        with torch.no_grad():
            v_fq = fake_quant_grouped(
                (std.BT @ d @ std.BT.T).permute(2, 3, 0, 1).reshape(n * n, t_, c), cfg.v
            )
            u_fq = None if u_cache is None else u_cache.get("u_fq")
            if u_fq is None:
                u_fq = fake_quant_grouped(_weight_transform(weight, std.G.to(torch.float64), n), cfg.u)
                u_fq = u_fq.to(torch.float32)
                if u_cache is not None:
                    u_cache["u_fq"] = u_fq
            m_std = torch.bmm(v_fq, u_fq.transpose(1, 2))  # P, T, K
        w = s_b.to(torch.float32) * s_g.to(torch.float32)
        m = m_std * (w[:, None] * w[None, :]).reshape(-1, 1, 1)
    else:
        v = (tr.BT @ d @ tr.BT.T).permute(2, 3, 0, 1).reshape(n * n, t_, c)
        u = _weight_transform(weight, tr.G.to(torch.float64), n)
        v_fq = fake_quant_grouped(v, cfg.v)
        u_fq = fake_quant_grouped(u, cfg.u).to(torch.float32)
        m = torch.bmm(v_fq, u_fq.transpose(1, 2))  # P, T, K
    m_fq = fake_quant_grouped(m, cfg.m)
    tiles = m_fq.reshape(n, n, t_, -1).permute(2, 3, 0, 1)
    y = assemble_tiles(tr.AT @ tiles @ tr.AT.T, geo, x.shape[0]) * s_x
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None, None]
    return y


def _weight_transform(weight: torch.Tensor, g: torch.Tensor, n: int) -> torch.Tensor:
    """``G w G^T`` in float64 as ``[P, K, C]``."""
    u = g @ weight.detach().to(torch.float64) @ g.T
    return u.permute(2, 3, 0, 1).reshape(n * n, weight.shape[0], weight.shape[1])
