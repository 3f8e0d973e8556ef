"""x86-64 schedules: the ``cpu`` family with the GEMM's int8 reduction on ``vpmaddwd`` / ``vpdpbusd``.

Everything but the GEMM's integer reduction is scheduled as in ``schedules/cpu.py`` (input/output
kernels, other operators, the GEMM's register blocking and its fma dequantization, see
:func:`cpu.schedule_packed_gemm`).  The reduction ``acc[t, k] += sum_c v_q[t, c] u_q[c, k]`` of one
channel group becomes a micro-kernel over pairs of input channels (a TIR tensor intrinsic registered
here; nothing for x86 int8 is registered upstream):

* ``u_q`` is packed to ``[P, K/kb, Cp/2, kb, 2]`` (one ``L``-lane operand = ``L`` output channels x 2
  input channels, sign-extended on load; ``kb`` = the register block's channels) at compile time:
  :func:`prepack_gemm` is this family's hook for :class:`tvm_winoq.relax.prepack.PrepackWeights`,
  which packs the constant with NumPy.  Packing per
  call read and wrote all of ``U`` on every call (most of the GEMM's time at 512@7, 4 tiles).  A GEMM
  whose ``U`` is not a constant is rebuilt by :func:`widen_gemm` to pack ``U`` to int16 once per call;
* ``v_q`` is widened to int16 per register block of tiles (all channels, while it is in L1; the
  ``vq_wide`` stage of :func:`tvm_winoq.relax.gemm.gemm_kernel`, same values, the rebuilt kernel
  checked to be the generator's), so the pair of a tile is one 32-bit broadcast from memory (a
  load-port ``vpbroadcastd``; sign-extending int8 pairs in the loop cost two shuffle uops per pair,
  the port-5 bottleneck that made this GEMM ~1.7x slower at 64@56);
* ``vpmaddwd`` multiplies the int16 pairs and adds each pair into one int32 lane, exactly (|v|, |u| <=
  128: no saturation, unlike ``vpmaddubsw``), and ``vpaddd`` accumulates.  On CPUs with AVX-512 VNNI
  LLVM fuses the two into ``vpdpwssd``.

With AVX-512 VNNI a GEMM on a constant ``U`` instead runs on ``vpdpbusd`` (u8 x s8, four input
channels per lane, 64 multiply-adds per instruction): ``U`` is packed in quads at compile time
(``[P, K/kb, Cp/4, kb, 4]``), ``V`` is shifted to ``uint8`` ``v + 128`` per tile block (the unsigned
operand, broadcast), and the dequantization subtracts ``128 * sum(u)`` per channel group, a
compile-time int32 constant ``u_c`` (``gemm_kernel(..., v_offset=128)``): the same integers, about
twice the ``vpdpwssd`` kernel's speed (320@64: 16.0 -> 7.5 ms).

The int8 direct kernel gets the same treatment on AVX-512 VNNI (:func:`prepack_direct`,
:func:`schedule_direct`): weights packed at compile time in quads of input channels per block of output
channels, the input quantized to ``uint8`` ``q + 128``, ``128 * sum(w)`` subtracted per output channel
in the dequantization (:func:`tvm_winoq.relax.direct.packed_direct_func`).  Without VNNI (AVX2) the
direct kernel is packed in pairs of input channels instead, the input stored as ``int16`` (a pair is one
32-bit broadcast) and reduced on ``vpmaddwd`` with the weights sign-extended on load: 1.5-2.6x faster
than the ``cpu`` schedule's direct kernel on a Zen 3 (strided and 1x1 convs, ResNet's 7x7 stem), the
same integers.

``L`` = 8 (ymm, AVX2) or 16 (zmm, when the target has AVX-512 BW).  Register block: 4 tiles x ``2L``
output channels (8 accumulators), or another divisor of the tiles (7 at 28x28); one vector of channels
where two would not stay in registers (:func:`register_block`).  Integer sums are exact in any order
and the fma chain over groups is untouched, so the results are bit-identical to the naive kernels.
Shapes the micro-kernel does not cover (a partial last channel group, odd group sizes, ``K`` not a
multiple of ``L``, no AVX2) get the ``cpu`` GEMM.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

from tvm_winoq.relax.direct import DirectPacking, DirectSpec, packed_direct_func
from tvm_winoq.relax.gemm import GemmShape, UPacking, gemm_kernel
from tvm_winoq.relax.schedules import load_family

__all__ = ["PMADDWD_INTRIN", "VPDPBUSD_INTRIN", "gemm_lanes", "prepack_direct", "prepack_gemm",
           "schedule_direct", "schedule_gemm", "schedule_other_ops", "schedule_winoq_kernels",
           "tensorized_direct", "vnni", "widen_gemm"]

_cpu: ModuleType = load_family("cpu")

PMADDWD_INTRIN = {8: "winoq_x86_pmaddwd_8x2_i8i8i32", 16: "winoq_x86_pmaddwd_16x2_i8i8i32"}
PMADDWD16_INTRIN = {8: "winoq_x86_pmaddwd_8x2_i16i16i32", 16: "winoq_x86_pmaddwd_16x2_i16i16i32"}
PMADDWD16x8_INTRIN = {8: "winoq_x86_pmaddwd_8x2_i16i8i32", 16: "winoq_x86_pmaddwd_16x2_i16i8i32"}
_LLVM = {8: "llvm.x86.avx2.pmadd.wd", 16: "llvm.x86.avx512.pmaddw.d.512"}
VPDPBUSD_INTRIN = {8: "winoq_x86_vpdpbusd_8x4_u8i8i32", 16: "winoq_x86_vpdpbusd_16x4_u8i8i32"}
_LLVM_DPBUSD = {8: "llvm.x86.avx512.vpdpbusd.256", 16: "llvm.x86.avx512.vpdpbusd.512"}
V_OFFSET = 128  # the VNNI kernels' unsigned V: v + 128


def _dot_intrin(lanes: int, width: int, a_dtype: str, b_dtype: str,
                value: Callable[[tirx.Buffer, tirx.Buffer, tirx.Buffer], tirx.PrimExpr],
                ) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """(description, implementation) of ``C[i] += sum_j A[j] * B[i, j]`` for ``lanes`` int32 rows,
    ``j < width``; the implementation stores ``value(A, B, C)`` (one ``lanes``-wide vector) to ``C``."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (width,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, width), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:width], B[0:lanes, 0:width])
            T.writes(C[0:lanes])
            for i, j in T.grid(lanes, width):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + T.Cast("int32", A[vj]) * T.Cast("int32", B[vi, vj])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (width,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, width), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:width], B[0:lanes, 0:width])
            T.writes(C[0:lanes])
            C[T.ramp(0, 1, lanes)] = value(A, B, C)

    return desc, impl


def _intrin(lanes: int, a_dtype: str = "int8", b_dtype: str = "int8") -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """``vpmaddwd`` + ``vpaddd``: ``j < 2``.

    Operand dtypes ``int8`` (sign-extended on load) or ``int16`` (loaded as they are: an int16 ``A``
    pair is one 32-bit broadcast from memory, no shuffle)."""
    wide, llvm = f"int16x{2 * lanes}", _LLVM[lanes]

    def a_pair(A: tirx.Buffer) -> tirx.PrimExpr:
        if a_dtype == "int16":
            return T.reinterpret("int32", A.vload([0], "int16x2"))
        return T.reinterpret("int32", T.Cast("int16x2", A.vload([0], "int8x2")))

    def b_rows(B: tirx.Buffer) -> tirx.PrimExpr:
        if b_dtype == "int16":
            return B.vload([0, 0], wide)
        return T.Cast(wide, B.vload([0, 0], f"int8x{2 * lanes}"))

    def value(A: tirx.Buffer, B: tirx.Buffer, C: tirx.Buffer) -> tirx.PrimExpr:
        return C.vload([0], f"int32x{lanes}") + T.call_llvm_pure_intrin(
            f"int32x{lanes}", llvm, T.reinterpret(wide, T.broadcast(a_pair(A), lanes)), b_rows(B))

    return _dot_intrin(lanes, 2, a_dtype, b_dtype, value)


def _dpbusd_intrin(lanes: int) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """``vpdpbusd``: ``j < 4``, ``A`` uint8, ``B`` int8 (the 4 bytes of ``A`` broadcast to every lane;
    products of a u8 and an s8 summed in 4s into int32 lanes, exactly, no saturation).  LLVM >= 21
    types the multiplicands ``<4L x i8>`` (upstream TVM's ``dot_16x4_vnni`` still passes ``<L x i32>``
    and fails LLVM's verifier with TVM 0.27's LLVM 22)."""
    bytes_ = f"int8x{4 * lanes}"

    def value(A: tirx.Buffer, B: tirx.Buffer, C: tirx.Buffer) -> tirx.PrimExpr:
        a = T.reinterpret(bytes_, T.broadcast(T.reinterpret("int32", A.vload([0], "uint8x4")), lanes))
        return T.call_llvm_pure_intrin(f"int32x{lanes}", _LLVM_DPBUSD[lanes], C.vload([0], f"int32x{lanes}"),
                                       a, B.vload([0, 0], bytes_))

    return _dot_intrin(lanes, 4, "uint8", "int8", value)


for _lanes in PMADDWD_INTRIN:
    TensorIntrin.register(PMADDWD_INTRIN[_lanes], *_intrin(_lanes), override=True)
    TensorIntrin.register(PMADDWD16_INTRIN[_lanes], *_intrin(_lanes, "int16", "int16"), override=True)
    TensorIntrin.register(PMADDWD16x8_INTRIN[_lanes], *_intrin(_lanes, "int16", "int8"), override=True)
    TensorIntrin.register(VPDPBUSD_INTRIN[_lanes], *_dpbusd_intrin(_lanes), override=True)


def gemm_lanes(target: tvm.target.Target) -> int:
    """int32 lanes of the micro-kernel for ``target``: 16 (AVX-512 BW), 8 (AVX2) or 0 (neither)."""
    if codegen.target_has_features("avx512bw", target):
        return 16
    return 8 if codegen.target_has_features("avx2", target) else 0


def _microkernel(sch: Schedule, acc: object, loops: list, lanes: int, intrin: str, cw: int = 2) -> None:
    """Per ``cw`` input channels: every tile of the block, every ``lanes`` output channels, one
    intrinsic."""
    *unit, ti, ki, rc = loops
    if unit:
        sch.reorder(*unit, ti)
    kb, kl = sch.split(ki, [None, lanes])
    cb, c2 = sch.split(rc, [None, cw])
    sch.reorder(cb, ti, kb, kl, c2)
    sch.decompose_reduction(acc, cb)
    sch.tensorize(kl, intrin)
    sch.unroll(ti)
    sch.unroll(kb)
    sch.vectorize(sch.fuse(*sch.get_loops(sch.get_sblock("gemm_acc_init"))[-2:]))


def schedule_gemm(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """Schedule the ``gemm`` kernel with the ``vpmaddwd`` micro-kernel (else the ``cpu`` schedule).

    A kernel from :func:`prepack_gemm` (``u_q`` packed at compile time) reads ``U`` as it is: int8
    pairs (``vpmaddwd`` on int16 ``V``) or unsigned quads (``vpdpbusd`` on int8 ``V``, AVX-512 VNNI);
    any other one is widened by :func:`widen_gemm` (``U`` packed to int16 once per call) where it can be.
    """
    lanes = gemm_lanes(target)
    s = _cpu.gemm_shape(func)
    if not _fits(s, lanes):
        return _cpu.schedule_gemm(func)
    tt, kk = register_block(s["t"], s["k"], lanes)
    cw = 2
    if func.params[4].name == "uc":  # gemm_kernel(v_offset=): V + 128, U in quads (prepack_gemm, VNNI)
        intrin, cw = VPDPBUSD_INTRIN[lanes], 4
    elif len(func.params[2].shape) != 3:  # U packed at compile time (int8, pairs of channels), int16 V
        intrin = PMADDWD16x8_INTRIN[lanes]
    else:
        widened = widen_gemm(func)
        intrin = (PMADDWD_INTRIN if widened is None else PMADDWD16_INTRIN)[lanes]
        func = widened or func
    return _cpu.schedule_packed_gemm(
        func, 2, tt, kk, lambda sch, acc, loops: _microkernel(sch, acc, loops, lanes, intrin, cw))


def _k_block(k: int, lanes: int) -> int:
    """Output channels per register block: two vectors where ``k`` allows, else one."""
    return 2 * lanes if k % (2 * lanes) == 0 else lanes


_GEMM_ACCUMULATORS = {8: 12, 16: 28}  # int32 accumulators that stay in registers: 16 ymm / 32 zmm


def register_block(t: int, k: int, lanes: int) -> tuple[int, int]:
    """``(tiles, output channels)`` of the GEMM's register block: 4 (or 7, 5, ...: a divisor of ``t``)
    tiles x two vectors of channels, one vector where two would need more accumulators than there are
    registers (7 tiles x 2 ymm = 14 + 2 ``U`` + 1 broadcast > 16: two accumulators spilled, reloaded
    and stored on every pair of channels; 128@28 on a Zen 3: 0.53 -> 0.48 ms).  Square tile counts
    without a small divisor get their side (F(6,3) at 64x64: 11 x 11 tiles, 11 per block; one tile per
    block was 16.7 ms of GEMM at 320@64, 11 are 14.2)."""
    tt = _cpu._divisor(t, (4, 7, 5, 6, 3, 11, 9, 10, 12, 8, 2))
    kk = _k_block(k, lanes)
    if tt * kk // lanes > _GEMM_ACCUMULATORS[lanes]:
        kk = lanes
    return tt, kk


def _fits(s: dict[str, int], lanes: int) -> bool:
    """Whether the micro-kernel covers a GEMM of shape ``s`` (:func:`cpu.gemm_shape`)."""
    return bool(lanes) and s["cp"] == s["c"] and s["k"] % lanes == 0 and s["gg"] % 2 == 0 and s["vbits"] == 8


def vnni(target: tvm.target.Target) -> bool:
    """Whether ``target`` has AVX-512 VNNI on zmm (the ``vpdpbusd`` micro-kernel)."""
    return gemm_lanes(target) == 16 and codegen.target_has_features("avx512vnni", target)


def prepack_gemm(func: tirx.PrimFunc, target: tvm.target.Target) -> tuple[tirx.PrimFunc, UPacking] | None:
    """``(kernel, packing)``: ``func`` taking ``u_q`` packed at compile time as ``[P, K/kb, Cp/cw, kb, cw]``
    (:class:`~tvm_winoq.relax.gemm.UPacking`, ``kb`` = the register block's output channels, so each
    block's ``U`` is one contiguous stream); ``None`` where the micro-kernel does not apply (then ``U``
    is packed per call, or not at all).

    With AVX-512 VNNI (and groups of a multiple of 4 channels) ``U`` is packed in quads of input
    channels for ``vpdpbusd`` (unsigned x signed bytes: the kernel shifts ``V`` to ``uint8`` ``v + 128``
    per tile block and subtracts the compile-time ``128 * sum(u)`` per group, exactly); otherwise in
    int8 pairs for ``vpmaddwd``, ``v_q`` widened to int16 per tile block.

    Packing per call reads and writes all of ``U`` (36 x C x K bytes for F(4,3)) on every call: at 512@7
    (4 tiles) that is most of the GEMM's time.
    """
    if len(func.params) != 5 or len(func.params[2].shape) != 3:
        return None
    shape = _plain_shape(func)  # None for anything but our plain kernel, e.g. a tuned (scheduled) one
    if shape is None or not _fits(_cpu.gemm_shape(func), gemm_lanes(target)):
        return None
    _, kb = register_block(shape.t, shape.k, gemm_lanes(target))
    if vnni(target) and shape.gg % 4 == 0:
        packing = UPacking(4, kb, V_OFFSET, shape.gg)
        kernel = gemm_kernel(shape, u_pack=4, u_kblock=kb, v_offset=V_OFFSET)
    else:
        packing = UPacking(2, kb)
        kernel = gemm_kernel(shape, widen=True, u_pack=2, u_kblock=kb)
    return _cpu.with_attrs_of(kernel, func), packing


def _v_scale_group(func: tirx.PrimFunc) -> int | None:
    """``gsv`` of the dequantization ``fma(acc, s_v[p, t, (g * gg) // gsv] * s_u[..], m_f)``."""
    try:
        sch = Schedule(func)
        body = sch.get(sch.get_sblock("gemm_dequant")).body
        load = body.value.args[1].a
        idx = load.indices[2]
        if load.source.name == "sv" and type(idx).__name__ == "FloorDiv":
            return int(idx.b.value)
    except Exception:  # noqa: BLE001 - any other structure: not widened
        return None
    return None


def _plain_shape(func: tirx.PrimFunc) -> GemmShape | None:
    """The :class:`GemmShape` whose plain kernel ``func`` is (``None`` if it is not exactly that).

    The shape is read back from ``func`` (the V scale group from the dequantization's ``s_v`` index)
    and the kernel rebuilt from it must equal ``func`` structurally: a rebuilt variant then computes
    the same thing.
    """
    gsv = _v_scale_group(func)
    try:
        s = _cpu.gemm_shape(func)
    except Exception:  # noqa: BLE001 - not a gemm kernel of ours
        return None
    if gsv is None or len(func.params[2].shape) != 3:
        return None
    sv, vq = func.params[1], func.params[0]
    shape = GemmShape(s["p"], s["t"], s["c"], s["k"], s["gg"], s["ng"], int(sv.shape[2]), gsv,
                      str(vq.dtype))
    plain = _cpu.with_attrs_of(gemm_kernel(shape, len(func.params) == 6), func)
    return shape if tvm_ffi.structural_equal(plain, func) else None


def widen_gemm(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` rebuilt with the int16 ``vq_wide``/``uq_wide`` stages (``None`` if it cannot be, see
    :func:`_plain_shape`)."""
    shape = _plain_shape(func)
    if shape is None:
        return None
    return _cpu.with_attrs_of(gemm_kernel(shape, len(func.params) == 6, widen=True), func)


def tensorized_direct(target: tvm.target.Target) -> bool:
    """Whether int8 direct can beat Winograd on ``target``, so ``winoq compile``'s ``measure`` phase is
    worth its two builds: with AVX-512 VNNI (``vpdpbusd``, 64 multiply-adds per instruction).  The
    ``vpmaddwd`` direct kernel of AVX2 (16 per instruction, the Winograd GEMM's own rate) lost to F(4,3)
    on every 3x3 stride-1 layer measured on a Zen 3 (512@7: 3.2 vs 2.1 ms); it serves the layers that are
    direct anyway (strided, 1x1, ``--ineligible direct``, named ``direct``)."""
    return vnni(target)


_PAIR_ACCUMULATORS = {8: 12, 16: 24}  # ymm / zmm accumulators of the vpmaddwd direct kernel


def _pair_block(spec: DirectSpec, lanes: int) -> int:
    """Output channels per register block of the ``vpmaddwd`` direct kernel (4, 2 or 1 vectors; 0 if
    ``K`` is not a multiple of the lanes), as many accumulators as fit (7 columns: 8 channels x 7 columns
    on AVX2, not 16 x 1; :func:`cpu.packed_direct_block`)."""
    return _cpu.packed_direct_block(spec.out_w, spec.out_channels, (4 * lanes, 2 * lanes, lanes), lanes,
                                    _PAIR_ACCUMULATORS[lanes])


def prepack_direct(func: tirx.PrimFunc,
                   target: tvm.target.Target) -> tuple[tirx.PrimFunc, DirectPacking] | None:
    """``(kernel, packing)``: the plain direct kernel ``func`` rebuilt on weights packed at compile time
    (:func:`~tvm_winoq.relax.direct.packed_direct_func`): with AVX-512 VNNI for ``vpdpbusd`` (quads of
    input channels, blocks of ``kb`` output channels, the input shifted to ``uint8``), else for
    ``vpmaddwd`` (pairs of input channels, the input stored as ``int16``, the weights sign-extended on
    load); ``None`` without AVX2, for grouped convs, channels that do not fit, or anything but the plain
    kernel."""
    spec = DirectSpec.of_func(func)
    lanes = gemm_lanes(target)
    if spec is None or not lanes:
        return None
    if vnni(target):
        packing = DirectPacking(_k_block(spec.out_channels, lanes))  # a multiple of the lanes
    elif kb := _pair_block(spec, lanes):
        packing = DirectPacking(kb, x_offset=0, cw=2)
    else:
        return None
    if not packing.fits(spec):
        return None
    return _cpu.with_attrs_of(packed_direct_func(spec, packing), func), packing


def schedule_direct(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """Schedule a ``direct`` kernel: the packed one (:func:`prepack_direct`) on its micro-kernel
    (:func:`cpu.schedule_packed_direct`: ``vpdpbusd`` on quads, up to 8 columns x 32 channels in 16 zmm
    accumulators; or ``vpmaddwd`` on pairs, at most 12 ymm / 24 zmm accumulators), any other with the
    ``cpu`` schedule."""
    if len(func.params) != 6:
        return _cpu.schedule_direct(func)
    lanes = gemm_lanes(target)
    if int(func.params[1].shape[-1]) == 2:  # pairs: int16 input x int8 weights
        return _cpu.schedule_packed_direct(func, lanes, PMADDWD16x8_INTRIN[lanes], _PAIR_ACCUMULATORS[lanes])
    return _cpu.schedule_packed_direct(func, lanes, VPDPBUSD_INTRIN[lanes], 16)


def schedule_winoq_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule every ``winoq.kernel`` PrimFunc of ``mod``: ``cpu`` schedules, the GEMM and the packed
    direct kernel tensorized."""
    return _cpu.schedule_kernels_with_gemm(mod, lambda func: schedule_gemm(func, target),
                                           lambda func: schedule_direct(func, target))


def schedule_other_ops(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Every other operator: the ``cpu`` family's generic schedules."""
    return _cpu.schedule_other_ops(mod, target)
