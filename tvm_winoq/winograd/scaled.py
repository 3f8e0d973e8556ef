"""Diagonally scaled Winograd transforms (the learnable part of the method).

``B_s^T = diag(s_B) B^T``, ``G_s = diag(s_G) G`` and ``A_s^T = A^T diag(1 / (s_B * s_G))``: because
``(D1 X D1) * (D2 Y D2) = (D1 D2)(X * Y)(D1 D2)`` for diagonal ``D``, the float result of the 2D
algorithm ``A_s^T [(G_s g G_s^T) * (B_s^T d B_s)] A_s`` equals direct convolution for any nonzero
scales, while the ranges of the Winograd-domain tensors change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cook_toom import WinogradMatrices
from .tiling import assemble_tiles, extract_tiles, geometry


@dataclass(frozen=True)
class ScaledTransforms:
    """``A_s^T`` (m x n), ``G_s`` (n x r), ``B_s^T`` (n x n) as torch tensors (differentiable)."""

    AT: torch.Tensor  # noqa: N815
    G: torch.Tensor  # noqa: N815
    BT: torch.Tensor  # noqa: N815


def scaled_transforms(
    mats: WinogradMatrices,
    s_b: torch.Tensor | None = None,
    s_g: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> ScaledTransforms:
    """Apply the diagonal scales ``s_b``, ``s_g`` (length ``n``; ``None`` = ones) to ``mats``."""
    at, g, bt = (torch.as_tensor(a, dtype=dtype) for a in mats.numpy())
    ones = torch.ones(mats.n, dtype=dtype)
    sb = ones if s_b is None else s_b.to(dtype)
    sg = ones if s_g is None else s_g.to(dtype)
    return ScaledTransforms(AT=at / (sb * sg)[None, :], G=sg[:, None] * g, BT=sb[:, None] * bt)


def winograd_conv2d_float(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: tuple[int, int],
    tr: ScaledTransforms,
) -> torch.Tensor:
    """Unquantized Winograd convolution with the (scaled) transforms ``tr``, in ``tr``'s dtype."""
    m, n = tr.AT.shape
    r = tr.G.shape[1]
    geo = geometry(tuple(x.shape), m, r, padding)
    d = extract_tiles(x.to(tr.BT.dtype), geo)  # T, C, n, n
    v = tr.BT @ d @ tr.BT.T
    u = tr.G @ weight.to(tr.G.dtype) @ tr.G.T  # K, C, n, n
    mm = torch.einsum("tcij,kcij->tkij", v, u)
    y = tr.AT @ mm @ tr.AT.T
    out = assemble_tiles(y, geo, x.shape[0])
    if bias is not None:
        out = out + bias.to(out.dtype)[None, :, None, None]
    return out


def conv2d_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding
) -> torch.Tensor:
    """Direct convolution in the dtype of ``x`` (the FP ground truth)."""
    return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=padding)
