"""Relax pass: pack constant kernel weights at compile time, in the layout a family's kernel reads.

A schedule family may export hooks ``prepack_gemm(func, target)`` and ``prepack_direct(func, target)``,
each returning ``(kernel, packing) | None`` (``schedules/x86.py`` has both). For every
``R.call_tir(kernel, args, ...)`` of that kind whose weight argument is a constant and whose kernel the
hook accepts, the call is rewritten to the hook's kernel (added once per kernel, as
``<name>_prepacked``) on the weight packed as its ``packing`` says (``packing.pack(w)``), the weight's
scales (the next argument, also a constant) laid out as it says (``packing.scales(s)``), followed by the
constants it adds (``packing.extras(w)``), computed here with NumPy::

    mf = R.call_tir(winoq_gemm_*, (vq, sv, U_q, s_U), m_f)      # U_q: argument 2
    y = R.call_tir(winoq_direct_*, (x, W_q, s_W, bias), y)       # W_q: argument 1
    # become
    mf = R.call_tir(winoq_gemm_*_prepacked, (vq, sv, packing.pack(U_q), packing.scales(s_U),
                                             *packing.extras(U_q)), m_f)
    y = R.call_tir(winoq_direct_*_prepacked, (x, packing.pack(W_q), packing.scales(s_W), bias,
                                              *packing.extras(W_q)), y)

so the module no longer repacks the weights on every call (the GEMM's ``U`` is 36 x C x K bytes for
F(4,3)). Kernels a hook declines, and kinds without a hook, are left unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import tvm
from tvm import relax

from .calls import is_call_tir, mutate_relax_functions

__all__ = ["WEIGHT_ARG", "PrepackWeights"]


class Packing(Protocol):
    """What a hook's packing provides (:class:`~.gemm.UPacking`, :class:`~.direct.DirectPacking`)."""

    def pack(self, w: np.ndarray) -> np.ndarray: ...  # noqa: D102

    def scales(self, s: np.ndarray) -> np.ndarray: ...  # noqa: D102

    def extras(self, w: np.ndarray) -> list[np.ndarray]: ...  # noqa: D102


Hook = Callable[[tvm.tirx.PrimFunc, Any], "tuple[tvm.tirx.PrimFunc, Packing] | None"]

WEIGHT_ARG = {"gemm": 2, "direct": 1}
"""Per ``winoq.kernel`` kind: the index of its weight among the call's 4 arguments."""


@relax.expr_functor.mutator
class _Prepacker(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, hooks: Mapping[str, Hook], target: Any) -> None:
        super().__init__(mod)
        self.mod_, self.hooks, self.target = mod, hooks, target
        self.kernels: dict[str, tuple[relax.GlobalVar, Packing, int] | None] = {}

    def _kernel(self, gv: relax.GlobalVar) -> tuple[relax.GlobalVar, Packing, int] | None:
        name = gv.name_hint
        if name not in self.kernels:
            func = self.mod_[gv]
            attrs = func.attrs if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None else {}
            kind = str(attrs.get("winoq.kernel", ""))
            got = self.hooks[kind](func, self.target) if kind in self.hooks else None
            self.kernels[name] = None if got is None else (
                self.builder_.add_func(got[0], f"{name}_prepacked"), got[1], WEIGHT_ARG[kind])
        return self.kernels[name]

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if not is_call_tir(call):
            return call
        gv, args = call.args[0], call.args[1]
        if not isinstance(args, relax.Tuple) or len(args.fields) != 4:
            return call
        kernel = self._kernel(gv)
        if kernel is None or not isinstance(args.fields[kernel[2]], tvm.ir.Constant):
            return call
        new_gv, packing, index = kernel
        fields = list(args.fields)
        if not isinstance(fields[index + 1], tvm.ir.Constant):  # the packed kernel reads them packed too
            return call
        w = fields[index].value.numpy()
        fields[index] = relax.const(packing.pack(w))
        fields[index + 1] = relax.const(packing.scales(fields[index + 1].value.numpy()))
        fields += [relax.const(e) for e in packing.extras(w)]
        return relax.call_tir(new_gv, fields, call.ty_args[0])


@tvm.transform.module_pass(opt_level=0, name="PrepackWeights")
class PrepackWeights:
    """Rewrite constant-weight kernel calls to the family's prepacked kernels (see the module docstring).

    Parameters
    ----------
    hooks : mapping
        ``winoq.kernel`` kind (``"gemm"``, ``"direct"``) -> the family's hook for it.
    target : tvm.target.Target
        Passed to the hooks.
    """

    def __init__(self, hooks: Mapping[str, Hook], target: Any) -> None:
        unknown = set(hooks) - set(WEIGHT_ARG)
        if unknown:
            raise ValueError(f"PrepackWeights: no weight argument known for kernels {sorted(unknown)}")
        self.hooks, self.target = dict(hooks), target

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Rewrite every Relax function of ``mod`` (the pass entry point)."""
        out = mutate_relax_functions(_Prepacker(mod, self.hooks, self.target), mod)
        return relax.transform.DeadCodeElimination()(out)
