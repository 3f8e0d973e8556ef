"""The Relax Winograd rewrite pass: exact IR structure (TVMScript Before/Expected), numerics, reporting."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_winoq.config import groupwise
from tvm_winoq.errors import ConfigError
from tvm_winoq.quant import direct_conv2d_int8, plan_layer, winograd_conv2d_int
from tvm_winoq.relax.direct import DirectSpec, direct_constants
from tvm_winoq.relax.kernels import KernelSpec, layer_constants
from tvm_winoq.relax.rewrite import WinogradRewrite, direct_kernel_func, kernel_funcs, weight_fingerprint

pytestmark = pytest.mark.tvm

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})
_g = np.random.default_rng(0)
W = (_g.standard_normal((16, 8, 3, 3)) * 0.1).astype("float32")
B = (_g.standard_normal((1, 16, 1, 1)) * 0.1).astype("float32")
W1 = (_g.standard_normal((16, 16, 1, 1)) * 0.1).astype("float32")
W_S2 = (_g.standard_normal((16, 16, 3, 3)) * 0.1).astype("float32")


def _before() -> tvm.IRModule:
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 8, 9, 9), "float32")) -> R.Tensor((1, 16, 9, 9), "float32"):
            with R.dataflow():
                lv = R.nn.conv2d(x, R.const(W), padding=[1, 1, 1, 1], out_dtype="float32")
                lv1 = R.add(lv, R.const(B))
                gv = R.nn.relu(lv1)
                R.output(gv)
            return gv

    return Before


def _expected(cfg) -> tvm.IRModule:
    plan = plan_layer(torch.from_numpy(W), torch.from_numpy(B.reshape(-1)), (1, 1), cfg)
    spec = KernelSpec.from_plan(plan, (1, 8, 9, 9))
    cst = layer_constants(plan)
    assert spec.key() == "f4_c8_k16_9x9"

    @I.ir_module(check_well_formed=False)
    class Expected:
        @T.prim_func(private=True)
        def winoq_input_f4_c8_k16_9x9():
            T.evaluate(0)

        @T.prim_func(private=True)
        def winoq_gemm_f4_c8_k16_9x9():
            T.evaluate(0)

        @T.prim_func(private=True)
        def winoq_output_f4_c8_k16_9x9():
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor((1, 8, 9, 9), "float32")) -> R.Tensor((1, 16, 9, 9), "float32"):
            cls = Expected
            with R.dataflow():
                lv = R.call_tir(cls.winoq_input_f4_c8_k16_9x9, (x,), out_ty=[
                    R.Tensor((36, 9, 8), "int8"), R.Tensor((36, 9, 1), "float32"), R.Tensor((1,), "float32")])
                v_q = lv[0]
                s_v = lv[1]
                s_x = lv[2]
                m_f = R.call_tir(cls.winoq_gemm_f4_c8_k16_9x9,
                                 (v_q, s_v, R.const(cst["u_q"]), R.const(cst["s_u"])),
                                 out_ty=R.Tensor((36, 9, 16), "float32"))
                y = R.call_tir(cls.winoq_output_f4_c8_k16_9x9, (m_f, s_x, R.const(cst["bias"])),
                               out_ty=R.Tensor((1, 16, 9, 9), "float32"))
                gv = R.nn.relu(y)
                R.output(gv)
            return gv

    for name, func in kernel_funcs(spec).items():
        Expected.update_func(Expected.get_global_var(name), func)
    return Expected


def test_conv_bias_is_rewritten_to_three_call_tirs():
    cfg = groupwise(tile=4)
    rw = WinogradRewrite(cfg)
    after = rw(_before())
    tvm.ir.assert_structural_equal(after, _expected(cfg))
    assert [(r.rewritten, r.reason) for r in rw.records] == [(True, "F(4,3) + bias")]


def test_rewritten_module_runs_and_matches_reference():
    cfg = groupwise(tile=4)
    after = WinogradRewrite(cfg)(_before())
    x = np.random.default_rng(1).standard_normal((1, 8, 9, 9)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(after, target=TARGET), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    plan = plan_layer(torch.from_numpy(W), torch.from_numpy(B.reshape(-1)), (1, 1), cfg)
    ref = torch.relu(winograd_conv2d_int(torch.from_numpy(x), plan)).numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def _mixed() -> tvm.IRModule:
    @I.ir_module
    class Mixed:
        @R.function
        def main(x: R.Tensor((1, 16, 8, 8), "float32"), w: R.Tensor((16, 16, 3, 3), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, R.const(W1))  # 1x1
                b = R.nn.conv2d(a, R.const(W_S2), strides=[2, 2], padding=[1, 1, 1, 1])  # stride 2
                c = R.nn.conv2d(x, R.const(W_S2), padding=[2, 2, 2, 2], dilation=[2, 2])  # dilated
                d = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])  # weight not constant
                e = R.nn.conv2d(x, R.const(W_S2), padding=[1, 0, 1, 0])  # eligible, no bias
                f = R.nn.conv2d(x, R.const(W_S2), padding=[0, 0, 1, 1])  # asymmetric padding
                gv = (b, c, d, e, f)
                R.output(gv)
            return gv

    return Mixed


def test_ineligible_convs_are_left_with_reasons():
    rw = WinogradRewrite(groupwise(tile=2))
    after = rw(_mixed())
    reasons = {r.name: (r.rewritten, r.reason) for r in rw.records}
    assert reasons == {
        "conv2d#0": (False, "kernel 1x1"),
        "conv2d#1": (False, "stride 2"),
        "conv2d#2": (False, "dilation 2"),
        "conv2d#3": (False, "weight is not a constant"),
        "conv2d#4": (True, "F(2,3)"),
        "conv2d#5": (False, "asymmetric padding (0, 0, 1, 1)"),
    }
    calls = [b.value for b in after["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call)]
    n_conv = sum(isinstance(c.op, tvm.ir.Op) and c.op.name == "relax.nn.conv2d" for c in calls)
    assert n_conv == 5
    assert len([gv for gv in after.get_global_vars() if gv.name_hint.startswith("winoq_")]) == 3


def test_layer_names_and_per_layer_choices():
    names = {weight_fingerprint(W): "features.conv"}
    rw = WinogradRewrite(groupwise(tile=4).with_(layers={"features.conv": "float"}), layer_names=names)
    after = rw(_before())
    assert [(r.name, r.rewritten, r.reason) for r in rw.records] == [
        ("features.conv", False, "config chooses 'float' for this layer")]
    tvm.ir.assert_structural_equal(after, _before())
    rw = WinogradRewrite(groupwise(tile=4).with_(layers={"features.conv": "f2"}), layer_names=names)
    after = rw(_before())
    assert [r.reason for r in rw.records] == ["F(2,3) + bias"]
    assert {gv.name_hint for gv in after.get_global_vars()} >= {"winoq_gemm_f2_c8_k16_9x9"}
    assert "features.conv" in rw.summary()


# ------------------------------------------------------------------------------ per-layer int8 direct
def _expected_direct(cfg) -> tvm.IRModule:
    spec = DirectSpec.of((1, 8, 9, 9), W.shape, padding=(1, 1, 1, 1))
    cst = direct_constants(torch.from_numpy(W), torch.from_numpy(B.reshape(-1)), cfg.direct)
    assert spec.key() == "direct_c8_k16_3x3s1_9x9"

    @I.ir_module(check_well_formed=False)
    class Expected:
        @T.prim_func(private=True)
        def winoq_direct_c8_k16_3x3s1_9x9():
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor((1, 8, 9, 9), "float32")) -> R.Tensor((1, 16, 9, 9), "float32"):
            cls = Expected
            with R.dataflow():
                y = R.call_tir(cls.winoq_direct_c8_k16_3x3s1_9x9,
                               (x, R.const(cst["w_q"]), R.const(cst["s_w"]), R.const(cst["bias"])),
                               out_ty=R.Tensor((1, 16, 9, 9), "float32"))
                gv = R.nn.relu(y)
                R.output(gv)
            return gv

    for name, func in direct_kernel_func(spec).items():
        Expected.update_func(Expected.get_global_var(name), func)
    return Expected


def test_direct_choice_is_rewritten_to_one_int8_call_tir():
    names = {weight_fingerprint(W): "features.conv"}
    cfg = groupwise(tile=4).with_(layers={"features.conv": "direct"})
    rw = WinogradRewrite(cfg, layer_names=names)
    after = rw(_before())
    tvm.ir.assert_structural_equal(after, _expected_direct(cfg))
    assert [(r.name, r.rewritten, r.reason, r.kind) for r in rw.records] == [
        ("features.conv", True, "int8 direct + bias", "direct")]
    assert " D " in rw.summary()
    x = np.random.default_rng(2).standard_normal((1, 8, 9, 9)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(after, target=TARGET), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    bias = torch.from_numpy(B.reshape(-1))
    ref = direct_conv2d_int8(torch.from_numpy(x), torch.from_numpy(W), bias, (1, 1), cfg.direct)
    ref = torch.relu(ref).numpy()
    assert np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max()


def test_direct_on_ineligible_convs_matches_reference():
    """``direct`` takes 1x1, strided, dilated and asymmetrically padded convs; an explicit Winograd choice
    for a stride-2 conv becomes ``direct`` too (as in ``quantize_model``)."""
    layers = {"conv2d#0": "direct", "conv2d#1": "f4", "conv2d#2": "direct", "conv2d#5": "direct"}
    cfg = groupwise(tile=2).with_(layers=layers)
    rw = WinogradRewrite(cfg)
    after = rw(_mixed())
    got = {r.name: (r.kind, r.reason) for r in rw.records}
    assert got == {
        "conv2d#0": ("direct", "int8 direct"),
        "conv2d#1": ("direct", "int8 direct (Winograd not applicable: stride 2)"),
        "conv2d#2": ("direct", "int8 direct"),
        "conv2d#3": ("float", "weight is not a constant"),
        "conv2d#4": ("winograd", "F(2,3)"),
        "conv2d#5": ("direct", "int8 direct"),
    }
    g = np.random.default_rng(3)
    x = g.standard_normal((1, 16, 8, 8)).astype("float32")
    w = (g.standard_normal((16, 16, 3, 3)) * 0.1).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(after, target=TARGET), tvm.cpu())
    b, c, _, _, f = (o.numpy() for o in vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)))
    xt, ws2, spec = torch.from_numpy(x), torch.from_numpy(W_S2), cfg.direct
    a_ref = direct_conv2d_int8(xt, torch.from_numpy(W1), None, (0, 0), spec)
    refs = {
        "b": (b, direct_conv2d_int8(a_ref, ws2, None, (1, 1), spec, stride=2)),
        "c": (c, direct_conv2d_int8(xt, ws2, None, (2, 2), spec, dilation=2)),
        "f": (f, direct_conv2d_int8(torch.nn.functional.pad(xt, (0, 1, 0, 1)), ws2, None, (0, 0), spec)),
    }
    for name, (got_y, ref) in refs.items():
        assert got_y.shape == tuple(ref.shape), name
        assert np.abs(got_y - ref.numpy()).max() <= 1e-6 * np.abs(ref.numpy()).max(), name


def test_ineligible_direct_takes_every_unnamed_conv_winograd_cannot():
    """``cfg.ineligible = "direct"`` (every conv W8A8): unnamed convs Winograd cannot run become int8
    direct; a layer named ``float`` stays float; eligible ones stay Winograd."""
    cfg = groupwise(tile=2).with_(layers={"conv2d#2": "float"}, ineligible="direct")
    rw = WinogradRewrite(cfg)
    rw(_mixed())
    got = {r.name: (r.kind, r.reason) for r in rw.records}
    assert got == {
        "conv2d#0": ("direct", "int8 direct (Winograd not applicable: kernel 1x1)"),
        "conv2d#1": ("direct", "int8 direct (Winograd not applicable: stride 2)"),
        "conv2d#2": ("float", "dilation 2"),
        "conv2d#3": ("float", "weight is not a constant"),
        "conv2d#4": ("winograd", "F(2,3)"),
        "conv2d#5": ("direct", "int8 direct (Winograd not applicable: asymmetric padding (0, 0, 1, 1))"),
    }
    with pytest.raises(ConfigError, match="ineligible"):
        cfg.with_(ineligible="int4")
