"""CPU (LLVM) schedules: hand-written ones for the Winograd kernels, dlight/generic ones for the rest.

The Winograd schedules only reorder, tile, parallelize, unroll and vectorize; the reduction order of the
float fma chain over channel groups is kept (the ``g`` loop stays serial and in order), so scheduled
kernels produce the same bits as the naive ones (checked by ``tests/test_kernels_bitexact.py``).

* ``input``: per-tensor absmax vectorized via ``rfactor``; quantize/pad parallel over padded rows;
  per tile row (parallel) and tile: row transform computed at the tile, column transform, V absmax and
  V quantization fused under the tile loop, transform loops unrolled (folding the constant matrices),
  channels vectorized.
* ``gemm``: output tile ``[tt tiles x vk channels]`` of int32 accumulators per (position, tile block),
  parallel over (position, tile block); per channel group: the channel loop outside, ``vk`` output
  channels vectorized (``k``-inner), then the fma dequantization vectorized over ``vk``.
* ``output``: parallel over tile rows; M absmax/quantize and both transform stages computed per tile
  row, output channels vectorized; the NCHW store parallel over rows.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

__all__ = ["schedule_gemm", "schedule_input", "schedule_other_ops", "schedule_output", "schedule_winoq_kernels"]

_SCHEDULED = "tirx.is_scheduled"


def _extent(sch: Schedule, loop: object) -> int:
    return int(sch.get(loop).extent)


def _divisor(n: int, candidates: tuple[int, ...]) -> int:
    """The first candidate dividing ``n`` (1 if none)."""
    return next((c for c in candidates if n % c == 0), 1)


def _vectorize(sch: Schedule, loop: object, lanes: int = 16) -> None:
    """Vectorize ``loop`` (split off ``lanes`` or a divisor of its extent; tiny loops as a whole)."""
    ext = _extent(sch, loop)
    if ext <= lanes:
        sch.vectorize(loop)
        return
    v = _divisor(ext, (lanes, 8, 4))
    if v > 1:
        sch.vectorize(sch.split(loop, [None, v])[1])


def _has_block(sch: Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - tvm raises a ScheduleError subclass
        return False
    return True


def _absmax_rfactor(sch: Schedule, name: str) -> None:
    """Vectorize a full-tensor max reduction by rfactor over ``lanes`` partial maxima."""
    blk = sch.get_sblock(name)
    fused = sch.fuse(*sch.get_loops(blk))
    lanes = _divisor(_extent(sch, fused), (16, 8, 4))
    if lanes == 1:
        return
    _, li = sch.split(fused, [None, lanes])
    rf = sch.rfactor(li, 0)
    lo_rf = sch.get_loops(rf)
    sch.reorder(lo_rf[1], lo_rf[0])
    sch.vectorize(lo_rf[0])
    sch.decompose_reduction(rf, lo_rf[1])


def _per_tile(sch: Schedule, absmax_block: str) -> bool:
    """True when a group absmax reduces over channels only (per position and per tile scales)."""
    blk = sch.get(sch.get_sblock(absmax_block))
    ext = [int(iv.dom.extent) for iv in blk.iter_vars]
    return ext[3] == 1 and ext[4] == 1  # [P|1, T|1, G, rP, rT, rc]


def _per_tile_row(sch: Schedule, absmax_block: str) -> bool:
    """True when a group absmax is per tile (it may span positions)."""
    blk = sch.get(sch.get_sblock(absmax_block))
    return int(blk.iter_vars[4].dom.extent) == 1


def schedule_input(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Schedule the ``input`` kernel (see the module docstring)."""
    sch = Schedule(func)
    _absmax_rfactor(sch, "x_absmax")
    # quantize + pad + NCHW->NHWC: parallel over padded rows, channels vectorized
    q = sch.get_sblock("x_quant")
    n, h, w, c = sch.get_loops(q)
    sch.parallel(sch.fuse(n, h))
    _vectorize(sch, c)
    # transforms per tile, parallel over tile rows
    cols = sch.get_sblock("tf_cols")
    nb, th, tw, i, j, c = sch.get_loops(cols)
    row = sch.fuse(nb, th)
    sch.parallel(row)
    sch.compute_at(sch.get_sblock("tf_rows"), tw)
    i2, b2, c2 = sch.get_loops(sch.get_sblock("tf_rows"))[-3:]
    sch.unroll(i2)
    _vectorize(sch, c2)
    sch.unroll(i)
    sch.unroll(j)
    _vectorize(sch, c)
    if _per_tile(sch, "v_absmax"):
        sch.reverse_compute_at(sch.get_sblock("v_absmax"), tw)
        sch.reverse_compute_at(sch.get_sblock("v_scale"), tw)
        sch.reverse_compute_at(sch.get_sblock("v_quant"), tw)
        vq = sch.get_sblock("v_quant")
        _vectorize(sch, sch.get_loops(vq)[-1])
    else:
        pq = sch.get_loops(sch.get_sblock("v_quant"))
        sch.parallel(pq[0])
        _vectorize(sch, pq[-1])
    return sch.mod["main"].with_attr(_SCHEDULED, True)


def schedule_gemm(func: tirx.PrimFunc, tile_t: int = 4, lanes: int = 16) -> tirx.PrimFunc:
    """Schedule the ``gemm`` kernel: ``tile_t`` tiles x ``lanes`` output channels per register block."""
    sch = Schedule(func)
    dq = sch.get_sblock("gemm_dequant")
    p, t, k, g = sch.get_loops(dq)
    tt = _divisor(_extent(sch, t), (tile_t, 5, 3, 2))
    kk = _extent(sch, k) if _extent(sch, k) <= lanes else _divisor(_extent(sch, k), (lanes, 8, 4))
    to, ti = sch.split(t, [None, tt])
    ko, ki = sch.split(k, [None, kk])
    sch.reorder(p, to, ko, g, ti, ki)
    sch.parallel(sch.fuse(p, to))
    acc = sch.get_sblock("gemm_acc")
    if len(func.params) == 5:  # production: accumulate per group in registers, right where it is used
        sch.compute_at(acc, g)
        ati, aki, arc = sch.get_loops(acc)[-3:]
    else:  # debug: acc is an output (cannot move); same register blocking at the root
        ap, at_, ak, ag, arc = sch.get_loops(acc)
        ato, ati = sch.split(at_, [None, tt])
        ako, aki = sch.split(ak, [None, kk])
        sch.reorder(ap, ato, ako, ag, arc, ati, aki)
        sch.parallel(sch.fuse(ap, ato))
    sch.reorder(arc, ati, aki)
    sch.unroll(ati)
    sch.vectorize(aki)
    sch.decompose_reduction(acc, arc)
    init = sch.get_sblock("gemm_acc_init")
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(ki)
    sch.unroll(ti)
    sch.decompose_reduction(dq, g)
    dinit = sch.get_sblock("gemm_dequant_init")
    sch.vectorize(sch.get_loops(dinit)[-1])
    return sch.mod["main"].with_attr(_SCHEDULED, True)


def schedule_output(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Schedule the ``output`` kernel (see the module docstring)."""
    sch = Schedule(func)
    ys = sch.get_sblock("y_store")
    nb, k, oh, ow = sch.get_loops(ys)
    m = _extent(sch, sch.get_loops(sch.get_sblock("otf_cols"))[2])
    oho, a = sch.split(oh, [None, m])
    sch.reorder(nb, oho, k, a, ow)
    row = sch.fuse(nb, oho)
    sch.parallel(row)
    sch.compute_at(sch.get_sblock("otf_cols"), row)
    sch.compute_at(sch.get_sblock("otf_rows"), row)
    if _per_tile_row(sch, "m_absmax"):
        sch.compute_at(sch.get_sblock("m_quant"), row)
        sch.compute_at(sch.get_sblock("m_scale"), row)
        sch.compute_at(sch.get_sblock("m_absmax"), row)
    for name in ("otf_rows", "otf_cols"):
        blk = sch.get_sblock(name)
        t_, k_, a_, j_ = sch.get_loops(blk)[-4:]
        sch.reorder(t_, a_, j_, k_)
        sch.unroll(a_)
        sch.unroll(j_)
        _vectorize(sch, k_)
    mq = sch.get_sblock("m_quant")
    _vectorize(sch, sch.get_loops(mq)[-1])
    return sch.mod["main"].with_attr(_SCHEDULED, True)


_SCHEDULES = {"input": schedule_input, "gemm": schedule_gemm, "output": schedule_output}


def schedule_winoq_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Apply the CPU schedules to every PrimFunc of ``mod`` carrying a ``winoq.kernel`` attribute."""
    del target
    out = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None or "winoq.kernel" not in func.attrs:
            continue
        if _SCHEDULED in func.attrs:
            continue
        out[gv] = _SCHEDULES[str(func.attrs["winoq.kernel"])](func)
    return out


def schedule_other_ops(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule the remaining (legalized) PrimFuncs: dlight CPU rules (skipping scheduled functions)."""
    from tvm.s_tir import dlight as dl

    with target:
        return dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())(mod)
