"""x86-64 schedules: the ``cpu`` family with the GEMM's int8 reduction on ``vpmaddwd`` / ``vpdpwssd``.

Everything but the GEMM's integer reduction is scheduled as in ``schedules/cpu.py`` (input/output
kernels, other operators, the GEMM's register blocking and its fma dequantization, see
:func:`cpu.schedule_packed_gemm`).  The reduction ``acc[t, k] += sum_c v_q[t, c] u_q[c, k]`` of one
channel group becomes a micro-kernel over pairs of input channels (a TIR tensor intrinsic registered
here; nothing for x86 int8 is registered upstream):

* ``u_q`` is repacked once per call to ``[P, Cp/2, K, 2]``: one ``L``-lane operand holds ``L`` output
  channels x 2 input channels, 2L bytes, sign-extended to int16 on load (``vpmovsxbw``);
* the two int8 ``v_q`` of a tile and channel pair are sign-extended and broadcast to every 32-bit lane;
* ``vpmaddwd`` multiplies the int16 pairs and adds each pair into one int32 lane, exactly (|v|, |u| <=
  128: no saturation, unlike ``vpmaddubsw``), and ``vpaddd`` accumulates.  On CPUs with AVX-512 VNNI
  LLVM fuses the two into ``vpdpwssd``.

``L`` = 8 (ymm, AVX2) or 16 (zmm, when the target has AVX-512 BW).  Register block: 4 tiles x ``2L``
output channels (8 accumulators).  Integer sums are exact in any order and the fma chain over groups
is untouched, so the results are bit-identical to the naive kernels.  Shapes the micro-kernel does not
cover (a partial last channel group, odd group sizes, ``K`` not a multiple of ``L``, no AVX2) get the
``cpu`` GEMM.
"""

from __future__ import annotations

from types import ModuleType

import tvm
from tvm import tirx
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

from tvm_winoq.relax.schedules import load_family

__all__ = ["PMADDWD_INTRIN", "gemm_lanes", "schedule_gemm", "schedule_other_ops", "schedule_winoq_kernels"]

_cpu: ModuleType = load_family("cpu")

PMADDWD_INTRIN = {8: "winoq_x86_pmaddwd_8x2_i8i8i32", 16: "winoq_x86_pmaddwd_16x2_i8i8i32"}
_LLVM = {8: "llvm.x86.avx2.pmadd.wd", 16: "llvm.x86.avx512.pmaddw.d.512"}


def _intrin(lanes: int) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """(description, implementation) of ``C[i] += sum_j A[j] * B[i, j]`` for ``lanes`` rows, j < 2."""
    wide, llvm = f"int16x{2 * lanes}", _LLVM[lanes]

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), "int8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 2), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            for i, j in T.grid(lanes, 2):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + T.Cast("int32", A[vj]) * T.Cast("int32", B[vi, vj])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), "int8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 2), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            C[T.ramp(0, 1, lanes)] = C.vload([0], f"int32x{lanes}") + T.call_llvm_pure_intrin(
                f"int32x{lanes}", llvm,
                T.reinterpret(wide, T.broadcast(
                    T.reinterpret("int32", T.Cast("int16x2", A.vload([0], "int8x2"))), lanes)),
                T.Cast(wide, B.vload([0, 0], f"int8x{2 * lanes}")),
            )

    return desc, impl


for _lanes, _name in PMADDWD_INTRIN.items():
    TensorIntrin.register(_name, *_intrin(_lanes), override=True)


def gemm_lanes(target: tvm.target.Target) -> int:
    """int32 lanes of the micro-kernel for ``target``: 16 (AVX-512 BW), 8 (AVX2) or 0 (neither)."""
    if codegen.target_has_features("avx512bw", target):
        return 16
    return 8 if codegen.target_has_features("avx2", target) else 0


def _microkernel(sch: Schedule, acc: object, loops: list, lanes: int) -> None:
    """Per channel pair: every tile of the block, every ``lanes`` output channels, one intrinsic."""
    *unit, ti, ki, rc = loops
    if unit:
        sch.reorder(*unit, ti)
    kb, kl = sch.split(ki, [None, lanes])
    cb, c2 = sch.split(rc, [None, 2])
    sch.reorder(cb, ti, kb, kl, c2)
    sch.decompose_reduction(acc, cb)
    sch.tensorize(kl, PMADDWD_INTRIN[lanes])
    sch.unroll(ti)
    sch.unroll(kb)
    sch.vectorize(sch.fuse(*sch.get_loops(sch.get_sblock("gemm_acc_init"))[-2:]))


def schedule_gemm(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """Schedule the ``gemm`` kernel with the ``vpmaddwd`` micro-kernel (else the ``cpu`` schedule)."""
    lanes = gemm_lanes(target)
    s = _cpu.gemm_shape(func)
    if not lanes or s["cp"] != s["c"] or s["k"] % lanes or s["gg"] % 2 or s["vbits"] != 8:
        return _cpu.schedule_gemm(func)
    tt = _cpu._divisor(s["t"], (4, 7, 5, 6, 3, 2))
    kk = 2 * lanes if s["k"] % (2 * lanes) == 0 else lanes
    return _cpu.schedule_packed_gemm(func, 2, tt, kk,
                                     lambda sch, acc, loops: _microkernel(sch, acc, loops, lanes))


def schedule_winoq_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule every ``winoq.kernel`` PrimFunc of ``mod``: ``cpu`` schedules, the GEMM tensorized."""
    return _cpu.schedule_kernels_with_gemm(mod, lambda func: schedule_gemm(func, target))


def schedule_other_ops(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Every other operator: the ``cpu`` family's generic schedules."""
    return _cpu.schedule_other_ops(mod, target)
