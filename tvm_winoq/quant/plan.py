"""Offline preparation of one quantized Winograd layer: the constants every backend consumes.

A :class:`WinogradLayerPlan` holds the integer input transform ``BT_int``, the float32 position
factors ``beta`` (learned ``S_B`` and the integerization of ``B^T``), the float32 scaled output transform
``AT_s`` (learned ``S_A = (S_B S_G)^-1``), and the offline-quantized weights ``U_q`` with their scales.
The PyTorch integer reference (:mod:`.reference`) and the TIR kernels both execute this plan; see
``docs/integer_contract.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import QuantSpec, WinoQConfig
from ..winograd.cook_toom import WinogradMatrices, winograd_matrices
from ..winograd.scaled import scaled_transforms
from .ops import int_dtype, n_groups, quantize_grouped


@dataclass(frozen=True)
class LayerScales:
    """Learned diagonal scales ``S_B`` and ``S_G`` (length ``n``, float64, positive)."""

    s_b: torch.Tensor
    s_g: torch.Tensor

    @staticmethod
    def ones(n: int) -> LayerScales:
        return LayerScales(torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64))

    def to_dict(self) -> dict[str, list[float]]:
        return {"s_b": self.s_b.tolist(), "s_g": self.s_g.tolist()}

    @staticmethod
    def from_dict(d: dict[str, list[float]]) -> LayerScales:
        return LayerScales(
            torch.tensor(d["s_b"], dtype=torch.float64), torch.tensor(d["s_g"], dtype=torch.float64)
        )


@dataclass(frozen=True)
class WinogradLayerPlan:
    """Everything needed to run one fully quantized ``F(m, 3)`` convolution.

    Shapes: ``bt_int`` [n, n] int64, ``beta`` [n, n] float32, ``at_s`` [m, n] float32, ``u_q`` [P, K, C]
    int8 (P = n*n positions, row-major ``p = i*n + j``), ``s_u`` [P|1, K|1, Gu] float32, ``bias`` [K].
    """

    mats: WinogradMatrices
    padding: tuple[int, int]
    in_channels: int
    out_channels: int
    act: QuantSpec
    v: QuantSpec
    u: QuantSpec
    m_spec: QuantSpec
    bt_int: torch.Tensor
    beta: torch.Tensor
    at_s: torch.Tensor
    u_q: torch.Tensor
    s_u: torch.Tensor
    bias: torch.Tensor | None

    @property
    def m(self) -> int:
        return self.mats.m

    @property
    def n(self) -> int:
        return self.mats.n

    @property
    def positions(self) -> int:
        return self.mats.n**2

    @property
    def gemm_group(self) -> int:
        """Channels per int32 accumulation group: the finer of the V and U channel groups."""
        c = self.in_channels
        return min(self.v.granularity.group_size(c), self.u.granularity.group_size(c))

    @property
    def gemm_groups(self) -> int:
        return n_groups(self.in_channels, self.gemm_group)


def transforms_for(cfg: WinoQConfig) -> WinogradMatrices:
    """The exact ``F(cfg.tile, 3)`` matrices of a config."""
    return winograd_matrices(cfg.tile, 3, cfg.point_values)


def plan_layer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: tuple[int, int],
    cfg: WinoQConfig,
    scales: LayerScales | None = None,
) -> WinogradLayerPlan:
    """Prepare a 3x3 convolution (``weight`` [K, C, 3, 3], BN already folded) for quantized Winograd.

    The weight transform ``U = G_s g G_s^T`` is computed in float64 and quantized group-wise there.
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"expected a [K, C, 3, 3] weight, got {tuple(weight.shape)}")
    mats = transforms_for(cfg)
    n = mats.n
    sc = scales if scales is not None else LayerScales.ones(n)
    if sc.s_b.numel() != n or sc.s_g.numel() != n:
        raise ValueError(f"scales: F({cfg.tile},3) needs {n} entries for S_B and S_G")
    tr = scaled_transforms(mats, sc.s_b.detach(), sc.s_g.detach(), dtype=torch.float64)
    bt_int, c = mats.integer_bt()
    sigma = sc.s_b.detach().to(torch.float64) / torch.as_tensor(c)
    beta = (sigma[:, None] * sigma[None, :]).to(torch.float32)
    k, cin = weight.shape[:2]
    u = tr.G @ weight.detach().to(torch.float64) @ tr.G.T  # K, C, n, n
    u = u.permute(2, 3, 0, 1).reshape(n * n, k, cin)
    u_q, s_u = quantize_grouped(u, cfg.u)
    return WinogradLayerPlan(
        mats=mats,
        padding=(int(padding[0]), int(padding[1])),
        in_channels=cin,
        out_channels=k,
        act=cfg.act,
        v=cfg.v,
        u=cfg.u,
        m_spec=cfg.m,
        bt_int=torch.as_tensor(bt_int),
        beta=beta,
        at_s=tr.AT.to(torch.float32),
        u_q=u_q.to(int_dtype(cfg.u.bits)),
        s_u=s_u.to(torch.float32),
        bias=None if bias is None else bias.detach().to(torch.float32),
    )
