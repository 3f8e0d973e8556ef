"""The ``gemm`` TIR kernel of a quantized Winograd layer, and the compile-time packings of its ``U``.

Per Winograd position, ``acc[t, k] = sum_c v_q[t, c] u_q[c, k]`` per GEMM channel group (int8 x int8 ->
int32, exact), then the fma-chain dequantization over groups ``m_f = fma(acc, s_v * s_u, m_f)``
(``g`` in order: that is the bit-exactness contract, ``docs/integer_contract.md``).
:func:`tvm_winoq.relax.kernels.gemm_func` builds it from a layer's :class:`KernelSpec`; the target
families (``schedules/x86.py``, ``schedules/arm.py``) rebuild it with ``U`` packed at compile time
(:class:`UPacking`, :func:`pack_u`) for their micro-kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

__all__ = ["GemmShape", "UPacking", "block_scales", "clamp_index", "gemm_kernel", "pack_u"]


def clamp_index(index: tirx.PrimExpr, size: int, padded: int) -> tirx.PrimExpr:
    """``min(index, size - 1)`` when a partial last group pads the axis to ``padded`` (else ``index``).

    Re-reading the last channel is harmless for a max, and multiplies zero-padded ``U`` rows in the GEMM;
    it keeps the loop nests predicate-free (affine), which the schedules need.
    """
    return index if padded == size else tirx.min(index, size - 1)


@dataclass(frozen=True)
class GemmShape:
    """What a ``gemm`` kernel is made of: positions ``p``, tiles ``t``, channels ``c`` -> ``k``, GEMM
    groups (``ng`` of ``gg`` channels), V scale groups (``gv`` of ``gsv`` channels), ``v_q``'s dtype."""

    p: int
    t: int
    c: int
    k: int
    gg: int
    ng: int
    gv: int
    gsv: int
    vq_dtype: str


def gemm_kernel(s: GemmShape, debug: bool = False, widen: bool = False, u_pack: int = 0,
                u_kblock: int = 0, v_offset: int = 0) -> tirx.PrimFunc:
    """The ``gemm`` PrimFunc of shape ``s`` (see :func:`gemm_func`).

    ``widen`` (int8 ``v_q`` only) adds two elementwise stages, ``vq_wide`` and ``uq_wide``, that copy
    ``v_q`` and ``u_q`` to int16 before the reduction reads them (same values, same result): a schedule
    can then place them (a packed int16 ``U`` once per call, a block of ``V`` per register block) so its
    micro-kernel loads operands that need no sign extension (``schedules/x86.py``).

    ``u_pack = cw`` takes ``u_q`` already packed, ``[P, Cp/cw, K, cw]`` (:func:`pack_u`: ``cw`` input
    channels of one output channel contiguous), as a compile-time constant; with ``widen`` then only
    ``v_q`` is widened.  ``u_kblock = kb`` (with ``u_pack``) blocks the output channels too,
    ``[P, K/kb, Cp/cw, kb, cw]``: the ``U`` of one block of ``kb`` output channels is contiguous, so a
    schedule that walks a channel block over all input channels streams it (with ``[P, Cp/cw, K, cw]``
    it touched ``kb * cw`` bytes per ``K * cw``-byte row: at 512@7, where ``U`` is 9.4 MB and read once
    per call, a new page every few rows).  With ``kb`` the U scales ``s_u`` (and ``u_c``) come blocked the
    same way, ``[P, K/kb, Gg, kb]`` (:meth:`UPacking.scales`): a channel block's scales over all groups
    are one contiguous 4 * Gg * kb bytes (as ``[P, Gg, K]`` each group's ``kb`` scales were a new cache
    line ``4 * K`` bytes from the last, 20% of the GEMM's time at 512@7 spent waiting on them).

    ``v_offset = o`` (with ``u_pack``, int8 ``v_q``, no partial channel group, not ``debug``) is for an
    unsigned x signed micro-kernel such as ``vpdpbusd``: a ``vq_u8`` stage shifts ``v_q`` to ``uint8``
    ``v + o``, the reduction sums ``(v + o) * u``, and the kernel takes one more constant after ``s_u``,
    ``u_c`` [P, Gg, K] int32 = ``o`` x the sum of ``u`` over each channel group (:meth:`UPacking.
    extras`), so the dequantization reads ``acc - u_c``: the same integers.
    """
    p, t, c, k, gg, ng = s.p, s.t, s.c, s.k, s.gg, s.ng
    cp = gg * ng
    gv, gsv, vq_dt = s.gv, s.gsv, s.vq_dtype
    widen = widen and vq_dt == "int8"
    cw = u_pack or 1
    packed = u_pack > 0
    kb = u_kblock if packed and u_kblock else 0
    if kb and k % kb:
        raise ValueError(f"gemm_kernel: {k} output channels are not a multiple of the block {kb}")
    if v_offset and not (packed and vq_dt == "int8" and cp == c and not debug and not widen):
        raise ValueError("gemm_kernel: v_offset needs a packed U, int8 v_q, whole channel groups, no "
                         "widening and no debug outputs")
    offset = bool(v_offset)

    def s_at(buf: tirx.Buffer, pp: tirx.PrimExpr, g: tirx.PrimExpr, kk: tirx.PrimExpr) -> tirx.PrimExpr:
        return buf[pp, kk // kb, g, kk % kb] if kb else buf[pp, g, kk]

    def acc_at(acc: tirx.Buffer, uc: tirx.Buffer | None, pp: tirx.PrimExpr, tt: tirx.PrimExpr,
               kk: tirx.PrimExpr, g: tirx.PrimExpr) -> tirx.PrimExpr:
        return acc[pp, tt, kk, g] if uc is None else acc[pp, tt, kk, g] - s_at(uc, pp, g, kk)

    @T.macro
    def dequant(sv, su, acc, uc, mf):
        for i0, i1, i2, i3 in T.grid(p, t, k, ng):
            with T.sblock("gemm_dequant"):
                v0, v1, v2, v3 = T.axis.remap("SSSR", [i0, i1, i2, i3])
                with T.init():
                    mf[v0, v1, v2] = T.float32(0)
                mf[v0, v1, v2] = T.fma(
                    T.Cast("float32", acc_at(acc, uc, v0, v1, v2, v3)),
                    sv[v0, v1, (v3 * gg) // gsv] * s_at(su, v0, v3, v2), mf[v0, v1, v2])

    def u_at(ua: tirx.Buffer, pp: tirx.PrimExpr, cc: tirx.PrimExpr, kk: tirx.PrimExpr) -> tirx.PrimExpr:
        if kb:
            return ua[pp, kk // kb, cc // cw, kk % kb, cc % cw]
        return ua[pp, cc // cw, kk, cc % cw] if packed else ua[pp, cc, kk]

    @T.macro
    def reduce(va, ua, acc):
        for i0, i1, i2, i3, i4 in T.grid(p, t, k, ng, gg):
            with T.sblock("gemm_acc"):
                v0, v1, v2, v3, v4 = T.axis.remap("SSSSR", [i0, i1, i2, i3, i4])
                with T.init():
                    acc[v0, v1, v2, v3] = 0
                acc[v0, v1, v2, v3] = acc[v0, v1, v2, v3] + (
                    T.Cast("int32", va[v0, v1, clamp_index(v3 * gg + v4, c, cp)])
                    * T.Cast("int32", u_at(ua, v0, v3 * gg + v4, v2)))

    @T.macro
    def body(vq, sv, uq, su, acc, mf, uc):
        if offset:
            vu = T.sblock_alloc_buffer((p, t, c), "uint8")
            for i0, i1, i2 in T.grid(p, t, c):
                with T.sblock("vq_u8"):
                    v0, v1, v2 = T.axis.remap("SSS", [i0, i1, i2])
                    vu[v0, v1, v2] = T.Cast("uint8", T.Cast("int16", vq[v0, v1, v2]) + T.int16(v_offset))
            reduce(vu, uq, acc)
            dequant(sv, su, acc, uc, mf)
        else:
            if widen:
                vw = T.sblock_alloc_buffer((p, t, c), "int16")
                for i0, i1, i2 in T.grid(p, t, c):
                    with T.sblock("vq_wide"):
                        v0, v1, v2 = T.axis.remap("SSS", [i0, i1, i2])
                        vw[v0, v1, v2] = T.Cast("int16", vq[v0, v1, v2])
                if packed:
                    reduce(vw, uq, acc)
                else:
                    uw = T.sblock_alloc_buffer((p, cp, k), "int16")
                    for i0, i1, i2 in T.grid(p, cp, k):
                        with T.sblock("uq_wide"):
                            v0, v1, v2 = T.axis.remap("SSS", [i0, i1, i2])
                            uw[v0, v1, v2] = T.Cast("int16", uq[v0, v1, v2])
                    reduce(vw, uw, acc)
            else:
                reduce(vq, uq, acc)
            dequant(sv, su, acc, None, mf)

    u_shape = (p, k // kb, cp // cw, kb, cw) if kb else (p, cp // cw, k, cw) if packed else (p, cp, k)
    s_shape = (p, k // kb, ng, kb) if kb else (p, ng, k)
    if debug:
        @T.prim_func(s_tir=True, private=True)
        def winoq_gemm_debug(vq: T.Buffer((p, t, c), vq_dt), sv: T.Buffer((p, t, gv), "float32"),
                             uq: T.Buffer(u_shape, "int8"), su: T.Buffer(s_shape, "float32"),
                             acc: T.Buffer((p, t, k, ng), "int32"), mf: T.Buffer((p, t, k), "float32")):
            T.func_attr({"tirx.noalias": True})
            body(vq, sv, uq, su, acc, mf, None)

        return winoq_gemm_debug

    if offset:
        @T.prim_func(s_tir=True, private=True)
        def winoq_gemm_offset(vq: T.Buffer((p, t, c), vq_dt), sv: T.Buffer((p, t, gv), "float32"),
                              uq: T.Buffer(u_shape, "int8"), su: T.Buffer(s_shape, "float32"),
                              uc: T.Buffer(s_shape, "int32"), mf: T.Buffer((p, t, k), "float32")):
            T.func_attr({"tirx.noalias": True})
            acc = T.sblock_alloc_buffer((p, t, k, ng), "int32")
            body(vq, sv, uq, su, acc, mf, uc)

        return winoq_gemm_offset

    @T.prim_func(s_tir=True, private=True)
    def winoq_gemm(vq: T.Buffer((p, t, c), vq_dt), sv: T.Buffer((p, t, gv), "float32"),
                   uq: T.Buffer(u_shape, "int8"), su: T.Buffer(s_shape, "float32"),
                   mf: T.Buffer((p, t, k), "float32")):
        T.func_attr({"tirx.noalias": True})
        acc = T.sblock_alloc_buffer((p, t, k, ng), "int32")
        body(vq, sv, uq, su, acc, mf, None)

    return winoq_gemm


def pack_u(u_q: np.ndarray, cw: int, kb: int = 0) -> np.ndarray:
    """``u_q`` ``[P, Cp, K]`` -> ``[P, Cp/cw, K, cw]``, or with ``kb`` ``[P, K/kb, Cp/cw, kb, cw]`` (the
    layouts of ``gemm_kernel(..., u_pack=cw, u_kblock=kb)``)."""
    p, cp, k = u_q.shape
    if cp % cw:
        raise ValueError(f"pack_u: {cp} channels are not a multiple of {cw}")
    if kb and k % kb:
        raise ValueError(f"pack_u: {k} output channels are not a multiple of {kb}")
    packed = u_q.reshape(p, cp // cw, cw, k).transpose(0, 1, 3, 2)  # [P, Cp/cw, K, cw]
    if kb:
        packed = packed.reshape(p, cp // cw, k // kb, kb, cw).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(packed)


def block_scales(s: np.ndarray, kb: int) -> np.ndarray:
    """Per-group values ``[P, Gg, K]`` -> ``[P, K/kb, Gg, kb]`` (``kb`` = 0: unchanged), the layout of a
    ``gemm_kernel(..., u_kblock=kb)``'s ``s_u`` and ``u_c``."""
    if not kb:
        return s
    p, ng, k = s.shape
    if k % kb:
        raise ValueError(f"block_scales: {k} output channels are not a multiple of {kb}")
    return np.ascontiguousarray(s.reshape(p, ng, k // kb, kb).transpose(0, 2, 1, 3))


@dataclass(frozen=True)
class UPacking:
    """How a prepacked GEMM kernel takes its constant ``u_q``: packed by :func:`pack_u` (``cw``, ``kb``)
    and, with ``v_offset`` (``gemm_kernel(..., v_offset=...)``), followed by the constant ``u_c`` of
    channel groups of ``group``."""

    cw: int
    kb: int = 0
    v_offset: int = 0
    group: int = 0

    def __post_init__(self) -> None:
        if self.cw < 1 or self.kb < 0 or not 0 <= self.v_offset <= 255 or (self.v_offset and self.group < 1):
            raise ValueError(f"UPacking: bad packing {self}")

    def pack(self, u_q: np.ndarray) -> np.ndarray:
        """``u_q`` ``[P, Cp, K]`` in this layout (:func:`pack_u`)."""
        return pack_u(u_q, self.cw, self.kb)

    def scales(self, s_u: np.ndarray) -> np.ndarray:
        """``s_u`` ``[P, Gg, K]`` as the kernel reads it: ``[P, K/kb, Gg, kb]`` with ``kb``, else as it is."""
        return block_scales(s_u, self.kb)

    def extras(self, u_q: np.ndarray) -> list[np.ndarray]:
        """The constants the kernel takes after ``s_u``: with ``v_offset``, ``u_c`` int32 = ``v_offset`` x
        the sum of ``u_q`` over each ``group`` input channels, laid out as :meth:`scales`; else none."""
        if not self.v_offset:
            return []
        p, cp, k = u_q.shape
        group = self.group
        if cp % group:
            raise ValueError(f"UPacking: {cp} channels are not a multiple of the group {group}")
        sums = u_q.astype(np.int64).reshape(p, cp // group, group, k).sum(axis=2) * self.v_offset
        return [block_scales(sums.astype(np.int32), self.kb)]
