"""Relax pass: pack the Winograd GEMM's constant ``U`` at compile time, in the layout a family's kernel reads.

A schedule family may export ``prepack_gemm(func, target) -> (kernel, UPacking) | None``
(``schedules/x86.py`` does). For every ``R.call_tir(winoq_gemm_*, (v_q, s_v, U_q, s_U), ...)`` whose
``U_q`` is a constant and whose kernel the family accepts, the call is rewritten to the family's kernel
(added once per kernel, as ``<name>_prepacked``) on ``U_q`` packed as the hook's
:class:`~.gemm.UPacking` says (plus the constants it adds), computed here with NumPy::

    mf = R.call_tir(winoq_gemm_*, (vq, sv, U_q, s_U), m_f)
    # becomes
    mf = R.call_tir(winoq_gemm_*_prepacked, (vq, sv, packing.pack(U_q), s_U, *packing.extras(U_q)), m_f)

so the module no longer repacks all of ``U`` on every call. Kernels the family declines, and families
without the hook, are left unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tvm
from tvm import relax

from .calls import is_call_tir, mutate_relax_functions
from .gemm import UPacking

__all__ = ["PrepackGemmWeights"]

Hook = Callable[[tvm.tirx.PrimFunc, Any], "tuple[tvm.tirx.PrimFunc, UPacking] | None"]


@relax.expr_functor.mutator
class _Prepacker(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, hook: Hook, target: Any) -> None:
        super().__init__(mod)
        self.mod_, self.hook, self.target = mod, hook, target
        self.kernels: dict[str, tuple[relax.GlobalVar, UPacking] | None] = {}

    def _kernel(self, gv: relax.GlobalVar) -> tuple[relax.GlobalVar, UPacking] | None:
        name = gv.name_hint
        if name not in self.kernels:
            func = self.mod_[gv]
            attrs = func.attrs if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None else {}
            got = self.hook(func, self.target) if attrs.get("winoq.kernel") == "gemm" else None
            self.kernels[name] = None if got is None else (
                self.builder_.add_func(got[0], f"{name}_prepacked"), got[1])
        return self.kernels[name]

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if not is_call_tir(call):
            return call
        gv, args = call.args[0], call.args[1]
        if not isinstance(args, relax.Tuple) or len(args.fields) != 4:
            return call
        u = args.fields[2]
        if not isinstance(u, tvm.ir.Constant):
            return call
        kernel = self._kernel(gv)
        if kernel is None:
            return call
        new_gv, packing = kernel
        fields = list(args.fields)
        u_q = u.value.numpy()
        fields[2] = relax.const(packing.pack(u_q))
        fields += [relax.const(e) for e in packing.extras(u_q)]
        return relax.call_tir(new_gv, fields, call.ty_args[0])


@tvm.transform.module_pass(opt_level=0, name="PrepackGemmWeights")
class PrepackGemmWeights:
    """Rewrite constant-``U`` GEMM calls to the family's prepacked kernels (see the module docstring).

    Parameters
    ----------
    hook : callable
        The family's ``prepack_gemm(func, target)``.
    target : tvm.target.Target
        Passed to ``hook``.
    """

    def __init__(self, hook: Hook, target: Any) -> None:
        self.hook, self.target = hook, target

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Rewrite every Relax function of ``mod`` (the pass entry point)."""
        out = mutate_relax_functions(_Prepacker(mod, self.hook, self.target), mod)
        return relax.transform.DeadCodeElimination()(out)
