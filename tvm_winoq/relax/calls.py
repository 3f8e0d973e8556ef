"""Helpers for the Relax passes that rewrite ``R.call_tir`` sites (``prepack``, ``weight_layout``)."""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax

__all__ = ["call_tir_sites", "is_call_tir", "mutate_relax_functions"]


def is_call_tir(expr: Any) -> bool:
    """Whether ``expr`` is an ``R.call_tir(...)`` call."""
    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name == "relax.call_tir")


def call_tir_sites(root: tvm.IRModule | relax.Function) -> list[relax.Call]:
    """Every ``R.call_tir`` call in ``root`` (a Relax function, or all Relax functions of a module)."""
    funcs = [f for _, f in root.functions_items()] if isinstance(root, tvm.IRModule) else [root]
    calls: list[relax.Call] = []
    for func in funcs:
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: calls.append(e) if is_call_tir(e) else None)
    return calls


def mutate_relax_functions(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every Relax function rewritten by ``mutator`` (built on ``mod``); PrimFuncs the
    mutator added are in the result."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
