"""TIR kernels of one fully quantized group-wise Winograd convolution, specialized on static shapes.

One layer runs as three PrimFuncs (all integer stages reproduce :func:`~tvm_winoq.quant.reference.
winograd_conv2d_int` bit for bit):

``input``   ``x`` [N,C,H,W] f32 -> ``v_q`` [P,T,C] int8, ``s_v`` [P,T,Gv] f32, ``s_x`` [1] f32
            (per-tensor input absmax, quantize, zero pad, integer input transform ``BT_int d BT_int^T``,
            ``* beta``, group-wise quantization of V; everything after the padding is per tile)
``gemm``    ``v_q``, ``s_v``, ``u_q`` [P,Cp,K] int8, ``s_u`` [P,Gg,K] f32 -> ``m_f`` [P,T,K] f32
            (group-wise int8 x int8 -> int32 GEMM per Winograd position, fma-chain dequantization)
``output``  ``m_f``, ``s_x``, ``bias`` [K] f32 -> ``y`` [N,K,OH,OW] f32
            (group-wise quantization of M with ``s_m`` [P|1,T|1,Gm], output transform
            ``AT_s (M_q s_m) AT_s^T``, ``* s_x + bias``)

With ``debug=True`` the integer intermediates are extra outputs: the gemm also returns ``acc``
[P,T,K,Gg] int32 (before ``m_f``) and the output kernel returns ``m_q`` [P,T,K] and ``s_m`` (before ``y``).
The transform matrices are baked into the kernels as immediates (``Select`` over the row index, which
folds away once a schedule unrolls the row loops); ``u_q``/``s_u``/``bias`` are runtime arguments
(compile-time constants of the Relax program), laid out by :func:`layer_constants`.  Group absmaxes
are two-stage (8 partial maxima, then their max) so they vectorize; a partial last channel group is
handled by clamping the channel index (no predicates, so every loop nest stays affine and schedulable).
V's absmax runs on the transform's integers (``|fl(v beta)| = fl(|v| |beta|)`` is monotonic in ``|v|``,
so ``fl(max |v| * |beta|)`` is the float absmax exactly); the output kernel holds the quantized M as
float32 integers (the values of ``m_q``, without an int8 round trip before the transform).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import tvm
from tvm import tirx
from tvm.script import tirx as T

from ..config import QuantSpec
from ..quant.ops import n_groups
from ..quant.plan import WinogradLayerPlan
from ..winograd.tiling import TileGeometry, geometry
from .gemm import GemmShape, clamp_index, gemm_kernel

__all__ = ["GroupQuant", "KernelSpec", "gemm_func", "input_func", "input_quant_macro", "layer_constants",
           "output_func"]


@dataclass(frozen=True)
class GroupQuant:
    """Resolved quantization grouping of one ``[P, R, C]`` tensor (``group`` channels per scale)."""

    group: int
    per_position: bool
    per_row: bool
    qmax: int
    dtype: str

    @staticmethod
    def of(spec: QuantSpec, channels: int) -> GroupQuant:
        """Resolve ``spec`` for a channel axis of length ``channels``."""
        return GroupQuant(
            group=spec.granularity.group_size(channels),
            per_position=spec.per_position,
            per_row=spec.per_row,
            qmax=spec.qmax,
            dtype="int8" if spec.bits <= 8 else "int16",
        )

    def scale_shape(self, positions: int, rows: int, channels: int) -> tuple[int, int, int]:
        """Shape ``[P|1, R|1, G]`` of the scales."""
        return (positions if self.per_position else 1, rows if self.per_row else 1,
                n_groups(channels, self.group))


@dataclass(frozen=True)
class KernelSpec:
    """Static description of one Winograd layer instance (shapes, transforms, quantization)."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    pad_h: int
    pad_w: int
    m: int
    bt_int: tuple[tuple[int, ...], ...]
    beta: tuple[float, ...]
    at_s: tuple[tuple[float, ...], ...]
    act_qmax: int
    v: GroupQuant
    m_quant: GroupQuant
    gemm_group: int

    @staticmethod
    def from_plan(plan: WinogradLayerPlan, x_shape: Sequence[int]) -> KernelSpec:
        """The spec of ``plan`` applied to an NCHW input of ``x_shape``."""
        n_, c, h, w = (int(d) for d in x_shape)
        if c != plan.in_channels:
            raise ValueError(f"input has {c} channels, plan expects {plan.in_channels}")
        if plan.act.bits > 8 or plan.v.bits > 8 or plan.u.bits > 8 or plan.m_spec.bits > 8:
            raise ValueError("the TIR kernels support up to 8-bit quantization")
        if not (plan.v.per_position and plan.v.per_row):
            raise ValueError("the TIR kernels need V scales per position and tile (QuantSpec per_position "
                             "and per_row); other V layouts run in the PyTorch reference")
        return KernelSpec(
            batch=n_, in_channels=c, height=h, width=w, out_channels=plan.out_channels,
            pad_h=plan.padding[0], pad_w=plan.padding[1], m=plan.m,
            bt_int=tuple(tuple(int(v) for v in row) for row in plan.bt_int.tolist()),
            beta=tuple(float(v) for v in plan.beta.to(torch.float32).reshape(-1).tolist()),
            at_s=tuple(tuple(float(v) for v in row) for row in plan.at_s.to(torch.float32).tolist()),
            act_qmax=plan.act.qmax,
            v=GroupQuant.of(plan.v, c),
            m_quant=GroupQuant.of(plan.m_spec, plan.out_channels),
            gemm_group=plan.gemm_group,
        )

    @property
    def n(self) -> int:
        return self.m + 2

    @property
    def positions(self) -> int:
        return self.n * self.n

    @property
    def geo(self) -> TileGeometry:
        return geometry((self.batch, self.in_channels, self.height, self.width), self.m, 3,
                        (self.pad_h, self.pad_w))

    @property
    def tiles(self) -> int:
        return self.batch * self.geo.tiles

    @property
    def gemm_groups(self) -> int:
        return n_groups(self.in_channels, self.gemm_group)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        g = self.geo
        return (self.batch, self.out_channels, g.out_h, g.out_w)

    @property
    def sv_shape(self) -> tuple[int, int, int]:
        return self.v.scale_shape(self.positions, self.tiles, self.in_channels)

    @property
    def sm_shape(self) -> tuple[int, int, int]:
        return self.m_quant.scale_shape(self.positions, self.tiles, self.out_channels)

    def key(self) -> str:
        """Short readable name fragment (``f4_c64_k64_56x56``)."""
        return f"f{self.m}_c{self.in_channels}_k{self.out_channels}_{self.height}x{self.width}"


def layer_constants(plan: WinogradLayerPlan) -> dict[str, np.ndarray]:
    """Weights of ``plan`` in the kernels' layout.

    Returns
    -------
    dict
        ``u_q`` [P, Cp, K] int8 (channel-major so the GEMM vectorizes over K; ``Cp`` = C rounded up to
        whole GEMM groups, zero rows), ``s_u`` [P, Gg, K]
        float32 (the U scale of each GEMM group, broadcast over P and K where ``plan.u`` shares it)
        and ``bias`` [K] float32 (zeros without bias).
    """
    p, k, c = plan.positions, plan.out_channels, plan.in_channels
    cp = plan.gemm_groups * plan.gemm_group
    u_q = torch.nn.functional.pad(plan.u_q.to(torch.int8), (0, cp - c)).permute(0, 2, 1).contiguous().numpy()
    gs_u = plan.u.granularity.group_size(c)
    su = plan.s_u.to(torch.float32)
    pick = [(g * plan.gemm_group) // gs_u for g in range(plan.gemm_groups)]
    su = su[:, :, pick].expand(p, k, len(pick))  # P, K, Gg
    bias = plan.bias if plan.bias is not None else torch.zeros(k)
    return {
        "u_q": u_q,
        "s_u": su.permute(0, 2, 1).contiguous().numpy(),
        "bias": bias.to(torch.float32).contiguous().numpy(),
    }


# ----------------------------------------------------------------------------------------- helpers
def _lincomb(coeffs: Sequence[float], terms: Sequence[tirx.PrimExpr], dtype: str) -> tirx.PrimExpr:
    """``sum_i coeffs[i] * terms[i]`` with zero coefficients dropped and +-1 as add/sub."""
    out: tirx.PrimExpr | None = None
    for c, t in zip(coeffs, terms, strict=True):
        if c == 0:
            continue
        if out is None:
            out = t if c == 1 else (tirx.const(c, dtype) * t)
        elif c == 1:
            out = out + t
        elif c == -1:
            out = out - t
        else:
            out = out + tirx.const(c, dtype) * t
    return out if out is not None else tirx.const(0, dtype)


def _select(index: tirx.PrimExpr, values: Sequence[tirx.PrimExpr]) -> tirx.PrimExpr:
    """``values[index]`` for a loop variable ``index`` (a ``Select`` chain that folds when unrolled)."""
    out = values[-1]
    for r in range(len(values) - 2, -1, -1):
        out = tirx.Select(index == r, values[r], out)
    return out


def _join(outer: tirx.PrimExpr, inner: tirx.PrimExpr, outer_ext: int, inner_ext: int) -> tirx.PrimExpr:
    """``outer + inner`` for a (scale axis, reduced axis) pair where one of them has extent 1."""
    return outer if inner_ext == 1 else inner if outer_ext == 1 else outer + inner


def _lanes(group: int) -> int:
    """Partial maxima per group absmax (vector lanes): the largest of 8, 4, 2, 1 dividing ``group``."""
    return next(v for v in (8, 4, 2, 1) if group % v == 0)


def _scale(amax: tirx.PrimExpr, qmax: int) -> tirx.PrimExpr:
    """``absmax / qmax`` with 1 where that is 0 (:func:`~tvm_winoq.quant.ops.scale_from_absmax`)."""
    s = amax / tirx.const(float(qmax), "float32")
    return tirx.Select(s == tirx.const(0.0, "float32"), tirx.const(1.0, "float32"), s)


# ``nearbyint`` (round half to even, as torch.round) is elementwise, but upstream does not mark it
# vectorizable: VectorizeLoop then scalarizes every loop that quantizes, and LLVM re-vectorizes some of
# them along the wrong axis (per-lane gathers; M quantization was ~40% of the output kernel at 320@64).
# ``round`` is marked, but lowers to round-half-away on CUDA.
if tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable") is None:
    tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)


def _quant_r(value: tirx.PrimExpr, rscale: tirx.PrimExpr, qmax: int, dtype: str,
             offset: int = 0) -> tirx.PrimExpr:
    """``clamp(nearbyint(value * rscale), -qmax, qmax)`` cast to ``dtype``
    (:func:`~tvm_winoq.quant.ops.quantize` with the reciprocal ``rscale = 1 / scale``, computed once per
    scale); ``offset`` is added before the cast (exact: small integers in float32)."""
    q = tirx.const(float(qmax), "float32")
    r = tirx.max(tirx.min(tirx.call_intrin("float32", "tirx.nearbyint", value * rscale), q), -q)
    return tirx.Cast(dtype, r + tirx.const(float(offset), "float32") if offset else r)


def transform_dtype(bt: Sequence[Sequence[int]], qmax: int) -> str:
    """Integer type of the input transform ``BT_int d BT_int^T`` for inputs ``|d| <= qmax``: ``int16``
    where no partial sum can leave it (``qmax * L1^2 <= 32767``, ``L1`` the largest absolute row sum of
    ``BT_int``: F(2,3) and F(4,3) with int8 inputs), else ``int32``.  Exact either way; int16 halves
    the vector work of the two transform stages (AVX-512: 32 lanes a register)."""
    l1 = max(sum(abs(int(v)) for v in row) for row in bt)
    return "int16" if qmax * l1 * l1 <= 32767 else "int32"


def input_quant_macro(x_shape: Sequence[int], padded: Sequence[int], pad: Sequence[int], qmax: int,
                      dtype: str, offset: int = 0, channels: int | None = None) -> object:
    """``T.macro`` ``(x, xmax, sx, xp)``: per-tensor absmax of ``x`` [N,C,H,W] into ``xmax`` [1], its scale
    into ``sx`` [1], and ``x`` quantized, zero padded (``pad`` = top, left; ``padded`` = Hp, Wp) and
    transposed into ``xp`` [N,Hp,Wp,C] of ``dtype`` (blocks ``x_absmax``, ``x_scale``, ``x_quant``).
    With ``offset``, ``xp`` holds ``q + offset`` (padding: ``offset``), e.g. ``uint8`` ``q + 128``; with
    ``channels`` (> C), ``xp`` has that many channels, the extra ones padding."""
    nb, c, h, w = (int(d) for d in x_shape)
    cp = c if channels is None else int(channels)

    def inside(v1: tirx.PrimExpr, v2: tirx.PrimExpr, v3: tirx.PrimExpr) -> tirx.PrimExpr:
        # left-nested and ``1 <= v1``, exactly as TVMScript parses ``ph <= v1 and v1 < ph + h and ...``
        # (the kernels of earlier versions, and their tune-log workloads, stay the same)
        terms = [tirx.LE(tirx.const(ph, "int32"), v1), v1 < ph + h, tirx.LE(tirx.const(pw, "int32"), v2),
                 v2 < pw + w] + ([v3 < c] if cp != c else [])
        cond = terms[0]
        for t in terms[1:]:
            cond = tirx.And(cond, t)
        return cond
    hp, wp = (int(d) for d in padded)
    ph, pw = (int(d) for d in pad)
    zero = tirx.const(offset, dtype)

    @T.macro
    def quant(x, xmax, sx, xp):
        for i0, i1, i2, i3 in T.grid(nb, c, h, w):
            with T.sblock("x_absmax"):
                v0, v1, v2, v3 = T.axis.remap("RRRR", [i0, i1, i2, i3])
                with T.init():
                    xmax[0] = T.min_value("float32")  # the max reducer's identity (for rfactor)
                xmax[0] = T.max(xmax[0], T.fabs(x[v0, v1, v2, v3]))
        for i0 in range(1):
            with T.sblock("x_scale"):
                v0 = T.axis.remap("S", [i0])
                sx[v0] = _scale(xmax[v0], qmax)
        for i0, i1, i2, i3 in T.grid(nb, hp, wp, cp):
            with T.sblock("x_quant"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                xp[v0, v1, v2, v3] = T.if_then_else(
                    inside(v1, v2, v3),
                    _quant_r(x[v0, v3, v1 - ph, v2 - pw], tirx.const(1.0, "float32") / sx[0], qmax, dtype,
                             offset), zero)

    return quant


# ------------------------------------------------------------------------------------------ kernels
def input_func(spec: KernelSpec, debug: bool = False) -> tirx.PrimFunc:
    """Kernel ``input``: ``(x, v_q, s_v, s_x)`` (last three written). ``debug`` is accepted for symmetry."""
    del debug
    geo, n, m = spec.geo, spec.n, spec.m
    nb, c, h, w = spec.batch, spec.in_channels, spec.height, spec.width
    th, tw, hp, wp = geo.tiles_h, geo.tiles_w, geo.padded_h, geo.padded_w
    ph, pw = spec.pad_h, spec.pad_w
    p, t = spec.positions, spec.tiles
    vq_dt, qa, qv = spec.v.dtype, spec.act_qmax, spec.v.qmax
    gv, gs = spec.sv_shape[2], spec.v.group
    lv = _lanes(gs)
    bt, beta = spec.bt_int, spec.beta
    # the quantized input in the narrowest integer type: it is written once and read by the row
    # transform; as int32 it was 4x the traffic (~1 ms of 3.4 at 320@64, memory bound)
    xp_dt = "int8" if qa <= 127 else "int16" if qa <= 32767 else "int32"
    quantize_input = input_quant_macro((nb, c, h, w), (hp, wp), (ph, pw), qa, xp_dt)

    tf_dt = transform_dtype(bt, qa)

    def rows(i: tirx.PrimExpr, xp: tirx.Buffer, tt: tirx.PrimExpr, b: tirx.PrimExpr,
             ch: tirx.PrimExpr) -> tirx.PrimExpr:
        img, h0, w0 = tt // (th * tw), tt // tw % th * m, tt % tw * m + b
        loads = [T.Cast(tf_dt, xp[img, h0 + a, w0, ch]) for a in range(n)]
        return _select(i, [_lincomb(bt[r], loads, tf_dt) for r in range(n)])

    def cols(j: tirx.PrimExpr, tmp: tirx.Buffer, tt: tirx.PrimExpr, i: tirx.PrimExpr,
             ch: tirx.PrimExpr) -> tirx.PrimExpr:
        loads = [tmp[tt, i, a, ch] for a in range(n)]
        return _select(j, [_lincomb(bt[r], loads, tf_dt) for r in range(n)])

    def beta_of(pos: tirx.PrimExpr, magnitude: bool = False) -> tirx.PrimExpr:
        values = np.abs(beta) if magnitude else beta
        return _select(pos, [tirx.const(float(v), "float32") for v in values])

    @T.prim_func(s_tir=True, private=True)
    def winoq_input(x: T.Buffer((nb, c, h, w), "float32"), vq: T.Buffer((p, t, c), vq_dt),
                    sv: T.Buffer((p, t, gv), "float32"), sx: T.Buffer((1,), "float32")):
        T.func_attr({"tirx.noalias": True})
        xmax = T.sblock_alloc_buffer((1,), "float32")
        xp = T.sblock_alloc_buffer((nb, hp, wp, c), xp_dt)  # quantized, padded, NHWC
        tmp = T.sblock_alloc_buffer((t, n, n, c), tf_dt)  # BT_int d (per tile)
        vi = T.sblock_alloc_buffer((n, n, t, c), tf_dt)  # BT_int d BT_int^T; V_s = float(vi) * beta
        vmax = T.sblock_alloc_buffer((p, t, gv), "float32")
        rsv = T.sblock_alloc_buffer((p, t, gv), "float32")  # 1 / s_v, once per scale
        vlane = T.sblock_alloc_buffer((t, p, gv, lv), tf_dt)  # per tile: GPU schedules move blocks
        quantize_input(x, xmax, sx, xp)
        for it in range(t):  # everything after the input quantization is per tile
            for i0, i1, i2 in T.grid(n, n, c):
                with T.sblock("tf_rows"):
                    v0 = T.axis.spatial(t, it)
                    v1, v2, v3 = T.axis.remap("SSS", [i0, i1, i2])
                    tmp[v0, v1, v2, v3] = rows(v1, xp, v0, v2, v3)
            for i0, i1, i2 in T.grid(n, n, c):
                with T.sblock("tf_cols"):
                    v0 = T.axis.spatial(t, it)
                    v1, v2, v3 = T.axis.remap("SSS", [i0, i1, i2])
                    vi[v1, v2, v0, v3] = cols(v2, tmp, v0, v1, v3)
            # |V_s| = fl(|vi| |beta|) grows with |vi|: its absmax is fl(max |vi| * |beta|), exactly, so the
            # maxima run on the integers (twice the lanes, no conversion) and scale once per group
            for i0, i1, i2, i3 in T.grid(p, gv, lv, gs // lv):  # lv partial maxima (vectorizable)
                with T.sblock("v_absmax_lanes"):
                    v0 = T.axis.spatial(t, it)
                    v1, v2, v3, v4 = T.axis.remap("SSSR", [i0, i1, i2, i3])
                    with T.init():
                        vlane[v0, v1, v2, v3] = T.Cast(tf_dt, 0)
                    vlane[v0, v1, v2, v3] = T.max(vlane[v0, v1, v2, v3], T.abs(
                        vi[v1 // n, v1 % n, v0, clamp_index(v2 * gs + v4 * lv + v3, c, gv * gs)]))
            for i0, i1, i2 in T.grid(p, gv, lv):
                with T.sblock("v_absmax"):
                    v0 = T.axis.spatial(t, it)
                    v1, v2, v3 = T.axis.remap("SSR", [i0, i1, i2])
                    with T.init():
                        vmax[v1, v0, v2] = T.float32(0)
                    vmax[v1, v0, v2] = T.max(vmax[v1, v0, v2],
                                             T.Cast("float32", vlane[v0, v1, v2, v3]) * beta_of(v1, True))
            for i0, i1 in T.grid(p, gv):
                with T.sblock("v_scale"):
                    v0 = T.axis.spatial(t, it)
                    v1, v2 = T.axis.remap("SS", [i0, i1])
                    sv[v1, v0, v2] = _scale(vmax[v1, v0, v2], qv)
                    rsv[v1, v0, v2] = T.float32(1) / _scale(vmax[v1, v0, v2], qv)
            for i0, i1 in T.grid(p, c):
                with T.sblock("v_quant"):
                    v0 = T.axis.spatial(t, it)
                    v1, v2 = T.axis.remap("SS", [i0, i1])
                    vq[v1, v0, v2] = _quant_r(T.Cast("float32", vi[v1 // n, v1 % n, v0, v2]) * beta_of(v1),
                                              rsv[v1, v0, v2 // gs], qv, vq_dt)

    return winoq_input


def gemm_func(spec: KernelSpec, debug: bool = False) -> tirx.PrimFunc:
    """Kernel ``gemm``: ``(v_q, s_v, u_q, s_u, m_f)``; with ``debug`` ``(v_q, s_v, u_q, s_u, acc, m_f)``."""
    return gemm_kernel(GemmShape(spec.positions, spec.tiles, spec.in_channels, spec.out_channels,
                                 spec.gemm_group, spec.gemm_groups, spec.sv_shape[2], spec.v.group,
                                 spec.v.dtype), debug)


def output_func(spec: KernelSpec, debug: bool = False) -> tirx.PrimFunc:
    """Kernel ``output``: ``(m_f, s_x, bias, y)``; with ``debug`` ``(m_f, s_x, bias, m_q, s_m, y)``."""
    geo, n, m = spec.geo, spec.n, spec.m
    p, t, k = spec.positions, spec.tiles, spec.out_channels
    nb, oh, ow, th, tw = spec.batch, geo.out_h, geo.out_w, geo.tiles_h, geo.tiles_w
    pm, tm, gm = spec.sm_shape
    rp, rt, gs = p // pm, t // tm, spec.m_quant.group
    lm = _lanes(gs)
    on_p, on_t = int(spec.m_quant.per_position), int(spec.m_quant.per_row)
    qm, mq_dt = spec.m_quant.qmax, spec.m_quant.dtype
    at = spec.at_s

    def rows(a: tirx.PrimExpr, mq: tirx.Buffer, sm: tirx.Buffer, j: tirx.PrimExpr, tt: tirx.PrimExpr,
             kk: tirx.PrimExpr) -> tirx.PrimExpr:
        terms = [T.Cast("float32", mq[i * n + j, tt, kk]) * sm[(i * n + j) * on_p, tt * on_t, kk // gs]
                 for i in range(n)]
        return _select(a, [_lincomb(at[r], terms, "float32") for r in range(m)])

    def cols(b: tirx.PrimExpr, o1: tirx.Buffer, tt: tirx.PrimExpr, kk: tirx.PrimExpr,
             a: tirx.PrimExpr) -> tirx.PrimExpr:
        terms = [o1[tt, a, j, kk] for j in range(n)]
        return _select(b, [_lincomb(at[r], terms, "float32") for r in range(m)])

    @T.macro
    def body(mf, sx, bias, mq, sm, y):
        mmax = T.sblock_alloc_buffer((pm, tm, gm), "float32")
        mlane = T.sblock_alloc_buffer((pm, tm, gm, lm), "float32")
        rsm = T.sblock_alloc_buffer((pm, tm, gm), "float32")  # 1 / s_m, once per scale
        o1 = T.sblock_alloc_buffer((t, m, n, k), "float32")  # channels innermost (vectorized)
        yt = T.sblock_alloc_buffer((t, m, m, k), "float32")
        for i0, i1, i2, i3, i4, i5, i6 in T.grid(pm, tm, gm, lm, rp, rt, gs // lm):
            with T.sblock("m_absmax_lanes"):
                v0, v1, v2, v3, v4, v5, v6 = T.axis.remap("SSSSRRR", [i0, i1, i2, i3, i4, i5, i6])
                with T.init():
                    mlane[v0, v1, v2, v3] = T.float32(0)
                mlane[v0, v1, v2, v3] = T.max(mlane[v0, v1, v2, v3], T.fabs(mf[
                    _join(v0, v4, pm, rp), _join(v1, v5, tm, rt),
                    clamp_index(v2 * gs + v6 * lm + v3, k, gm * gs)]))
        for i0, i1, i2, i3 in T.grid(pm, tm, gm, lm):
            with T.sblock("m_absmax"):
                v0, v1, v2, v3 = T.axis.remap("SSSR", [i0, i1, i2, i3])
                with T.init():
                    mmax[v0, v1, v2] = T.float32(0)
                mmax[v0, v1, v2] = T.max(mmax[v0, v1, v2], mlane[v0, v1, v2, v3])
        for i0, i1, i2 in T.grid(pm, tm, gm):
            with T.sblock("m_scale"):
                v0, v1, v2 = T.axis.remap("SSS", [i0, i1, i2])
                sm[v0, v1, v2] = _scale(mmax[v0, v1, v2], qm)
                rsm[v0, v1, v2] = T.float32(1) / _scale(mmax[v0, v1, v2], qm)
        for i0, i1, i2 in T.grid(p, t, k):
            with T.sblock("m_quant"):
                v0, v1, v2 = T.axis.remap("SSS", [i0, i1, i2])
                mq[v0, v1, v2] = _quant_r(mf[v0, v1, v2], rsm[v0 * on_p, v1 * on_t, v2 // gs], qm, mq.dtype)
        for i0, i1, i2, i3 in T.grid(t, k, m, n):
            with T.sblock("otf_rows"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                o1[v0, v2, v3, v1] = rows(v2, mq, sm, v3, v0, v1)
        for i0, i1, i2, i3 in T.grid(t, k, m, m):
            with T.sblock("otf_cols"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                yt[v0, v2, v3, v1] = cols(v3, o1, v0, v1, v2)
        for i0, i1, i2, i3 in T.grid(nb, k, oh, ow):
            with T.sblock("y_store"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                y[v0, v1, v2, v3] = (yt[(v0 * th + v2 // m) * tw + v3 // m, v2 % m, v3 % m, v1] * sx[0]
                                     + bias[v1])

    if debug:
        @T.prim_func(s_tir=True, private=True)
        def winoq_output_debug(mf: T.Buffer((p, t, k), "float32"), sx: T.Buffer((1,), "float32"),
                               bias: T.Buffer((k,), "float32"), mq: T.Buffer((p, t, k), mq_dt),
                               sm: T.Buffer((pm, tm, gm), "float32"),
                               y: T.Buffer((nb, k, oh, ow), "float32")):
            T.func_attr({"tirx.noalias": True})
            body(mf, sx, bias, mq, sm, y)

        return winoq_output_debug

    @T.prim_func(s_tir=True, private=True)
    def winoq_output(mf: T.Buffer((p, t, k), "float32"), sx: T.Buffer((1,), "float32"),
                     bias: T.Buffer((k,), "float32"), y: T.Buffer((nb, k, oh, ow), "float32")):
        T.func_attr({"tirx.noalias": True})
        # the quantized M as the float32 integers it holds (exact): no int8 round trip before the transform
        mq = T.sblock_alloc_buffer((p, t, k), "float32")
        sm = T.sblock_alloc_buffer((pm, tm, gm), "float32")
        body(mf, sx, bias, mq, sm, y)

    return winoq_output
