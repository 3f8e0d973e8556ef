"""Relax pass that replaces eligible float ``conv2d`` calls by the quantized Winograd TIR kernels.

A call ``R.nn.conv2d(x, W)`` (optionally followed by ``R.add(_, b)`` with a per-channel constant bias)
with a constant 3x3 weight, stride 1, dilation 1, groups 1, symmetric zero padding, NCHW/OIHW layouts
and a static float32 input becomes::

    lv = R.call_tir(winoq_input_*, (x,), [v_q, s_v, s_x])
    mf = R.call_tir(winoq_gemm_*, (lv[0], lv[1], U_q, s_U), m_f)
    y  = R.call_tir(winoq_output_*, (mf, lv[2], bias), y)

with ``U_q``/``s_U``/``bias`` constants from :func:`~tvm_winoq.quant.plan.plan_layer`.  A conv whose
per-layer choice is ``direct`` (any kernel size, stride, dilation, groups) becomes one int8 direct
convolution kernel (:mod:`.direct`)::

    y  = R.call_tir(winoq_direct_*, (x, W_q, s_W, bias), y)

An explicit Winograd choice (``f2``/``f4``/``f6`` in ``cfg.layers``) for a conv Winograd cannot run also
becomes ``direct``, as in :func:`tvm_winoq.convert.quantize_model`, and so does every conv Winograd
cannot run that ``cfg.layers`` does not name when ``cfg.ineligible == "direct"``.  Every other conv is
left alone, and
:attr:`WinogradRewrite.records` says why.  The kernels carry
``op_pattern = 8`` (opaque) so Relax operator fusion leaves them intact, and ``winoq.kernel`` naming
their stage so a schedule can find them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ..config import WinoQConfig
from ..convert import winograd_tile
from ..quant.plan import LayerScales, plan_layer
from .direct import DirectSpec, direct_constants, direct_func
from .kernels import KernelSpec, gemm_func, input_func, layer_constants, output_func

__all__ = ["RewriteRecord", "WinogradRewrite", "direct_kernel_func", "kernel_funcs", "weight_fingerprint"]

#: ``op_pattern`` value of an opaque operator (relax ``OpPatternKind::kOpaque``): never fused.
OPAQUE = 8


def weight_fingerprint(weight: np.ndarray) -> str:
    """Stable key of a conv weight (shape + float32 bytes), used to map Relax constants to layer names."""
    arr = np.ascontiguousarray(weight, dtype=np.float32)
    h = hashlib.sha1(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()[:20]


def kernel_funcs(spec: KernelSpec) -> dict[str, tvm.tirx.PrimFunc]:
    """``{global name: PrimFunc}`` of the three (production) kernels of ``spec``, as the pass adds them."""
    stages = (("input", input_func(spec)), ("gemm", gemm_func(spec)), ("output", output_func(spec)))
    return {
        f"winoq_{stage}_{spec.key()}": f.with_attr("op_pattern", OPAQUE).with_attr("winoq.kernel", stage)
        for stage, f in stages
    }


def direct_kernel_func(spec: DirectSpec) -> dict[str, tvm.tirx.PrimFunc]:
    """``{global name: PrimFunc}`` of the int8 direct kernel of ``spec``, as the pass adds it."""
    f = direct_func(spec).with_attr("op_pattern", OPAQUE).with_attr("winoq.kernel", "direct")
    return {f"winoq_{spec.key()}": f}


@dataclass(frozen=True)
class RewriteRecord:
    """What the pass did with one ``conv2d`` call.

    ``kind`` is ``"winograd"`` or ``"direct"`` (int8 direct kernel) when ``rewritten``, else ``"float"``;
    ``kernels`` the global names of the PrimFuncs it calls (shared by layers of one shape; a family may
    later replace one by ``<name>_prepacked``).
    """

    name: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    rewritten: bool
    reason: str
    kind: str = "float"
    kernels: tuple[str, ...] = ()


def _ints(values: object) -> tuple[int, ...]:
    return tuple(int(v) for v in values)  # type: ignore[attr-defined]


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return _ints(ty.shape)
    except (TypeError, ValueError):
        return None


_X, _W, _B = wildcard(), is_const(), is_const()
_CONV = is_op("relax.nn.conv2d")(_X, _W)
_CONV_BIAS = is_op("relax.add")(_CONV, _B)


@relax.expr_functor.mutator
class _ConvRewriter(relax.PyExprMutator):
    """Rewrites the conv2d calls of one module (see :class:`WinogradRewrite`)."""

    def __init__(self, mod: tvm.IRModule, owner: WinogradRewrite) -> None:
        super().__init__(mod)
        self.owner = owner
        self.var2val: dict = {}
        self.uses: dict = {}
        self.fused_convs: list[relax.Expr] = []
        self.index = 0
        self.last_kernels: tuple[str, ...] = ()

    # -- analysis -------------------------------------------------------------------------------
    def _prepare(self, func: relax.Function) -> None:
        self.var2val = relax.analysis.get_var2val(func)
        counts: dict[relax.Var, int] = {}

        def count(e: object) -> None:
            if isinstance(e, relax.Call):
                for a in e.args:
                    if isinstance(a, relax.Var):
                        counts[a] = counts.get(a, 0) + 1
            elif isinstance(e, relax.Tuple):
                for a in e.fields:
                    if isinstance(a, relax.Var):
                        counts[a] = counts.get(a, 0) + 1

        for block in func.body.blocks:
            for b in block.bindings:
                count(b.value)
                if isinstance(b.value, relax.Var):
                    counts[b.value] = counts.get(b.value, 0) + 1
        if isinstance(func.body.body, relax.Var):
            counts[func.body.body] = counts.get(func.body.body, 0) + 1
        self.fused_convs = []
        for val in self.var2val.values():
            m = _CONV_BIAS.extract_matched_expr(val, self.var2val) if isinstance(val, relax.Call) else None
            if m is None or not isinstance(val.args[0], relax.Var) or counts.get(val.args[0], 0) != 1:
                continue
            if self._bias_of(m[_B], m[_CONV]) is not None:
                self.fused_convs.append(m[_CONV])

    @staticmethod
    def _bias_of(const: relax.Expr, conv: relax.Call) -> np.ndarray | None:
        k = _static_shape(conv.args[1])
        b = const.value.numpy()
        if k is None or b.dtype != np.float32 or b.size != k[0]:
            return None
        if b.shape not in ((1, k[0], 1, 1), (k[0], 1, 1)):
            return None
        return b.reshape(-1)

    # -- rewriting ------------------------------------------------------------------------------
    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        m = _CONV_BIAS.extract_matched_expr(call, self.var2val)
        if m is not None and any(c.same_as(m[_CONV]) for c in self.fused_convs):
            new = self._rewrite(m[_CONV], self._bias_of(m[_B], m[_CONV]))
            if new is not None:
                return new
            return super().visit_call_(call)
        m = _CONV.extract_matched_expr(call)
        if m is None:
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d":
                self._record(call, False, "weight is not a constant")
            return super().visit_call_(call)
        if any(c.same_as(call) for c in self.fused_convs):
            return super().visit_call_(call)  # handled (with its bias) at the add; left dead here
        new = self._rewrite(call, None)
        return new if new is not None else super().visit_call_(call)

    def _record(self, conv: relax.Call, done: bool, reason: str, name: str | None = None,
                kind: str = "float", kernels: tuple[str, ...] = ()) -> None:
        w = _static_shape(conv.args[1]) or ()
        x = _static_shape(conv.args[0]) or ()
        if name is None:
            name = self._name(conv)
            self.index += 1
        self.owner.records.append(RewriteRecord(name, w, x, done, reason, kind, kernels))

    def _name(self, conv: relax.Call) -> str:
        w = conv.args[1]
        if isinstance(w, tvm.ir.Constant):
            key = weight_fingerprint(w.value.numpy())
            if key in self.owner.layer_names:
                return self.owner.layer_names[key]
        return f"conv2d#{self.index}"

    @staticmethod
    def _why_not_int8(conv: relax.Call) -> str | None:
        """Why no integer kernel (Winograd or direct) can take ``conv`` (``None``: one can)."""
        a = conv.attrs
        x, w = _static_shape(conv.args[0]), _static_shape(conv.args[1])
        if x is None or len(x) != 4 or w is None or len(w) != 4:
            return "input shape is not static 4-D"
        if conv.args[0].ty.dtype != "float32" or conv.args[1].ty.dtype != "float32":
            return "not float32"
        if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
            return f"layout {a.data_layout}/{a.kernel_layout}/{a.out_layout}"
        if w[1] * int(a.groups) != x[1]:
            return "channel mismatch"
        return None

    def _why_not(self, conv: relax.Call) -> str | None:
        """Why Winograd ``F(m,3)`` cannot take ``conv`` (``None``: it can)."""
        basic = self._why_not_int8(conv)
        if basic is not None:
            return basic
        a = conv.attrs
        w = _static_shape(conv.args[1])
        reasons = []
        if w is None or w[2:] != (3, 3):
            reasons.append(f"kernel {w[2] if w else '?'}x{w[3] if w else '?'}")
        if _ints(a.strides) != (1, 1):
            reasons.append(f"stride {_ints(a.strides)[0]}")
        if _ints(a.dilation) != (1, 1):
            reasons.append(f"dilation {_ints(a.dilation)[0]}")
        if int(a.groups) != 1:
            reasons.append("depthwise" if w is not None and w[1] == 1 else f"groups={int(a.groups)}")
        pad = _ints(a.padding)
        if pad[0] != pad[2] or pad[1] != pad[3]:
            reasons.append(f"asymmetric padding {pad}")
        return ", ".join(reasons) or None

    def _rewrite(self, conv: relax.Call, bias: np.ndarray | None) -> relax.Expr | None:
        name = self._name(conv)
        self.index += 1
        why = self._why_not(conv)
        cfg = self.owner.cfg
        choice = cfg.layers.get(name, f"f{cfg.tile}")
        tile = winograd_tile(choice)
        if tile is not None and why is not None and name in cfg.layers:
            choice, tile = "direct", None  # an explicit Winograd choice Winograd cannot run: int8 direct
        if choice == "direct" or (why is not None and name not in cfg.layers and cfg.ineligible == "direct"):
            return self._rewrite_direct(conv, bias, name, why)
        if why is not None:
            self._record(conv, False, why, name)
            return None
        if tile is None:
            self._record(conv, False, f"config chooses {choice!r} for this layer", name)
            return None
        lcfg = cfg if tile == cfg.tile else cfg.with_(tile=tile, points=None)
        sc = self.owner.scales.get(name) if isinstance(self.owner.scales, Mapping) else self.owner.scales
        if sc is not None and sc.s_b.numel() != lcfg.tile + 2:
            sc = None
        pad = _ints(conv.attrs.padding)
        weight = torch.from_numpy(conv.args[1].value.numpy().copy())
        b = None if bias is None else torch.from_numpy(bias.copy())
        x = self.visit_expr(conv.args[0])
        plan = plan_layer(weight, b, (pad[0], pad[1]), lcfg, sc)
        out = self.emit_layer(x, plan, _static_shape(conv.args[0]))
        self._record(conv, True, f"F({lcfg.tile},3)" + (" + bias" if bias is not None else ""), name,
                     "winograd", self.last_kernels)
        return out

    def _rewrite_direct(self, conv: relax.Call, bias: np.ndarray | None, name: str,
                        why_not_winograd: str | None) -> relax.Expr | None:
        """Emit the int8 direct kernel for ``conv`` (or record why not and return ``None``)."""
        why = self._why_not_int8(conv)
        if why is not None:
            self._record(conv, False, why, name)
            return None
        a, cfg = conv.attrs, self.owner.cfg
        w = conv.args[1].value.numpy()
        try:
            spec = DirectSpec.of(_static_shape(conv.args[0]), w.shape, stride=_ints(a.strides),
                                 dilation=_ints(a.dilation), padding=_ints(a.padding), groups=int(a.groups),
                                 act_qmax=cfg.act.qmax)
            consts = direct_constants(torch.from_numpy(w.copy()),
                                      None if bias is None else torch.from_numpy(bias.copy()), cfg.direct)
        except ValueError as e:
            self._record(conv, False, f"int8 direct not possible: {e}", name)
            return None
        x = self.visit_expr(conv.args[0])
        (kname, func), = direct_kernel_func(spec).items()
        gv = self.builder_.add_func(func, kname)
        out = relax.call_tir(gv, [x, relax.const(consts["w_q"]), relax.const(consts["s_w"]),
                                  relax.const(consts["bias"])], relax.TensorType(spec.out_shape, "float32"))
        reason = "int8 direct" + (" + bias" if bias is not None else "")
        if why_not_winograd is not None and cfg.layers.get(name) != "direct":
            reason += f" (Winograd not applicable: {why_not_winograd})"
        self._record(conv, True, reason, name, "direct", (gv.name_hint,))
        return out

    def emit_layer(self, x: relax.Expr, plan: object, x_shape: tuple[int, ...] | None) -> relax.Expr:
        """Emit the three kernel calls of ``plan`` on ``x``; returns the (unbound) output call (the
        kernels' global names are left in ``last_kernels``)."""
        spec = KernelSpec.from_plan(plan, x_shape)  # type: ignore[arg-type]
        consts = layer_constants(plan)  # type: ignore[arg-type]
        bb = self.builder_
        gvs = [bb.add_func(f, name) for name, f in kernel_funcs(spec).items()]
        self.last_kernels = tuple(gv.name_hint for gv in gvs)
        p, t = spec.positions, spec.tiles
        c, k = spec.in_channels, spec.out_channels
        lv = bb.emit(relax.call_tir(gvs[0], [x], [
            relax.TensorType((p, t, c), spec.v.dtype), relax.TensorType(spec.sv_shape, "float32"),
            relax.TensorType((1,), "float32")]))
        vq, sv, sx = (bb.emit(relax.TupleGetItem(lv, i)) for i in range(3))
        mf = bb.emit(relax.call_tir(gvs[1], [vq, sv, relax.const(consts["u_q"]), relax.const(consts["s_u"])],
                                    relax.TensorType((p, t, k), "float32")))
        return relax.call_tir(gvs[2], [mf, sx, relax.const(consts["bias"])],
                              relax.TensorType(spec.out_shape, "float32"))


@tvm.transform.module_pass(opt_level=0, name="WinogradRewrite")
class WinogradRewrite:
    """Replace eligible ``conv2d`` (+ bias) calls by quantized group-wise Winograd TIR kernels (and convs
    whose per-layer choice is ``direct`` by the int8 direct kernel).

    Parameters
    ----------
    cfg : WinoQConfig
        Tile size, quantization specs and per-layer overrides (``cfg.layers`` keyed by layer name).
    scales : LayerScales or mapping name -> LayerScales, optional
        Shared or per-layer learned Winograd scales (``None``: standard scales).
    layer_names : mapping, optional
        :func:`weight_fingerprint` -> layer name (from :func:`tvm_winoq.relax.importer.import_model`);
        used for ``cfg.layers``, per-layer scales and the records.

    Attributes
    ----------
    records : list of RewriteRecord
        One entry per conv2d seen by the last run, rewritten or not, with the reason.
    """

    def __init__(
        self,
        cfg: WinoQConfig,
        scales: LayerScales | Mapping[str, LayerScales] | None = None,
        layer_names: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.scales = scales
        self.layer_names = dict(layer_names or {})
        self.records: list[RewriteRecord] = []

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        """Rewrite every Relax function of ``mod`` (the pass entry point)."""
        self.records = []
        rw = _ConvRewriter(mod, self)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw._prepare(func)
                rw.builder_.update_func(gv, rw.visit_expr(func))
        out = rw.builder_.get()
        return relax.transform.DeadCodeElimination()(out)

    def summary(self) -> str:
        """One line per conv: ``name  CxK  HxW  rewritten|left  reason``."""
        lines = []
        for r in self.records:
            shape = f"{r.weight_shape[1]}->{r.weight_shape[0]}" if len(r.weight_shape) == 4 else "?"
            hw = "x".join(str(d) for d in r.input_shape[2:]) or "?"
            tag = {"winograd": "F", "direct": "D"}.get(r.kind, "-")
            lines.append(f"{r.name:32s} {shape:>10s} {hw:>8s}  {tag}  {r.reason}")
        return "\n".join(lines)
