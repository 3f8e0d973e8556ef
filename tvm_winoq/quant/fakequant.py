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
) -> torch.Tensor:
    """Fake-quantized Winograd convolution, differentiable in ``s_b`` and ``s_g`` (float32 compute)."""
    n = mats.n
    tr = scaled_transforms(mats, s_b, s_g, dtype=torch.float32)
    geo = geometry(tuple(x.shape), mats.m, 3, padding)
    with torch.no_grad():
        x_q, s_x = quantize_input(x, cfg.act.qmax)
        d = extract_tiles(x_q, geo)  # T, C, n, n
    t_, c = d.shape[:2]
    v = (tr.BT @ d @ tr.BT.T).permute(2, 3, 0, 1).reshape(n * n, t_, c)
    u = tr.G.to(torch.float64) @ weight.detach().to(torch.float64) @ tr.G.T.to(torch.float64)
    u = u.permute(2, 3, 0, 1).reshape(n * n, weight.shape[0], c)
    v_fq = fake_quant_grouped(v, cfg.v)
    u_fq = fake_quant_grouped(u, cfg.u).to(torch.float32)
    m = torch.bmm(v_fq, u_fq.transpose(1, 2))  # P, T, K
    m_fq = fake_quant_grouped(m, cfg.m)
    tiles = m_fq.reshape(n, n, t_, -1).permute(2, 3, 0, 1)
    y = assemble_tiles(tr.AT @ tiles @ tr.AT.T, geo, x.shape[0]) * s_x
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None, None]
    return y
