"""CPU (LLVM) schedules: hand-written ones for the Winograd kernels, dlight/generic ones for the rest.

The Winograd schedules only reorder, tile, parallelize, unroll and vectorize; the reduction order of the
float fma chain over channel groups is kept (the ``g`` loop stays serial and in order), so scheduled
kernels produce the same bits as the naive ones (checked by ``tests/test_kernels_bitexact.py``).

* ``input``: per-tensor absmax vectorized via ``rfactor``; quantize/pad parallel over padded rows,
  reading each input row through an NHWC copy made of 8x8 / 4x4 shuffle transposes (a tensor
  intrinsic, where 8 or 4 divides C and W; else channel vectors gathered); per tile (parallel) and
  chunk of 64 channels (whole V scale groups, so a tile's intermediates stay in L1): row transform,
  column transform, V absmax and V quantization, transform loops unrolled (folding the constant
  matrices), channels vectorized.
* ``gemm``: output tile ``[tt tiles x vk channels]`` of int32 accumulators per (position, tile block),
  parallel over (position, tile block); per channel group: the channel loop outside, ``vk`` output
  channels vectorized (``k``-inner), then the fma dequantization vectorized over ``vk``.
* ``output``: parallel over tile rows; M absmax/quantize and both transform stages computed per tile
  (36 x K floats, in L1 from stage to stage; the quantized M held as float32 integers), output
  channels vectorized; the NCHW store parallel over rows, as 8x8 shuffle transposes fused with the
  dequantization fma where 8 divides K and W and the tiles cover the output exactly.
* Quantizers multiply by ``1 / s`` (:mod:`tvm_winoq.quant.ops`); the reciprocals of the V and M scales
  are computed once per scale (``rsv`` / ``rsm``), so no loop divides per element.
* ``direct`` (int8 direct convolution): see :func:`schedule_direct`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from tvm_winoq.relax.schedules import load_module

__all__ = ["gemm_shape", "packed_direct_block", "packed_direct_columns", "schedule_direct",
           "schedule_direct_dequant", "schedule_input_quant", "schedule_gemm", "schedule_input",
           "schedule_other_ops", "schedule_output", "schedule_kernels_with_gemm", "schedule_packed_direct",
           "schedule_packed_gemm", "schedule_winoq_kernels"]

_ops: ModuleType = load_module("cpu_ops")
_SCHEDULED, _extent, _divisor, _has_block = _ops.SCHEDULED, _ops.extent, _ops.divisor, _ops.has_block
with_attrs_of = _ops.with_attrs_of  # for the families' prepack hooks
_tr: ModuleType = load_module("cpu_transpose")  # registers the transpose intrinsics


def _vectorize(sch: Schedule, loop: object, lanes: int = 16) -> None:
    """Vectorize ``loop`` (split off ``lanes`` or a divisor of its extent; tiny loops as a whole)."""
    ext = _extent(sch, loop)
    if ext <= lanes:
        sch.vectorize(loop)
        return
    v = _divisor(ext, (lanes, 8, 4))
    if v > 1:
        sch.vectorize(sch.split(loop, [None, v])[1])


def _scale_group(sch: Schedule, block: object, scale: str) -> int:
    """Channels per scale in ``block``: ``g`` of its ``scale[..., c // g]`` (or reciprocal ``r<scale>``)
    read (1 if it has none)."""
    for region in sch.get(block).reads:
        last = region.region[-1].min
        divides = isinstance(last, tirx.FloorDiv) and isinstance(last.b, tirx.IntImm)
        if region.source.name in (scale, f"r{scale}") and divides:
            return int(last.b)
    return 1


def _vectorize_in_groups(sch: Schedule, loop: object, group: int, lanes: int = 16) -> None:
    """Vectorize a channel ``loop`` whose scales change every ``group`` channels: vectors never cross
    a group, so the scale is one broadcast per vector (else a gather of one scale per lane)."""
    ext = _extent(sch, loop)
    if group <= 1 or ext % group or group % 4:
        _vectorize(sch, loop, lanes)
        return
    _, inner = sch.split(loop, [None, group])
    _vectorize(sch, inner, lanes)


def _absmax_rfactor(sch: Schedule, name: str) -> None:
    """Vectorize the per-tensor input absmax: ``rfactor`` over lanes of the innermost (W) axis."""
    blk = sch.get_sblock(name)
    loops = sch.get_loops(blk)
    lanes = _divisor(_extent(sch, loops[-1]), (16, 8, 7, 4))
    if lanes == 1:
        loops = [sch.fuse(*loops)]
        lanes = _divisor(_extent(sch, loops[0]), (16, 8, 4))
        if lanes == 1:
            return
    _, li = sch.split(loops[-1], [None, lanes])
    rf = sch.rfactor(li, 0)
    lo_rf = sch.get_loops(rf)  # [..., outer part of W (reduce), lanes (spatial)]
    sch.vectorize(lo_rf[-1])
    sch.decompose_reduction(rf, lo_rf[0])


def _per_tile_row(sch: Schedule) -> bool:
    """True when the M scales are per tile (they may span positions): fusable per tile row."""
    blk = sch.get(sch.get_sblock("m_absmax_lanes"))  # [P|1, T|1, G, lanes, rP, rT, rK]
    return int(blk.iter_vars[5].dom.extent) == 1


def _vectorize_lanes(sch: Schedule, name: str) -> None:
    """Partial-max block: move its lane loop innermost, vectorize it, split off the init."""
    blk = sch.get_sblock(name)
    n_red = sum(int(iv.iter_type) != 0 for iv in sch.get(blk).iter_vars)
    loops = sch.get_loops(blk)
    lane, red = loops[-n_red - 1], loops[-n_red:]
    if _extent(sch, lane) == 1 and len(loops) > n_red + 1:
        # one lane per group (a scale per channel): the groups are the contiguous axis, vectorize them
        # (else the absmax is a scalar loop over positions, strided by T*K: 0.5M scalar loads at 64@56)
        grp = loops[-n_red - 2]
        sch.reorder(*red, grp)
        _vectorize(sch, grp)
    else:
        sch.reorder(*red, lane)
        sch.vectorize(lane)
    sch.decompose_reduction(blk, red[0])


def _vectorize_gathered_channels(sch: Schedule, w: object, c: object) -> None:
    """Vectorize a channel loop gathering from NCHW planes H*W*4 bytes apart: at 16 KB (64x64) every
    plane's line maps to the same L1 set, so a pass over all C channels per pixel thrashes L1 (9
    cycles per element at 320@64).  8 channels per pass along the row keep their 8 lines resident."""
    channels = _extent(sch, c)
    if channels > 8 and channels % 8 == 0:
        co, ci = sch.split(c, [None, 8])
        sch.reorder(co, w, ci)
        sch.vectorize(ci)
    else:
        _vectorize(sch, c)


def _transposed_read(sch: Schedule, block: object) -> Schedule | None:
    """``sch`` with ``block``'s NCHW float input read through an NHWC copy per output row made of
    shuffle transposes (8x8 or 4x4, where they divide C and W): a channel vector is then one load,
    not ``L`` gathered elements (x_quant 31% -> ~15% of the input kernel at 64@56).  ``None`` where
    no transpose fits or the copy cannot be placed per row (``sch`` is left as it was)."""
    x = sch.get(block).reads[0].source
    _, c, _, w = (int(d) for d in x.shape)
    size = next((s for s in (8, 4) if c % s == 0 and w % s == 0), None)
    if size is None:
        return None
    trial = sch.copy()
    try:
        xt = trial.cache_read(block, 0, "global", consumer_blocks=[block])
        trial.transform_layout(xt, ("write", 0), lambda n_, c_, h_, w_: (n_, h_, w_, c_))
        n, c_, h, w_ = trial.get_loops(xt)
        co, ci = trial.split(c_, [None, size])
        wo, wi = trial.split(w_, [None, size])
        trial.reorder(n, h, wo, co, ci, wi)
        tile = trial.blockize(ci)
        trial.tensorize(tile, _tr.TRANSPOSE_INTRIN[size])
        trial.compute_at(tile, trial.get_loops(block)[0], preserve_unit_loops=True)
    except (RuntimeError, ValueError):  # ScheduleError or a failed check (rows past the input)
        return None
    return trial


def _channel_chunks(sch: Schedule, chunk: int) -> None:
    """Per tile, run the transforms and the V quantization on ``chunk`` channels at a time (whole V
    scale groups) so a tile's intermediates stay in L1 (320 channels: 92 KB per tile): every stage's
    channel (or group) loop is split, moved right under the tile loop and the loops merged."""
    vq = sch.get_sblock("v_quant")
    group = _scale_group(sch, vq, "sv")
    channels = _extent(sch, sch.get_loops(vq)[-1])
    size = max(chunk // group, 1) * group
    if group < 1 or channels <= size or channels % size:
        return
    outer = []
    for name, axis, step in (("tf_rows", 3, size), ("tf_cols", 3, size), ("v_absmax_lanes", 2, size // group),
                             ("v_absmax", 2, size // group), ("v_scale", 2, size // group),
                             ("v_quant", 2, size)):
        loops = sch.get_loops(sch.get_sblock(name))
        co, ci = sch.split(loops[axis], [None, step])
        sch.reorder(co, *loops[1:axis], ci)
        outer.append(co)
    sch.merge(*outer)


def schedule_input(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Schedule the ``input`` kernel (see the module docstring)."""
    sch = schedule_input_quant(Schedule(func))
    # per tile (parallel): row transform, column transform, V absmax, V scale, V quantization
    t = sch.get_loops(sch.get_sblock("tf_rows"))[0]
    sch.parallel(t)
    _channel_chunks(sch, 64)
    # int16 transforms (kernels.transform_dtype) in 32 lanes: one zmm on AVX-512 (16: no faster than int32)
    narrow = str(sch.get(sch.get_sblock("tf_rows")).writes[0].source.dtype) == "int16"
    for name in ("tf_rows", "tf_cols"):
        i, j, ch = sch.get_loops(sch.get_sblock(name))[-3:]
        sch.unroll(i)
        sch.unroll(j)
        _vectorize(sch, ch, 32 if narrow and _extent(sch, ch) % 32 == 0 else 16)
    vq = sch.get_sblock("v_quant")
    _vectorize_in_groups(sch, sch.get_loops(vq)[-1], _scale_group(sch, vq, "sv"))
    _vectorize_lanes(sch, "v_absmax_lanes")
    return sch.mod["main"].with_attr(_SCHEDULED, True)


def schedule_gemm(func: tirx.PrimFunc, tile_t: int = 4, lanes: int = 16) -> tirx.PrimFunc:
    """Schedule the ``gemm`` kernel: ``tile_t`` tiles x ``lanes`` output channels per register block."""
    sch = Schedule(func)
    dq = sch.get_sblock("gemm_dequant")
    p, t, k, g = sch.get_loops(dq)
    tt = _divisor(_extent(sch, t), (tile_t, 7, 5, 6, 3, 2))
    kk = _extent(sch, k) if _extent(sch, k) <= lanes else _divisor(_extent(sch, k), (lanes, 8, 4))
    to, ti = sch.split(t, [None, tt])
    ko, ki = sch.split(k, [None, kk])
    sch.reorder(p, to, ko, g, ti, ki)
    sch.parallel(sch.fuse(p, to))
    acc = sch.get_sblock("gemm_acc")
    if len(func.params) == 5:  # production: accumulate per group in registers, right where it is used
        sch.compute_at(acc, g, preserve_unit_loops=True)
        _, ati, aki, _, arc = sch.get_loops(acc)[-5:]  # loops of (p, t, k, g, rc), p and g unit
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


def gemm_shape(func: tirx.PrimFunc) -> dict[str, int]:
    """Static sizes of a ``gemm`` kernel: ``p, t, k, ng`` (groups), ``gg`` (group size), ``c``, ``cp``,
    and ``vbits`` (bits of ``v_q``'s integer type)."""
    sch = Schedule(func)
    blk = sch.get(sch.get_sblock("gemm_acc"))
    p, t, k, ng, gg = (int(iv.dom.extent) for iv in blk.iter_vars)
    vq = func.params[0]  # v_q [P, T, C]
    return {"p": p, "t": t, "k": k, "ng": ng, "gg": gg, "c": int(vq.shape[2]), "cp": ng * gg,
            "vbits": int(tvm.DataType(vq.dtype).bits)}


def schedule_packed_gemm(func: tirx.PrimFunc, cw: int, tt: int, kk: int,
                         micro: Callable[[Schedule, Any, list], None],
                         acc_layout: Callable[..., tuple] | None = None) -> tirx.PrimFunc:
    """The ``gemm`` kernel with a tensorized integer reduction (the ``arm`` and ``x86`` families).

    ``u_q`` ``[P, Cp, K]`` is repacked once per call into ``[P, Cp/cw, K, cw]`` (``cw`` input channels
    of one output channel contiguous: one micro-kernel operand), parallel over positions.  The int32
    accumulators become a compact ``[tt, kk]`` block per (position, tile block, channel block, group),
    ``k`` innermost (``acc_layout`` maps ``(p, t, k, g)`` otherwise; in the debug kernel, where ``acc`` is
    an output, a ``cache_write`` with the copy-out per group).  ``micro(sch, acc, loops)`` tensorizes the
    reduction of one group; ``loops`` = (unit loops..., tiles, channels, reduction).  The fma
    dequantization over groups is scheduled as in :func:`schedule_gemm` (``g`` serial, in order).
    In a kernel with the int16 ``vq_wide``/``uq_wide`` stages of
    :func:`~tvm_winoq.relax.gemm.gemm_kernel` the packed ``U`` is ``uq_wide``'s int16 buffer; a
    ``u_q`` parameter that is already packed (``[P, Cp/cw, K, cw]`` or ``[P, K/kb, Cp/cw, kb, cw]``, at
    compile time) is read as it is.
    A ``vq_wide`` stage is computed per register block of tiles (all channels), where the micro-kernel
    reads it.
    """
    sch = Schedule(func)
    debug = func.params[4].name == "acc"
    acc = sch.get_sblock("gemm_acc")
    dq = sch.get_sblock("gemm_dequant")
    if len(func.params[2].shape) == 3:  # else u_q arrives packed (a constant packed at compile time)
        wide = _has_block(sch, "uq_wide")
        pack = sch.get_sblock("uq_wide") if wide else sch.cache_read(acc, "uq", "global")
        sch.transform_layout(pack, ("write", 0), lambda p, c, k: (p, c // cw, k, c % cw))
        pp, pc, pk = sch.get_loops(pack)
        pcb, pci = sch.split(pc, [None, cw])
        sch.reorder(pp, pcb, pk, pci)
        sch.parallel(pp)
        sch.unroll(pci)
    copy = sch.cache_write(acc, "acc", "global") if debug else None
    sch.transform_layout(acc, ("write", 0), acc_layout or (lambda p, t, k, g: (p, g, t, k)))
    p, t, k, g = sch.get_loops(dq)
    to, ti = sch.split(t, [None, tt])
    ko, ki = sch.split(k, [None, kk])
    sch.reorder(p, to, ko, g, ti, ki)
    block_loop = sch.fuse(p, to)
    sch.parallel(block_loop)
    if not debug:
        sch.compute_at(acc, g, preserve_unit_loops=True)
        au, ati, aki, ag, arc = sch.get_loops(acc)[-5:]  # loops of (p, t, k, g, rc); p and g unit
        loops = [au, ag, ati, aki, arc]
    else:
        ap, at_, ak, ag, arc = sch.get_loops(acc)
        ato, ati = sch.split(at_, [None, tt])
        ako, aki = sch.split(ak, [None, kk])
        sch.reorder(ap, ato, ako, ag, ati, aki, arc)
        loops = [ati, aki, arc]
        sch.parallel(sch.fuse(ap, ato))
        sch.reverse_compute_at(copy, ag, preserve_unit_loops=True)
        cl = sch.get_loops(copy)
        sch.unroll(cl[-2])
        sch.vectorize(cl[-1])
    if _has_block(sch, "vq_wide"):
        _place_wide_v(sch, None if debug else block_loop)
    if _has_block(sch, "vq_u8"):  # V shifted to uint8 (a kernel with ``v_offset``): per tile block
        _place_wide_v(sch, block_loop, "vq_u8")
    micro(sch, acc, loops)
    sch.vectorize(ki)
    sch.unroll(ti)
    sch.decompose_reduction(dq, g)
    sch.vectorize(sch.get_loops(sch.get_sblock("gemm_dequant_init"))[-1])
    return sch.mod["main"].with_attr(_SCHEDULED, True)


def _place_wide_v(sch: Schedule, block_loop: object | None, name: str = "vq_wide") -> None:
    """``vq_wide`` (or ``name``): per (position, tile block) under ``block_loop`` (debug: at the root,
    parallel over positions), channels vectorized."""
    vw = sch.get_sblock(name)
    if block_loop is not None:
        sch.compute_at(vw, block_loop, preserve_unit_loops=True)
    else:
        sch.parallel(sch.get_loops(vw)[0])
    _vectorize(sch, sch.get_loops(vw)[-1])


def schedule_output(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Schedule the ``output`` kernel (see the module docstring)."""
    sch = Schedule(func)
    ys = sch.get_sblock("y_store")
    nb, k, oh, ow = sch.get_loops(ys)
    m = _extent(sch, sch.get_loops(sch.get_sblock("otf_cols"))[2])
    n_k, n_h, n_w = _extent(sch, k), _extent(sch, oh), _extent(sch, ow)
    transpose = n_k % 8 == 0 and n_w % 8 == 0 and n_w % m == 0 and n_h % m == 0
    oho, a = sch.split(oh, [None, m])
    sch.reorder(nb, oho, k, a, ow)
    row = sch.fuse(nb, oho)
    sch.parallel(row)
    # where 8 divides K and W and the tiles cover the output exactly: the transformed tiles of a tile
    # row as [row, a, w, k], so the NCHW store reads a [w, k] block per output row, an 8 x 8 shuffle
    # transpose with the dequantization fma (else one gathered element per lane; 45% of the kernel)
    tw = n_w // m
    if transpose:
        sch.transform_layout(sch.get_sblock("otf_cols"), ("write", 0),
                             lambda t, a_, j, c: (t // tw, a_, t % tw * m + j, c))
        ko, ki = sch.split(k, [None, 8])
        wo, wi = sch.split(ow, [None, 8])
        sch.reorder(ko, a, wo, ki, wi)
    sch.compute_at(sch.get_sblock("otf_cols"), row, preserve_unit_loops=True)
    # per tile of the row: everything from M's absmax to the column transform (a tile's 36 x K floats
    # stay in L1 between the stages; per row they were re-read from L2)
    tile = sch.get_loops(sch.get_sblock("otf_cols"))[1]
    sch.compute_at(sch.get_sblock("otf_rows"), tile, preserve_unit_loops=True)
    if len(func.params) == 4 and _per_tile_row(sch):  # production (m_q, s_m internal)
        for name in ("m_quant", "m_scale", "m_absmax", "m_absmax_lanes"):
            sch.compute_at(sch.get_sblock(name), tile, preserve_unit_loops=True)
        _vectorize(sch, sch.get_loops(sch.get_sblock("m_scale"))[-1])  # 2 divisions per scale
    for name in ("otf_rows", "otf_cols"):
        blk = sch.get_sblock(name)
        t_, k_, a_, j_ = sch.get_loops(blk)[-4:]
        sch.reorder(a_, j_, k_)  # under t_ (which holds the earlier stages in otf_cols)
        sch.unroll(a_)
        sch.unroll(j_)
        _vectorize_in_groups(sch, k_, _scale_group(sch, blk, "sm"))
    mq = sch.get_sblock("m_quant")
    _vectorize_in_groups(sch, sch.get_loops(mq)[-1], _scale_group(sch, mq, "sm"))
    _vectorize_lanes(sch, "m_absmax_lanes")
    if len(func.params) != 4:  # debug: M quantization at the root, parallel over positions
        sch.parallel(sch.get_loops(mq)[0])
    if transpose:  # last: tensorize replaces the block compute_at analyses
        sch.tensorize(ki, _tr.TRANSPOSE_FMA_INTRIN)
    return sch.mod["main"].with_attr(_SCHEDULED, True)


def schedule_direct(func: tirx.PrimFunc, tile_w: int = 4, lanes: int = 16) -> tirx.PrimFunc:
    """Schedule the int8 ``direct`` kernel: input quantization as in ``input``; the convolution as register
    tiles of ``tile_w`` output columns x ``lanes`` output channels (int32 accumulators in registers,
    channels vectorized, columns unrolled), parallel over (image, output row, channel block), with the
    dequantization computed per tile right after its accumulation."""
    sch = schedule_input_quant(Schedule(func))
    blk = sch.get_sblock("conv_acc")
    n, oh, ow, k, *red = sch.get_loops(blk)
    tw = _divisor(_extent(sch, ow), (tile_w, 7, 5, 6, 3, 2))
    kk = _extent(sch, k) if _extent(sch, k) <= lanes else _divisor(_extent(sch, k), (lanes, 8, 4))
    owo, owi = sch.split(ow, [None, tw])
    ko, ki = sch.split(k, [None, kk])
    sch.reorder(n, oh, ko, owo, *red, owi, ki)
    row = sch.fuse(n, oh, ko)
    sch.parallel(row)
    local = sch.cache_write(blk, 0, "local")
    sch.unroll(owi)
    sch.vectorize(ki)
    sch.decompose_reduction(blk, red[0])
    sch.vectorize(sch.get_loops(sch.get_sblock("conv_acc_init"))[-1])
    sch.reverse_compute_at(local, owo)
    sch.vectorize(sch.get_loops(local)[-1])
    schedule_direct_dequant(sch, row)
    return sch.mod["main"].with_attr(_SCHEDULED, True)


def packed_direct_columns(out_w: int, kb: int, lanes: int, accumulators: int) -> int:
    """Output columns per register block of :func:`schedule_packed_direct`: the largest of 8..2 dividing
    ``out_w`` whose ``columns * kb / lanes`` accumulators fit in ``accumulators`` (1 if none)."""
    return _divisor(out_w, tuple(t for t in (8, 7, 6, 5, 4, 3, 2) if t * kb // lanes <= accumulators))


def packed_direct_block(out_w: int, out_channels: int, blocks: tuple[int, ...], lanes: int,
                        accumulators: int) -> int:
    """Output channels per register block of :func:`schedule_packed_direct`: of ``blocks`` dividing
    ``out_channels``, the one whose register tile (with :func:`packed_direct_columns`) holds the most
    accumulators, the wider on a tie (0 if none divides)."""
    def held(kb: int) -> int:
        return packed_direct_columns(out_w, kb, lanes, accumulators) * kb // lanes

    fits = [kb for kb in blocks if out_channels % kb == 0]
    return max(fits, key=lambda kb: (held(kb), kb), default=0)


def schedule_packed_direct(func: tirx.PrimFunc, lanes: int, intrin: str, accumulators: int) -> tirx.PrimFunc:
    """Schedule a packed ``direct`` kernel (:func:`~tvm_winoq.relax.direct.packed_direct_func`) on a
    dot-product micro-kernel: ``intrin`` reduces one input quad into ``lanes`` int32 output channels
    (x86 ``vpdpbusd``, Arm ``sdot``).

    Register block: ``tw`` output columns x ``kb`` output channels (``tw * kb / lanes`` vector
    accumulators, at most ``accumulators``); per (kernel tap, input quad) one 32-bit broadcast of the
    input per column and one ``intrin`` per ``lanes`` channels; parallel over (image, channel block,
    output row), so one channel block's weights stay in cache over its rows; dequantized per row.
    """
    sch = schedule_input_quant(Schedule(func))
    blk = sch.get_sblock("conv_acc")
    n, oh, ow, ko, ki, r, s_, c4, ci = sch.get_loops(blk)
    tw = packed_direct_columns(_extent(sch, ow), _extent(sch, ki), lanes, accumulators)
    owo, owi = sch.split(ow, [None, tw])
    kbo, kl = sch.split(ki, [None, lanes])
    sch.reorder(n, ko, oh, owo, r, s_, c4, owi, kbo, kl, ci)
    row = sch.fuse(n, ko, oh)
    sch.parallel(row)
    local = sch.cache_write(blk, 0, "global")  # compacted to [tw, kb] under owo: registers
    sch.reverse_compute_at(local, owo)
    sch.vectorize(sch.get_loops(local)[-1])
    schedule_direct_dequant(sch, row)
    sch.decompose_reduction(blk, r)
    sch.unroll(owi)
    sch.unroll(kbo)
    sch.vectorize(sch.fuse(*sch.get_loops(sch.get_sblock("conv_acc_init"))[-2:]))
    sch.tensorize(kl, intrin)  # last: the tensorized block defeats compute-at analyses
    return sch.mod["main"].with_attr(_SCHEDULED, True)


def schedule_input_quant(sch: Schedule) -> Schedule:
    """The input quantization of the ``input`` and ``direct`` kernels (``x_absmax``, ``x_quant``): absmax
    in vector partial maxima; quantize + pad + NCHW->NHWC parallel over padded rows, channels vectorized,
    the NCHW rows read through shuffle transposes where they fit (:func:`_transposed_read`).  Returns the
    schedule to go on with (the transposed read works on a copy)."""
    _absmax_rfactor(sch, "x_absmax")
    q = sch.get_sblock("x_quant")
    n, h, w, c = sch.get_loops(q)
    sch.parallel(sch.fuse(n, h))
    transposed = _transposed_read(sch, q)
    if transposed is not None:
        _vectorize(transposed, c)
        return transposed
    _vectorize_gathered_channels(sch, w, c)
    return sch


def schedule_direct_dequant(sch: Schedule, row: object) -> None:
    """The direct kernel's dequantization under ``row`` (the parallel loop of its accumulation, while the
    tile is in cache), else as its own loop nest parallel over (image, channel)."""
    dq = sch.get_sblock("dequant")
    try:
        sch.reverse_compute_at(dq, row)
    except Exception:  # noqa: BLE001 - a separate loop nest, parallel over (image, channel)
        n, k, _, ow = sch.get_loops(dq)
        sch.parallel(sch.fuse(n, k))
        _vectorize(sch, ow, 8)


_SCHEDULES = {"input": schedule_input, "gemm": schedule_gemm, "output": schedule_output,
              "direct": schedule_direct}


def schedule_winoq_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Apply the CPU schedules to every PrimFunc of ``mod`` carrying a ``winoq.kernel`` attribute."""
    del target
    return schedule_kernels_with_gemm(mod, schedule_gemm)


def schedule_kernels_with_gemm(
    mod: tvm.IRModule, gemm: Callable[[tirx.PrimFunc], tirx.PrimFunc],
    direct: Callable[[tirx.PrimFunc], tirx.PrimFunc] | None = None,
) -> tvm.IRModule:
    """The CPU schedules of every ``winoq.kernel`` PrimFunc, ``gemm`` for the GEMM kernels and ``direct``
    (if given) for the direct ones (the families that tensorize them reuse the rest)."""
    table = _SCHEDULES | {"gemm": gemm} | ({"direct": direct} if direct is not None else {})

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="ScheduleWinoqKernels")
    def _pass(func: tirx.PrimFunc, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tirx.PrimFunc:
        attrs = func.attrs
        if attrs is None or "winoq.kernel" not in attrs or _SCHEDULED in attrs:
            return func
        return table[str(attrs["winoq.kernel"])](func)

    return _pass(mod)


# ------------------------------------------------------------------------------- other operators
schedule_other_ops = _ops.schedule_other_ops  # the family entry point (cpu_ops: not our kernels)
