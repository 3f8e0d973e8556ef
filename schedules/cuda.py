"""CUDA schedules: the Winograd kernels bound to blocks/threads (GEMM on ``__dp4a``), dlight for the rest.

Every stage becomes either its own kernel launch (a root-level loop nest bound to ``blockIdx.x`` x
``threadIdx.x``, so stages communicate through global memory in launch order) or runs entirely inside
one thread; no thread reads what another thread of the same launch wrote, so no barriers are needed.

* ``input``: per-tensor ``|x|`` max as up to 1024 partial maxima (``rfactor``, one thread each)
  folded by one thread (no cross-thread reduction: for this block TVM 0.27 put its in-thread buffer
  in global memory, shared by all threads), the input scale, the quantize/pad loop nest; then one
  thread per (transform row ``i``, tile, V channel group) -- the row, on which the transform's
  ``Select`` branches, uniform across a warp -- computes the row and column transforms of its ``n``
  positions x ``group`` channels in local memory, their group absmaxes, the V scales and V itself
  (needs whole V groups, ``C % group == 0``; otherwise one thread per tile).  ``V_s`` is re-laid out
  by position so that these per-thread regions are exact.
* ``gemm``: ``u_q`` [P, Cp, K] is repacked once per call into [P, Cp/4, K, 4] (4 input channels of an
  output channel contiguous); one thread per (position, ``tt`` tiles, output channel), consecutive
  threads on consecutive output channels (coalesced ``U`` words, broadcast ``V`` words); per channel
  group (serial, in order) ``tt`` int32 accumulators in registers, each 4-channel step one ``__dp4a``
  (a TIR tensor intrinsic), then the fma dequantization into ``tt`` register floats, stored once at
  the end.  The debug kernel (``acc`` is an output)
  accumulates per (p, t, k, g) thread and dequantizes in a second launch.
* ``output``: every stage (M absmax lanes, absmax, scale, quantize, both transform stages, NCHW store)
  its own launch over its spatial iterations; reductions serial per thread, in the kernel's order.
* ``direct`` (int8 direct convolution): input quantization as in ``input``, one thread per output
  element, the dequantization its own launch.

Bit exactness: the integer stages are exact in any order and the fma chain over groups keeps its
order.  TVM compiles CUDA with ``--use_fast_math`` (approximate ``a / b``), so every float32 division
of the Winograd kernels is rewritten to ``__fdiv_rn`` (IEEE round-to-nearest in any mode), and
``T.fma`` (which TVM 0.27 cannot lower for CUDA) to ``__fmaf_rn``; ``nearbyintf`` is exact.  (Fast
math also flushes denormals to zero; the kernels' values and scales are nowhere near 1e-38.)
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T

__all__ = ["DP4A_INTRIN", "exact_float_ops", "schedule_direct", "schedule_gemm", "schedule_input",
           "schedule_other_ops", "schedule_output", "schedule_winoq_kernels"]

_SCHEDULED = "tirx.is_scheduled"
DP4A_INTRIN = "winoq_cuda_dp4a_s8s8s32"
THREADS = 128


# ------------------------------------------------------------------------------------- intrinsic
@T.prim_func(s_tir=True)
def _dp4a_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4,), "int8", offset_factor=1)
    C = T.match_buffer(c, (1,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        for i in range(4):
            with T.sblock("update"):
                vi = T.axis.remap("R", [i])
                C[0] = C[0] + T.Cast("int32", A[vi]) * T.Cast("int32", B[vi])


@T.prim_func(s_tir=True)
def _dp4a_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4,), "int8", offset_factor=1)
    C = T.match_buffer(c, (1,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        C[0] = T.call_pure_extern("int32", "__dp4a", A.vload([0], "int8x4"), B.vload([0], "int8x4"), C[0])


TensorIntrin.register(DP4A_INTRIN, _dp4a_desc, _dp4a_impl, override=True)


# --------------------------------------------------------------------------------------- helpers
def exact_float_ops(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with every float32 ``a / b`` as ``__fdiv_rn(a, b)`` (IEEE round-to-nearest even under
    ``--use_fast_math``) and ``T.fma`` as ``__fmaf_rn`` (TVM has no CUDA lowering for ``tirx.fma``)."""
    fma = tvm.ir.Op.get("tirx.fma")

    def _div(e: tirx.Div) -> tirx.PrimExpr:
        if str(e.ty) == "float32":
            return tirx.call_pure_extern("float32", "__fdiv_rn", e.a, e.b)
        return e

    def _call(e: tvm.ir.Call) -> tirx.PrimExpr:
        if e.op.same_as(fma) and str(e.ty) == "float32":
            return tirx.call_pure_extern("float32", "__fmaf_rn", *e.args)
        return e

    return tvm_ffi.structural_map(func, [(tirx.Div, _div), (tvm.ir.Call, _call)])


def _extent(sch: Schedule, loop: object) -> int:
    return int(sch.get(loop).extent)


def _divisor(n: int, candidates: tuple[int, ...]) -> int:
    return next((c for c in candidates if n % c == 0), 1)


def _bind(sch: Schedule, loop: object, threads: int = THREADS) -> None:
    """Bind one (fused) loop to ``blockIdx.x`` x ``threadIdx.x``."""
    ext = _extent(sch, loop)
    if ext <= threads:
        sch.bind(loop, "threadIdx.x")
        return
    bx, tx = sch.split(loop, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _bind_spatial(sch: Schedule, name: str, threads: int = THREADS) -> None:
    """Make the root block ``name`` its own launch: its leading spatial loops fused and bound, the
    reduction loops (if any) serial inside each thread."""
    blk = sch.get_sblock(name)
    kinds = [int(iv.iter_type) for iv in sch.get(blk).iter_vars]
    loops = sch.get_loops(blk)
    n_sp = kinds.index(2) if 2 in kinds else len(kinds)
    _bind(sch, sch.fuse(*loops[:n_sp]) if n_sp > 1 else loops[0], threads)


def _spatial_extent(sch: Schedule, name: str) -> list[int]:
    return [int(iv.dom.extent) for iv in sch.get(sch.get_sblock(name)).iter_vars]


# ------------------------------------------------------------------------------------------ input
def _largest_divisor(n: int, limit: int) -> int:
    return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


def _schedule_input_quant(sch: Schedule) -> None:
    """``x_absmax``: partial maxima of strided slices (rfactor, one per thread), then one thread folds
    them; ``x_scale`` one thread; ``x_quant`` one launch over its spatial loops."""
    xa = sch.get_sblock("x_absmax")
    fused = sch.fuse(*sch.get_loops(xa))
    lanes = _largest_divisor(_extent(sch, fused), 1024)
    _, lane = sch.split(fused, [None, lanes])
    rf = sch.rfactor(lane, 0)
    r, lane = sch.get_loops(rf)
    sch.reorder(lane, r)
    _bind(sch, lane, THREADS)
    sch.bind(sch.add_unit_loop(sch.get_loops(xa)[0]), "threadIdx.x")
    sch.bind(sch.get_loops(sch.get_sblock("x_scale"))[0], "threadIdx.x")
    _bind_spatial(sch, "x_quant", 256)


def schedule_input(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Schedule the ``input`` kernel (see the module docstring)."""
    sch = Schedule(exact_float_ops(func))
    _schedule_input_quant(sch)
    # per tile: [row, tile, group] threads when V groups are whole, else one thread per tile
    _, _, ng, lanes, per_lane = _spatial_extent(sch, "v_absmax_lanes")  # (t, p, Gv, lanes, group/lanes)
    c = _spatial_extent(sch, "v_quant")[2]  # (t, p, C)
    gs = lanes * per_lane
    n = _spatial_extent(sch, "tf_cols")[1]  # (t, n, n, C)
    tfc = sch.get_sblock("tf_cols")
    it, i, j, ch = sch.get_loops(tfc)
    if ng * gs == c:  # anchor: the column transform's (tile, group, row) loops
        sch.transform_layout(tfc, ("write", 0), lambda i, j, t, c: (i * n + j, t, c))  # V_s by position
        g, _ = sch.split(ch, [None, gs])
        sch.reorder(g, i, j)
        sch.compute_at(sch.get_sblock("tf_rows"), i, preserve_unit_loops=True)
        for name in ("v_absmax_lanes", "v_absmax", "v_scale", "v_quant"):
            sch.reverse_compute_at(sch.get_sblock(name), i, preserve_unit_loops=True)
        sch.reorder(i, it, g)  # the row (a Select over its index) uniform across a warp
        thread = sch.fuse(i, it, g)
    else:  # everything of a tile in one thread
        thread = it
    sch.unroll(sch.get_loops(tfc)[-2])  # column index j: the Select folds
    for name in ("tf_rows", "tf_cols", "v_absmax_lanes", "v_absmax"):  # per-thread scratch
        sch.set_scope(sch.get_sblock(name), 0, "local")
    _bind(sch, thread, 64)
    return sch.mod["main"].with_attr(_SCHEDULED, True)


# ------------------------------------------------------------------------------------------- gemm
def _reduce_group(sch: Schedule, acc: object, ti: object | None, rc: object, dp4a: bool) -> None:
    """One group's channel reduction: ``__dp4a`` per 4 channels (``ti`` tiles unrolled inside)."""
    if not dp4a:
        sch.decompose_reduction(acc, rc)
        return
    cb, c4 = sch.split(rc, [None, 4])
    if ti is not None:
        sch.reorder(cb, ti)
    sch.decompose_reduction(acc, cb)
    sch.tensorize(c4, DP4A_INTRIN)
    if ti is not None:
        sch.unroll(ti)


def schedule_gemm(func: tirx.PrimFunc, tile_t: int = 4) -> tirx.PrimFunc:
    """Schedule the ``gemm`` kernel (see the module docstring); ``tile_t`` tiles per thread."""
    sch = Schedule(exact_float_ops(func))
    acc = sch.get_sblock("gemm_acc")
    dq = sch.get_sblock("gemm_dequant")
    blk = sch.get(acc)
    p_, t_, k_, ng, gg = (int(iv.dom.extent) for iv in blk.iter_vars)
    c = next(int(r.source.shape[2]) for r in blk.reads if r.source.name == "vq")
    dp4a = c == ng * gg and gg % 4 == 0
    debug = len(func.params) == 6
    if dp4a:  # U repacked: 4 input channels of one output channel in one 32-bit word
        pack = sch.cache_read(acc, "uq", "global")
        sch.transform_layout(pack, ("write", 0), lambda p, c, k: (p, c // 4, k, c % 4))
        pp, pc, pk = sch.get_loops(pack)
        pcb, pci = sch.split(pc, [None, 4])
        sch.reorder(pp, pcb, pk, pci)
        _bind(sch, sch.fuse(pp, pcb, pk), THREADS)
    p, t, k, g = sch.get_loops(dq)
    if debug:  # acc is an output: one (p, t, k, g) per thread, then a second launch dequantizes
        copy = sch.cache_write(acc, "acc", "local")
        ap, at_, ak, ag, rc = sch.get_loops(acc)
        sch.bind(sch.fuse(ap, at_), "blockIdx.x")
        if k_ * ng <= 1024:
            inner = sch.fuse(ak, ag)
        else:
            sch.bind(ak, "blockIdx.y")
            inner = ag
        sch.bind(inner, "threadIdx.x")
        sch.reverse_compute_at(copy, inner)
        _reduce_group(sch, acc, None, rc, dp4a)
        _bind(sch, sch.fuse(p, t, k), THREADS)
        sch.decompose_reduction(dq, g)
    else:  # blocks: (position, tt tiles); threads: output channels; per thread tt accumulators
        tt = _divisor(t_, (tile_t, 3, 2))
        kk = k_ if k_ <= THREADS else _divisor(k_, (THREADS, 64, 32, 16, 8, 4))
        to, ti = sch.split(t, [None, tt])
        ko, ki = sch.split(k, [None, kk])
        sch.reorder(p, to, ko, ki, g, ti)
        sch.bind(sch.fuse(p, to, ko), "blockIdx.x")
        sch.bind(ki, "threadIdx.x")
        mf_out = sch.cache_write(dq, 0, "local")  # the tt fma chains in registers, stored once
        sch.reverse_compute_at(mf_out, ki, preserve_unit_loops=True)
        sch.compute_at(acc, g, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
        *_, ti, _, _, rc = sch.get_loops(acc)  # (p, t, k, g units; t, k, g, rc of the group)
        _reduce_group(sch, acc, ti, rc, dp4a)
        sch.decompose_reduction(dq, g)
    return sch.mod["main"].with_attr(_SCHEDULED, True)


# ----------------------------------------------------------------------------------------- output
_OUTPUT_STAGES = ("m_absmax_lanes", "m_absmax", "m_scale", "m_quant", "otf_rows", "otf_cols", "y_store")


def schedule_output(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Schedule the ``output`` kernel: one launch per stage (see the module docstring)."""
    sch = Schedule(exact_float_ops(func))
    for name in _OUTPUT_STAGES:
        _bind_spatial(sch, name)
    return sch.mod["main"].with_attr(_SCHEDULED, True)


def schedule_direct(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Schedule the int8 ``direct`` kernel: input quantization as in ``input``; one thread per output
    element (consecutive threads on consecutive output channels) accumulating its taps serially in an
    int32 register; the dequantization its own launch."""
    sch = Schedule(exact_float_ops(func))
    _schedule_input_quant(sch)
    blk = sch.get_sblock("conv_acc")
    local = sch.cache_write(blk, 0, "local")
    _bind_spatial(sch, "conv_acc")
    sch.reverse_compute_at(local, sch.get_loops(blk)[-4])  # the thread loop (3 reduction loops follow)
    _bind_spatial(sch, "dequant")
    return sch.mod["main"].with_attr(_SCHEDULED, True)


_SCHEDULES = {"input": schedule_input, "gemm": schedule_gemm, "output": schedule_output,
              "direct": schedule_direct}


def schedule_winoq_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Apply the CUDA schedules to every PrimFunc of ``mod`` carrying a ``winoq.kernel`` attribute."""
    del target

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="ScheduleWinoqKernelsCUDA")
    def _pass(func: tirx.PrimFunc, m: tvm.IRModule, ctx: tvm.transform.PassContext) -> tirx.PrimFunc:
        attrs = func.attrs
        if attrs is None or "winoq.kernel" not in attrs or _SCHEDULED in attrs:
            return func
        return _SCHEDULES[str(attrs["winoq.kernel"])](func)

    return _pass(mod)


def schedule_other_ops(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Every other (legalized) operator: dlight's GPU rules."""
    from tvm.s_tir import dlight as dl

    with target:
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
