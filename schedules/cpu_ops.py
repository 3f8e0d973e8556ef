"""CPU schedules of the operators that are not our Winograd kernels (shared by the CPU families).

* :func:`schedule_conv2d_nchw`: dense NCHW float convolutions (the stem, stride-2 and 1x1 convs that
  stay float): output channels vectorized, the weights of one output-channel block transposed once
  per block into ``[R, S, C, lanes]`` (contiguous vectors; OIHW gathers them), a register tile of
  output pixels x channel vectors, input values broadcast.
* :func:`schedule_generic`: any other reduction (pooling, matmul, grouped convs) as
  ``[parallel | reduction | 4 x 8 register tile]``; elementwise nests parallel and vectorized.
* :func:`schedule_other_ops`: both over a module, then dlight's CPU rules (the CPU families' entry).
"""

from __future__ import annotations

from collections.abc import Collection

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from tvm_winoq.relax.weight_layout import WEIGHT_BLOCKS

__all__ = ["SCHEDULED", "divisor", "extent", "float_lanes", "has_block", "schedule_conv2d_nchw",
           "schedule_generic", "schedule_other_ops", "with_attrs_of"]

SCHEDULED = "tirx.is_scheduled"


def extent(sch: Schedule, loop: object) -> int:
    """Static extent of ``loop``."""
    return int(sch.get(loop).extent)


def divisor(n: int, candidates: tuple[int, ...]) -> int:
    """The first candidate dividing ``n`` (1 if none)."""
    return next((c for c in candidates if n % c == 0), 1)


def with_attrs_of(new: tirx.PrimFunc, func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``new`` carrying ``func``'s attributes (kernel kind, op pattern, ...): a kernel rebuilt by a
    family's prepack hook."""
    return new.with_attrs(func.attrs) if func.attrs is not None else new


def has_block(sch: Schedule, name: str) -> bool:
    """Whether ``sch`` has a block called ``name``."""
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - tvm raises a ScheduleError subclass
        return False
    return True


def float_lanes(target: object) -> tuple[int, int]:
    """``(lanes, accumulators)`` of the float convolution tile for ``target``: 16 float32 lanes and up to
    24 accumulators of its 32 zmm registers with AVX-512, else 8 lanes and 12 (of 16 ymm registers)."""
    from tvm.target import codegen

    try:
        wide = bool(codegen.target_has_features("avx512f", target))
    except Exception:  # noqa: BLE001 - not an x86 LLVM target
        wide = False
    return (16, 24) if wide else (8, 12)


def schedule_conv2d_nchw(sch: Schedule, blk: object, lanes: int = 8, max_acc: int = 12,
                         const_params: Collection[str] = (), blocks: dict[str, int] | None = None,
                         ) -> object | None:
    """Register-tile a legalized ``conv2d_nchw`` block vectorized over output channels.

    Loops ``[n, f, y, x | rc, ry, rx]`` become ``[(n, f / (v*lanes)) parallel, y, x / tw | ry, rx, rc |
    tw unrolled, v unrolled, lanes vectorized]`` (the padded input written channels last, so ``rc``
    walks consecutive addresses): ``tw`` output pixels x ``v`` vectors of ``lanes``
    output channels of accumulators (``tw * v <= max_acc``), each input value one broadcast.  The weight
    block of a parallel iteration is copied to ``[R, S, C, v*lanes]`` first; weights that are a
    parameter named in ``const_params`` (a constant at every call) instead become that parameter in the
    layout ``[K/(v*lanes), R, S, C, v*lanes]``, recorded as ``blocks[name] = v*lanes`` for
    :class:`tvm_winoq.relax.weight_layout.BlockConvWeights` to rewrite the constants.  Returns the parallel
    loop, or ``None`` (nothing changed) when the block is not a plain 7-loop NCHW convolution or its
    output channels are not a multiple of ``lanes``.  Summation order differs from the naive loop
    (float rounding), as in any tiled convolution.
    """
    if sch.get(blk).name_hint != "conv2d_nchw" or len(sch.get_loops(blk)) != 7:
        return None
    reads = sch.get(blk).reads
    if len(reads) != 2 or len(reads[1].region) != 4:
        return None
    n, f, y, x, rc, ry, rx = sch.get_loops(blk)
    k, ow = extent(sch, f), extent(sch, x)
    if k % lanes:
        return None
    # the largest tile of tw pixels x v channel vectors within max_acc accumulators
    v, tw = max(((vv, t) for vv in (4, 2, 1) if k % (vv * lanes) == 0 for t in range(1, 15)
                 if ow % t == 0 and vv * t <= max_acc), key=lambda p: (p[0] * p[1], p[0]))
    acc = sch.cache_write(blk, 0, "local")
    # channels innermost in the accumulator tile: contiguous vectors (registers, or at worst plain
    # vector loads/stores where LLVM keeps a large tile in memory; NCHW order made them gathers)
    sch.transform_layout(blk, ("write", 0), lambda a, b, c, d: (a, c, d, b))
    _channels_last_input(sch, blk)
    fo, fv, fl = sch.split(f, [None, v, lanes])
    xo, xi = sch.split(x, [None, tw])
    sch.reorder(n, fo, y, xo, ry, rx, rc, xi, fv, fl)
    row = sch.fuse(n, fo)
    sch.parallel(row)
    weights, block = sch.get(blk).reads[1].source.name, v * lanes
    if weights in const_params and blocks is not None:
        sch.transform_layout(blk, ("read", 1), lambda a, b, c, d: (a // block, c, d, b, a % block))
        blocks[weights] = block
    else:
        wc = sch.cache_read(blk, 1, "global")
        sch.compute_at(wc, row)
        sch.transform_layout(wc, ("write", 0), lambda a, b, c, d: (c, d, b, a))
    sch.unroll(xi)
    sch.unroll(fv)
    sch.vectorize(fl)
    sch.decompose_reduction(blk, ry)
    sch.vectorize(sch.get_loops(sch.get_sblock("conv2d_nchw_init"))[-1])
    sch.reverse_compute_at(acc, xo)
    return row


def _channels_last_input(sch: Schedule, blk: object) -> None:
    """The conv's padded input (``pad_temp``, a 4-loop elementwise producer) written ``[N, H, W, C]``,
    channels innermost: the broadcasts of one pixel's channels are then consecutive addresses (NCHW
    put successive channels a plane apart, at 32x32 4 KB: one L1 set for all of them)."""
    src = sch.get(blk).reads[0].source.name
    for prod in sch.get_producers(blk):
        block = sch.get(prod)
        if block.writes[0].source.name != src or len(sch.get_loops(prod)) != 4 or block.reads == []:
            continue
        sch.transform_layout(prod, ("write", 0), lambda a, b, c, d: (a, c, d, b))
        pn, pc, py, px = sch.get_loops(prod)
        sch.reorder(pn, py, px, pc)


def _tile_reduction(sch: Schedule, r: object) -> object | None:
    """``[outer spatial (parallel) | reduction | 4 channels (unrolled) x 8 innermost positions
    (vectorized)]`` register tiles for reduction block ``r``; returns the parallel loop."""
    split = _spatial_reduce_loops(sch, r)
    if split is None or not split[0]:
        return None
    acc = sch.cache_write(r, 0, "local")  # register accumulators
    sp, rd = split
    width = extent(sch, sp[-1])
    lanes = width if width <= 16 else divisor(width, (8, 4, 7, 2))
    wo, wi = sch.split(sp[-1], [None, lanes])
    outer, ci = sp[:-1], None
    if len(outer) >= 2 and extent(sch, outer[1]) % 4 == 0:
        co, ci = sch.split(outer[1], [None, 4])
        outer = [outer[0], co, *outer[2:]]
    sch.reorder(*outer, wo, *rd, *([ci] if ci is not None else []), wi)
    row = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(row)
    if ci is not None:
        sch.unroll(ci)
    if lanes > 1:
        sch.vectorize(wi)
    if rd:
        sch.decompose_reduction(r, rd[0])
    sch.reverse_compute_at(acc, wo)
    return row


def _spatial_reduce_loops(sch: Schedule, blk: object) -> tuple[list, list] | None:
    """Loops of ``blk`` split into (spatial, reduction), when they map 1:1 to its iter vars in order."""
    ivs = sch.get(blk).iter_vars
    loops = sch.get_loops(blk)
    if len(loops) != len(ivs):
        return None
    kinds = [int(iv.iter_type) for iv in ivs]  # 0 = data parallel, 2 = reduction
    n_sp = kinds.index(2) if 2 in kinds else len(kinds)
    if any(k != 0 for k in kinds[:n_sp]) or any(k != 2 for k in kinds[n_sp:]):
        return None
    return loops[:n_sp], loops[n_sp:]


def schedule_generic(func: tirx.PrimFunc, lanes: int = 8, max_acc: int = 12,
                     const_params: Collection[str] = ()) -> tirx.PrimFunc:
    """Parallel/vectorized schedule of a legalized operator (convolution, pooling, elementwise).

    A reduction block gets ``[outer spatial (parallel) | reduction | 4 channels (unrolled) x 8
    innermost positions (vectorized)]`` register tiles and its elementwise consumers are computed per
    parallel row; the remaining elementwise loop nests (padding, activations) are fused, parallel and
    vectorized.  (Inlining the padding would put a condition in the vectorized inner loop.)
    Dense NCHW convolutions get :func:`schedule_conv2d_nchw` instead (``lanes`` float32 lanes, at most
    ``max_acc`` accumulators: :func:`float_lanes` of the target); their weights, where they are one of
    ``const_params``, are read pre-blocked (attribute ``winoq.weight_blocks`` = ``{param index: block}``,
    :mod:`tvm_winoq.relax.weight_layout`).
    """
    sch = Schedule(func)
    root = sch.get_sblock("root") if has_block(sch, "root") else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    red = [b for b in blocks if any(int(iv.iter_type) == 2 for iv in sch.get(b).iter_vars)]
    moved: set[str] = set()
    weight_blocks: dict[str, int] = {}
    flat = [sch.get(b).name_hint for b in blocks if not red or not sch.get(b).same_as(sch.get(red[0]))]
    for r in red[:1]:
        pos = [sch.get(b).same_as(sch.get(r)) for b in blocks].index(True)
        after = [sch.get(b).name_hint for b in blocks[pos + 1:]]
        row = schedule_conv2d_nchw(sch, r, lanes, max_acc, const_params, weight_blocks)
        if row is None:
            row = _tile_reduction(sch, r)
        if row is None:
            continue
        for name in after:  # the elementwise epilogue, per parallel row
            try:
                b = sch.get_sblock(name)
                sch.reverse_compute_at(b, row)
                inner_c = sch.get_loops(b)[-1]
                if extent(sch, inner_c) % 8 == 0:
                    sch.vectorize(sch.split(inner_c, [None, 8])[1])
                moved.add(name)
            except Exception:  # noqa: BLE001 - stays a separate loop nest
                pass
    for name in flat:  # the other loop nests at the root (padding, elementwise): parallel, vectorized
        if name in moved:
            continue
        b = sch.get_sblock(name)
        split = _spatial_reduce_loops(sch, b)
        if split is None or split[1] or len(split[0]) < 2:
            continue
        *out, inner = split[0]
        sch.parallel(sch.fuse(*out) if len(out) > 1 else out[0])
        vec = divisor(extent(sch, inner), (16, 8, 4))
        if vec > 1:
            sch.vectorize(sch.split(inner, [None, vec])[1])
    out = sch.mod["main"].with_attr(SCHEDULED, True)
    if weight_blocks:
        names = [p.name for p in out.params]
        out = out.with_attr(WEIGHT_BLOCKS, {names.index(n): b for n, b in weight_blocks.items()})
    return out


def schedule_other_ops(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule the remaining (legalized) PrimFuncs: ``cpu_ops.schedule_generic`` first, then dlight's CPU
    rules (GEMV, Reduction) for whatever the generic schedule could not handle.

    dlight's CPU ``Reduction`` rule alone would also claim convolutions, recomputing the padded input
    per output pixel (about 20x slower than naive for ResNet's stride-2 convs), hence the order.
    Float convolutions whose weights are constants read them blocked at compile time
    (:mod:`tvm_winoq.relax.weight_layout`).
    """
    from tvm.s_tir import dlight as dl

    from tvm_winoq.relax.weight_layout import BlockConvWeights, constant_params

    lanes, max_acc = float_lanes(target)
    consts = constant_params(mod)
    mod, blocked = mod.clone(), {}
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or (
                func.attrs is not None and (SCHEDULED in func.attrs or "winoq.kernel" in func.attrs)):
            continue
        try:
            new = schedule_generic(func, lanes, max_acc, consts.get(gv.name_hint, ()))
        except Exception:  # noqa: BLE001 - a failed schedule keeps the (correct) naive function
            continue
        if WEIGHT_BLOCKS in new.attrs:  # a new signature: called under a new global var
            blocked[gv.name_hint] = new
        else:
            mod.update_func(gv, new)
    mod = BlockConvWeights(blocked)(mod)
    with target:
        return dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())(mod)
