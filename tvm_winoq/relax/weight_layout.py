"""Relax pass: lay out constant float-conv weights at compile time, as their scheduled PrimFunc reads them.

A CPU schedule of a float convolution (``schedules/cpu_ops.py``) reads its weights in blocks of ``B``
output channels, ``[K/B, R, S, C, B]`` (one contiguous vector per (r, s, c) for the register tile).
Where the weights are a constant at every call site (:func:`constant_params`), the schedule changes
the weight *parameter* to that layout and records ``{param index: B}`` in the PrimFunc attribute
``winoq.weight_blocks``; :class:`BlockConvWeights` then calls that PrimFunc (added under a new global
variable, whose signature is the new one; the naive function is dropped) on each call's constant
rewritten with NumPy::

    y = R.call_tir(fused_conv2d_add_relu, (x, W, b), ...)            # W [K, C, R, S]
    # becomes
    y = R.call_tir(fused_conv2d_add_relu, (x, blocked(W, B), b), ...)  # [K/B, R, S, C, B]

instead of transposing a copy of every weight block on every call (at ResNet-18's 256 -> 512 stride-2
conv, 4.7 MB per call for 7x7 outputs: more time than the arithmetic).  Weights that are not constants
keep the per-call copy.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .calls import call_tir_sites, is_call_tir, mutate_relax_functions

__all__ = ["WEIGHT_BLOCKS", "BlockConvWeights", "blocked", "constant_params"]

WEIGHT_BLOCKS = "winoq.weight_blocks"


def blocked(w: np.ndarray, block: int) -> np.ndarray:
    """OIHW ``w`` ``[K, C, R, S]`` -> ``[K/block, R, S, C, block]`` (contiguous)."""
    k = w.shape[0]
    if w.ndim != 4 or block < 1 or k % block:
        raise ValueError(f"blocked: weights {w.shape} cannot be split in blocks of {block} output channels")
    return np.ascontiguousarray(w.reshape(k // block, block, *w.shape[1:]).transpose(0, 3, 4, 2, 1))


def constant_params(mod: tvm.IRModule) -> dict[str, frozenset[str]]:
    """For each PrimFunc called by ``R.call_tir``: the names of its parameters that every call passes a
    constant (an argument position passed anything else at any site is left out)."""
    seen: dict[str, set[int]] = {}
    for call in call_tir_sites(mod):
        gv, args = call.args[0], call.args[1]
        fields = args.fields if isinstance(args, relax.Tuple) else []
        const = {i for i, a in enumerate(fields) if isinstance(a, tvm.ir.Constant)}
        seen[gv.name_hint] = seen[gv.name_hint] & const if gv.name_hint in seen else const
    out: dict[str, frozenset[str]] = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint in seen:
            names = [p.name for p in func.params]
            out[gv.name_hint] = frozenset(names[i] for i in seen[gv.name_hint] if i < len(names))
    return out


@relax.expr_functor.mutator
class _Blocker(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, scheduled: dict[str, tvm.tirx.PrimFunc]) -> None:
        super().__init__(mod)
        self.scheduled = scheduled
        self.added: dict[str, relax.GlobalVar] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if not is_call_tir(call):
            return call
        name = call.args[0].name_hint
        func = self.scheduled.get(name)
        if func is None:
            return call
        if name not in self.added:
            self.added[name] = self.builder_.add_func(func, name)
        fields = list(call.args[1].fields)
        for index, block in func.attrs[WEIGHT_BLOCKS].items():
            arg = fields[int(index)]
            if not isinstance(arg, tvm.ir.Constant):
                raise ValueError(f"{name}: argument {int(index)} reads pre-blocked weights but is not a "
                                 "constant")
            fields[int(index)] = relax.const(blocked(arg.value.numpy(), int(block)))
        return relax.call_tir(self.added[name], fields, call.ty_args[0])


@tvm.transform.module_pass(opt_level=0, name="BlockConvWeights")
class BlockConvWeights:
    """Call the PrimFuncs with ``winoq.weight_blocks`` on blocked constants (see the module docstring).

    Parameters
    ----------
    scheduled : dict
        ``{name of the naive PrimFunc in the module: its schedule reading blocked weights}``.
    """

    def __init__(self, scheduled: dict[str, tvm.tirx.PrimFunc]) -> None:
        self.scheduled = scheduled

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Rewrite every Relax function of ``mod`` (the pass entry point)."""
        if not self.scheduled:
            return mod
        out = mutate_relax_functions(_Blocker(mod, self.scheduled), mod)
        return relax.transform.DeadCodeElimination()(out)
