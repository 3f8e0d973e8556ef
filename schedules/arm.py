"""AArch64 schedules with the int8 dot-product extensions: the ``cpu`` family with a tensorized GEMM.

Everything but the GEMM's integer reduction is scheduled exactly as in ``schedules/cpu.py`` (loaded
with :func:`tvm_winoq.relax.schedules.load_family`): ``input``/``output`` kernels and the other
operators, and the GEMM's register blocking (``tt`` tiles x ``kk`` output channels per parallel task,
the channel-group loop ``g`` serial and in order, fma dequantization vectorized over ``kk``).  Only the
``acc[p, t, k, g] = sum_{c in g} v_q[p, t, c] * u_q[p, c, k]`` reduction is replaced, per channel group,
by one of two micro-kernels (TIR tensor intrinsics registered here):

* ``+dotprod`` -- ``SDOT``: ``acc[t, k0:k0+4] += sum_c v_q[t, c] U[k0:k0+4, c]``, each int32 lane one
  output channel, each 16-byte ``U`` operand 4 output x 4 input channels (``[k][c]``).  For groups
  that are a multiple of 16 channels the intrinsic covers 16 channels: one 16-byte load of ``v_q`` and
  four by-element ``sdot v.4s, u.16b, v.4b[lane]``; otherwise 4 channels, the 4 bytes of ``v_q``
  broadcast with ``ld1r``.  Register block: 4 tiles x 8 output channels (8 accumulators).
* ``+i8mm`` -- ``SMMLA``: ``acc[t0:t0+2, k0:k0+2] += V[t0:t0+2, c0:c0+8] U[k0:k0+2, c0:c0+8]^T``: two
  8-byte rows of ``v_q`` (two tiles, stride ``C``) form the 2x8 left operand, the 16-byte ``U`` operand
  holds 2 output channels x 8 input channels, the result is the row-major 2x2 (tile, channel) block.
  The accumulators are kept in that blocked layout (``[t/2, k/2, 2, 2]``); needs an even tile block.
  Register block: 4 tiles x 16 output channels (16 accumulators, 2 ``ldr d`` + 8 ``ldp q`` per 16
  ``smmla``); the fma dequantization reads the blocks back with ``zip`` shuffles.

``u_q`` arrives as ``[P, Cp, K]`` (output channels innermost, the layout :func:`~tvm_winoq.relax.kernels.
layer_constants` gives every target), so the GEMM kernel first repacks it into a scratch buffer
``[P, Cp/4, K, 4]`` (sdot) or ``[P, Cp/8, K, 8]`` (smmla) -- a ``cache_read`` whose layout is changed
with ``transform_layout`` -- parallel over positions, one pass over ``U`` per call.  The accumulator
tile is a compact ``[tt, kk]`` buffer per (position, tile block, channel block, group) with ``k``
innermost (``transform_layout`` of ``acc``; in the debug kernel, where ``acc`` is an output, a
``cache_write`` with the copy-out computed per group), so the accumulators live in registers.

The int8 ``direct`` kernel (any dense conv with ``K`` a multiple of 4) gets its weights packed at
compile time (:func:`prepack_direct`, ``[K/kb, KH, KW, C/4, kb, 4]``) and the ``SDOT`` micro-kernel
(:func:`schedule_direct`): one ``ld1r`` of an input quad per output column, one 16-byte load per 4
output channels; ``sdot`` is signed x signed, so unlike x86's ``vpdpbusd`` the input needs no offset.

The integer sums are exact in any order and the fma chain over groups is untouched, so the results
are bit-identical to the naive kernels.  Shapes the micro-kernels do not cover (a partial last channel
group, ``K`` or the group size not a multiple of 4, no dot-product feature) get the ``cpu`` GEMM; the
i8mm path falls back to sdot when the tile block is odd or the group size is not a multiple of 8.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import tvm
from tvm import tirx
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T

from tvm_winoq.relax.direct import DirectPacking, DirectSpec, packed_direct_func
from tvm_winoq.relax.schedules import load_family

__all__ = ["SDOT16_INTRIN", "SDOT_INTRIN", "SMMLA_INTRIN", "gemm_features", "prepack_direct",
           "schedule_direct", "schedule_gemm", "schedule_other_ops", "schedule_winoq_kernels",
           "tensorized_direct"]

_cpu: ModuleType = load_family("cpu")

SDOT_INTRIN = "winoq_arm_sdot_4x4_i8i8i32"
SDOT16_INTRIN = "winoq_arm_sdot_4x16_i8i8i32"
SMMLA_INTRIN = "winoq_arm_smmla_2x2x8_i8i8i32"


# ------------------------------------------------------------------------------------ intrinsics
# A: v_q (one tile: 4 or 16 channels; smmla: two tiles x 8 channels, row stride C), B: packed U
# ([k][c] 16-byte blocks; sdot16: 4 such blocks, one per 4-channel lane, stride K*4), C: int32
# accumulators (4 output channels; smmla: the row-major 2x2 (tile, channel) block).
@T.prim_func(s_tir=True)
def _sdot_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        for i, j in T.grid(4, 4):
            with T.sblock("update"):
                vi, vj = T.axis.remap("SR", [i, j])
                C[vi] = C[vi] + T.Cast("int32", A[vj]) * T.Cast("int32", B[vi, vj])


@T.prim_func(s_tir=True)
def _sdot_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        C[T.ramp(0, 1, 4)] = T.call_llvm_pure_intrin(
            "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8",
            C.vload([0], "int32x4"),
            B.vload([0, 0], "int8x16"),
            T.reinterpret("int8x16", T.broadcast(T.reinterpret("int32", A.vload([0], "int8x4")), 4)),
        )


@T.prim_func(s_tir=True)
def _sdot16_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    sb = T.int32()
    A = T.match_buffer(a, (16,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4, 4), "int8", strides=[sb, 4, 1], offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:16], B[0:4, 0:4, 0:4])
        T.writes(C[0:4])
        for i, j in T.grid(4, 16):
            with T.sblock("update"):
                vi, vj = T.axis.remap("SR", [i, j])
                C[vi] = C[vi] + T.Cast("int32", A[vj]) * T.Cast("int32", B[vj // 4, vi, vj % 4])


def _sdot_lanes(acc: tirx.PrimExpr, a: tirx.PrimExpr, b: tirx.Buffer) -> tirx.PrimExpr:
    """Four by-element SDOTs: ``acc += b[l] . a.4b[l]`` for the 4-byte lanes ``l`` of the int8x16 ``a``."""
    a32 = tirx.call_intrin("int32x4", "tirx.reinterpret", a)
    for lane in range(4):
        dup = tirx.Shuffle([a32], [tirx.const(lane, "int32")] * 4)
        acc = tirx.call_llvm_pure_intrin(
            "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc,
            b.vload([lane, 0, 0], "int8x16"), tirx.call_intrin("int8x16", "tirx.reinterpret", dup))
    return acc


@T.prim_func(s_tir=True)
def _sdot16_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    sb = T.int32()
    A = T.match_buffer(a, (16,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4, 4), "int8", strides=[sb, 4, 1], offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:16], B[0:4, 0:4, 0:4])
        T.writes(C[0:4])
        C[T.ramp(0, 1, 4)] = _sdot_lanes(C.vload([0], "int32x4"), A.vload([0], "int8x16"), B)


@T.prim_func(s_tir=True)
def _smmla_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    sa = T.int32()
    A = T.match_buffer(a, (2, 8), "int8", strides=[sa, 1], offset_factor=1)
    B = T.match_buffer(b, (2, 8), "int8", offset_factor=1)
    C = T.match_buffer(c, (2, 2), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
        T.writes(C[0:2, 0:2])
        for i, j, r in T.grid(2, 2, 8):
            with T.sblock("update"):
                vi, vj, vl = T.axis.remap("SSR", [i, j, r])
                C[vi, vj] = C[vi, vj] + T.Cast("int32", A[vi, vl]) * T.Cast("int32", B[vj, vl])


def _concat8(lo: tirx.PrimExpr, hi: tirx.PrimExpr) -> tirx.PrimExpr:
    """``int8x16`` from two ``int8x8`` halves."""
    return tirx.Shuffle([lo, hi], [tirx.const(i, "int32") for i in range(16)])


@T.prim_func(s_tir=True)
def _smmla_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    sa = T.int32()
    A = T.match_buffer(a, (2, 8), "int8", strides=[sa, 1], offset_factor=1)
    B = T.match_buffer(b, (2, 8), "int8", offset_factor=1)
    C = T.match_buffer(c, (2, 2), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
        T.writes(C[0:2, 0:2])
        C[0, T.ramp(0, 1, 4)] = T.call_llvm_pure_intrin(
            "int32x4", "llvm.aarch64.neon.smmla.v4i32.v16i8",
            C.vload([0, 0], "int32x4"),
            _concat8(A.vload([0, 0], "int8x8"), A.vload([1, 0], "int8x8")),
            B.vload([0, 0], "int8x16"),
        )


def _register() -> None:
    TensorIntrin.register(SDOT_INTRIN, _sdot_desc, _sdot_impl, override=True)
    TensorIntrin.register(SDOT16_INTRIN, _sdot16_desc, _sdot16_impl, override=True)
    TensorIntrin.register(SMMLA_INTRIN, _smmla_desc, _smmla_impl, override=True)


_register()


# ------------------------------------------------------------------------------------------- gemm
def gemm_features(target: tvm.target.Target) -> tuple[bool, bool]:
    """``(dotprod, i8mm)`` of an LLVM ``target`` (TVM's Arm feature flags, or ``mattr``)."""
    attrs = {str(a) for a in target.attrs.get("mattr", [])}
    feats: Any = getattr(target, "features", None)
    dot = bool(getattr(feats, "has_dotprod", False)) or "+dotprod" in attrs
    mm = bool(getattr(feats, "has_matmul_i8", False)) or "+i8mm" in attrs
    return dot or mm, mm


def _extent(sch: Schedule, loop: object) -> int:
    return int(sch.get(loop).extent)


def _tile_t(t: int, smmla: bool) -> int:
    """Tiles per register block (even for smmla)."""
    cands = (4, 6, 2) if smmla else (4, 7, 5, 6, 3, 2)
    return _cpu._divisor(t, cands)


def _microkernel(sch: Schedule, acc: object, loops: list, smmla: bool) -> None:
    """Tensorize one group of ``acc``: ``loops`` = (unit loops..., tiles, channels, reduction)."""
    *unit, ti, ki, rc = loops
    if unit:
        sch.reorder(*unit, ti)
    if smmla:
        t2, tp = sch.split(ti, [None, 2])
        k2, kp = sch.split(ki, [None, 2])
        cb, c8 = sch.split(rc, [None, 8])
        sch.reorder(cb, t2, k2, tp, kp, c8)
        sch.decompose_reduction(acc, cb)
        sch.tensorize(tp, SMMLA_INTRIN)
        sch.unroll(t2)
        sch.unroll(k2)
    else:
        wide = _extent(sch, rc) % 16 == 0  # 16 channels: one V load, four by-element sdots
        kb, k4 = sch.split(ki, [None, 4])
        cb, c4 = sch.split(rc, [None, 16 if wide else 4])
        if wide:  # per U block all tiles (the 4 U vectors of a lane set stay in registers)
            sch.reorder(cb, kb, ti, k4, c4)
        else:
            sch.reorder(cb, ti, kb, k4, c4)
        sch.decompose_reduction(acc, cb)
        sch.tensorize(k4, SDOT16_INTRIN if wide else SDOT_INTRIN)
        sch.unroll(ti)
        sch.unroll(kb)
    init = sch.get_loops(sch.get_sblock("gemm_acc_init"))
    if smmla:
        sch.vectorize(sch.fuse(*init[-4:]))
    else:
        sch.vectorize(sch.fuse(*init[-2:]))


def schedule_gemm(func: tirx.PrimFunc, target: tvm.target.Target, lanes: int | None = None) -> tirx.PrimFunc:
    """Schedule the ``gemm`` kernel with the sdot/smmla micro-kernel (``cpu`` schedule where unsupported).

    ``lanes`` output channels per register block (default 8 for sdot, 16 for smmla: 16 int32x4
    accumulators either way, the fastest choices under ``llvm-mca``).
    """
    dot, mm = gemm_features(target)
    s = _cpu.gemm_shape(func)
    if not dot or s["cp"] != s["c"] or s["k"] % 4 or s["gg"] % 4 or s["vbits"] != 8:
        return _cpu.schedule_gemm(func)
    tt = _tile_t(s["t"], mm)
    smmla = mm and tt % 2 == 0 and s["gg"] % 8 == 0
    if not smmla:
        tt = _tile_t(s["t"], False)
    lanes = lanes or (16 if smmla else 8)
    kk = s["k"] if s["k"] <= lanes else _cpu._divisor(s["k"], (lanes, 8, 4))
    layout = (lambda p, t, k, g: (p, g, t // 2, k // 2, t % 2, k % 2)) if smmla else None
    return _cpu.schedule_packed_gemm(func, 8 if smmla else 4, tt, kk,
                                     lambda sch, acc, loops: _microkernel(sch, acc, loops, smmla), layout)


# ----------------------------------------------------------------------------------------- direct
def tensorized_direct(target: tvm.target.Target) -> bool:
    """Whether :func:`schedule_direct` runs dense direct convs on the ``sdot`` micro-kernel (``+dotprod``
    or ``+i8mm``)."""
    return gemm_features(target)[0]


_DIRECT_ACCUMULATORS = 24  # of the 32 vector registers: the rest hold 4 weight vectors and the inputs


def _direct_block(spec: DirectSpec) -> int:
    """Output channels per register block (16, 8 or 4; 0 if ``K`` is not a multiple of 4): the one whose
    register tile holds the most accumulators, the wider on a tie (14 columns: 8 channels x 7 columns,
    not 16 x 2; :func:`cpu.packed_direct_block`)."""
    return _cpu.packed_direct_block(spec.out_w, spec.out_channels, (16, 8, 4), 4, _DIRECT_ACCUMULATORS)


def prepack_direct(func: tirx.PrimFunc,
                   target: tvm.target.Target) -> tuple[tirx.PrimFunc, DirectPacking] | None:
    """``(kernel, packing)``: the plain direct kernel ``func`` rebuilt on weights packed at compile time
    for the ``sdot`` micro-kernel (:func:`~tvm_winoq.relax.direct.packed_direct_func`: quads of input
    channels, blocks of 16/8/4 output channels; ``sdot`` is signed x signed, so the input stays ``int8``
    and no offset is subtracted); ``None`` without the dot product, for grouped convs, ``K`` not a
    multiple of 4, or anything but the plain kernel."""
    spec = DirectSpec.of_func(func)
    kb = _direct_block(spec) if spec is not None and tensorized_direct(target) else 0
    if not kb:
        return None
    packing = DirectPacking(kb, x_offset=0)
    if not packing.fits(spec):
        return None
    return _cpu.with_attrs_of(packed_direct_func(spec, packing), func), packing


def schedule_direct(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """Schedule a ``direct`` kernel: the packed one (:func:`prepack_direct`) on the ``sdot`` micro-kernel
    (:func:`cpu.schedule_packed_direct`: one ``ld1r`` of an input quad per column, one 16-byte weight
    load per 4 output channels, at most 24 of the 32 vector registers as accumulators, e.g. 6 columns x
    16 channels or 7 x 8), any other with the ``cpu`` schedule."""
    if len(func.params) != 6:
        return _cpu.schedule_direct(func)
    return _cpu.schedule_packed_direct(func, 4, SDOT_INTRIN, _DIRECT_ACCUMULATORS)


# ------------------------------------------------------------------------------------- entry points
def schedule_winoq_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule every ``winoq.kernel`` PrimFunc of ``mod``: ``cpu`` schedules, the GEMM and the packed
    direct kernel tensorized."""
    return _cpu.schedule_kernels_with_gemm(mod, lambda func: schedule_gemm(func, target),
                                           lambda func: schedule_direct(func, target))


def schedule_other_ops(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Every other operator: the ``cpu`` family's generic schedules."""
    return _cpu.schedule_other_ops(mod, target)
