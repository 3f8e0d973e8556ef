"""CPU legalizations of Relax operators whose upstream TIR no CPU schedule can make fast.

``relax.nn.group_norm`` (NCHW, statistics over H and W): upstream's ``topi.nn.group_norm`` reshapes
the input to ``[N, G, C/G, H, W]`` and reduces ``(sum x, sum x^2)`` over the last three axes into one
value per group, so the only data-parallel axis of the reduction is the group: a schedule vectorizes
over groups, which gathers elements ``C/G * H * W`` floats apart (the diffusion UNet's group norms
took 17 of its 84 ms at 1 thread).  Here the reduction keeps ``lanes`` partial sums per group, one per
position of a contiguous vector of the row (``[N, G, lanes]``, reduced over the group's channels and
the row's vectors), then adds the lanes (a tiny second reduction), and normalizes in NCHW directly
(no reshaped copies).  Same formula (``E[x^2] - E[x]^2``, float32), another summation order: results
differ from upstream's by float rounding only.
"""

from __future__ import annotations

from tvm import relax, te, tirx, topi

__all__ = ["GROUP_NORM_LANES", "cpu_legalize_map", "group_norm_nchw"]

GROUP_NORM_LANES = (16, 8)
"""Partial sums per group: the first that divides the row width."""


def group_norm_nchw(x: te.Tensor, gamma: te.Tensor, beta: te.Tensor, groups: int, epsilon: float,
                    lanes: int) -> te.Tensor:
    """Group norm of NCHW ``x`` (statistics over each group's channels, H and W) with per-lane partial
    sums; ``lanes`` must divide ``W``."""
    n, c, h, w = (int(v) for v in x.shape)
    cg, wv = c // groups, w // lanes
    rc = te.reduce_axis((0, cg), "rc")
    rh = te.reduce_axis((0, h), "rh")
    rv = te.reduce_axis((0, wv), "rv")
    zero = tirx.const(0.0, x.dtype)
    pair = te.comm_reducer(lambda a, b: (a[0] + b[0], a[1] + b[1]), lambda t0, t1: (zero, zero),
                           name="sum_and_squares")

    def element(b, g, ln):
        return x[b, g * cg + rc, rh, rv * lanes + ln]

    part_sum, part_sq = te.compute(
        (n, groups, lanes),
        lambda b, g, ln: pair((element(b, g, ln), element(b, g, ln) * element(b, g, ln)), axis=[rc, rh, rv]),
        name="group_norm_partial",
    )
    rl = te.reduce_axis((0, lanes), "rl")
    total, total_sq = te.compute(
        (n, groups), lambda b, g: pair((part_sum[b, g, rl], part_sq[b, g, rl]), axis=rl),
        name="group_norm_sum")
    inv_count = tirx.const(1.0 / (cg * h * w), x.dtype)
    eps = tirx.const(epsilon, x.dtype)

    def norm(b, ch, i, j):
        g = ch // cg
        mean = total[b, g] * inv_count
        var = total_sq[b, g] * inv_count - mean * mean
        return (x[b, ch, i, j] - mean) * tirx.rsqrt(var + eps) * gamma[ch] + beta[ch]

    return te.compute((n, c, h, w), norm, name="group_norm")


def _group_norm(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    from tvm.relax.transform.legalize_ops.nn import _nn_group_norm

    ty = call.args[0].ty
    dims = ty.shape if isinstance(ty, relax.TensorType) and ty.dtype == "float32" else None
    shape = [int(v) if isinstance(v, tirx.IntImm) else None for v in dims or []]
    axes = [int(a) for a in call.attrs.axes]
    lanes = next((ln for ln in GROUP_NORM_LANES if len(shape) == 4 and shape[3] and shape[3] % ln == 0), 0)
    if (len(shape) != 4 or None in shape or int(call.attrs.channel_axis) != 1
            or sorted(a % 4 for a in axes) != [2, 3] or not lanes):
        return _nn_group_norm(bb, call)
    return bb.call_te(group_norm_nchw, call.args[0], call.args[1], call.args[2], int(call.attrs.num_groups),
                      float(call.attrs.epsilon), lanes, primfunc_name_hint="group_norm")


def sigmoid_fast_exp(x: te.Tensor) -> te.Tensor:
    """``1 / (1 + exp(-x))`` with ``topi.fast_exp`` (a polynomial that vectorizes; LLVM's ``exp`` is a
    scalar ``expf`` call per element)."""
    e = topi.fast_exp(te.compute(x.shape, lambda *i: -x(*i), name="sigmoid_neg"))
    one = tirx.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: one / (one + e(*i)), name="sigmoid")


def _sigmoid_te(arg: relax.Expr):
    """The sigmoid TE function for ``arg``: :func:`sigmoid_fast_exp` for float32, else TOPI's."""
    ty = arg.ty
    return sigmoid_fast_exp if isinstance(ty, relax.TensorType) and ty.dtype == "float32" else topi.sigmoid


def _sigmoid(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return bb.call_te(_sigmoid_te(call.args[0]), call.args[0], primfunc_name_hint="sigmoid")


def _silu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    sig = _sigmoid_te(call.args[0])
    return bb.call_te(lambda x: topi.multiply(x, sig(x)), call.args[0], primfunc_name_hint="silu")


def cpu_legalize_map() -> dict[str, object]:
    """``LegalizeOps(customize_legalize_map=...)`` for the CPU (LLVM) targets."""
    return {"relax.nn.group_norm": _group_norm, "relax.sigmoid": _sigmoid, "relax.nn.silu": _silu}
