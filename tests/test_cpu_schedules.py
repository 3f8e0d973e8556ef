"""CPU family schedules of the operators around our kernels, and what makes the kernels' loops vectorize.

* ``cpu_ops.schedule_conv2d_nchw``: the float convolutions that stay float (stem, stride 2, 1x1) are
  vectorized over output channels with their weight block transposed per parallel iteration; checked
  structurally (the loop nest) and numerically against PyTorch, with the fallback for channel counts
  that are not a multiple of the vector width;
* ``tirx.nearbyint`` (our quantizer's rounding) is vectorizable, so quantization loops stay vector
  loops through ``VectorizeLoop`` (upstream scalarizes them);
* ``LoadedModel`` returns a NumPy view of each call's own output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from tvm_winoq.config import default_config
from tvm_winoq.relax.build import compile_model, lower, prepare_module
from tvm_winoq.relax.schedules import load_module
from tvm_winoq.targets import get_preset, host_features

pytestmark = pytest.mark.tvm

TARGET = get_preset("host").tvm_target()
AVX512 = get_preset("x86-avx512-vnni").tvm_target()


def _conv_relu(c: int, k: int, ks: int, stride: int) -> torch.nn.Module:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c, k, ks, stride=stride, padding=ks // 2)
    return torch.nn.Sequential(conv, torch.nn.ReLU()).eval()


def _lowered_conv(model: torch.nn.Module, x: torch.Tensor) -> tvm.tirx.PrimFunc:
    mod, _, _ = prepare_module(model, x, default_config(tile=4, group=8))
    lowered = lower(mod, TARGET)
    (func,) = [f for gv, f in lowered.functions.items() if "conv2d" in gv.name_hint]
    return func


def _lowered(model: torch.nn.Module, x: torch.Tensor) -> tvm.IRModule:
    mod, _, _ = prepare_module(model, x, default_config(tile=4, group=8))
    return lower(mod, TARGET)


def test_conv2d_nchw_vectorized_over_output_channels():
    func = _lowered_conv(_conv_relu(8, 16, 3, 2), torch.randn(1, 8, 10, 10))
    text = func.script()
    # 5 output pixels x 2 x 8 channels of accumulators
    update = text[text.index("for ry, rx, rc"):text.index('T.sblock("conv2d_nchw_update")')]
    assert "T.unroll(T.int64(5))" in update and "T.unroll(T.int64(2))" in update
    assert "T.vectorized(T.int64(8))" in update


def test_constant_weights_are_blocked_at_compile_time():
    """Constant weights: the PrimFunc reads ``[K/16, C, R, S, 16]`` and the call passes that constant."""
    model, x = _conv_relu(8, 32, 3, 2), torch.randn(1, 8, 10, 10)
    low = _lowered(model, x)
    (gv,) = [g for g in low.functions.keys() if "conv2d" in g.name_hint]
    func = low[gv]
    assert "param_0_global" not in func.script()
    assert {int(k): int(v) for k, v in func.attrs["winoq.weight_blocks"].items()} == {1: 16}
    assert "param_0: T.Buffer((T.int64(2), T.int64(3), T.int64(3), T.int64(8), T.int64(16))" in func.script()
    # the padded input channels last
    pad = "pad_temp = T.sblock_alloc_buffer((T.int64(1), T.int64(12), T.int64(12), T.int64(8)))"
    assert pad in func.script()
    from tvm_winoq.relax.weight_layout import blocked

    consts: list[np.ndarray] = []

    def visit(e: tvm.relax.Expr) -> None:
        if isinstance(e, tvm.ir.Constant) and hasattr(e.value, "numpy") and e.value.numpy().ndim == 5:
            consts.append(e.value.numpy())

    tvm.relax.analysis.post_order_visit(low["main"], visit)
    (w,) = consts
    np.testing.assert_array_equal(w, blocked(model[0].weight.detach().numpy(), 16))
    with pytest.raises(ValueError, match="blocks of 12"):
        blocked(np.zeros((16, 8, 3, 3), "float32"), 12)


def test_constant_params_needs_a_constant_at_every_call_site():
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    from tvm_winoq.relax.weight_layout import constant_params

    @I.ir_module
    class Mod:
        @T.prim_func(private=True, s_tir=True)
        def add(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32"), c: T.Buffer((4,), "float32")):
            for i in range(4):
                with T.sblock("c"):
                    vi = T.axis.remap("S", [i])
                    c[vi] = a[vi] + b[vi]

        @R.function
        def main(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
            cls = Mod
            with R.dataflow():
                y = R.call_tir(cls.add, (x, R.const(np.ones(4, "float32"))), out_ty=R.Tensor((4,), "float32"))
                z = R.call_tir(cls.add, (R.const(np.ones(4, "float32")), y), out_ty=R.Tensor((4,), "float32"))
                R.output(z)
            return z

    assert constant_params(Mod) == {"add": frozenset()}  # b is a variable at the second call
    assert isinstance(Mod["main"], relax.Function)


def test_weights_that_are_not_constants_are_copied_per_call():
    """Without ``const_params`` (weights passed at run time) each block is transposed per call."""
    from tvm import relax

    model, x = _conv_relu(8, 16, 3, 2), torch.randn(1, 8, 10, 10)
    mod, _, _ = prepare_module(model, x, default_config(tile=4, group=8))
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    (func,) = [f for gv, f in mod.functions.items() if "conv2d" in gv.name_hint]
    text = load_module("cpu_ops").schedule_generic(func).script()
    assert 'param_0_global = T.sblock_alloc_buffer((T.int64(3), T.int64(3), T.int64(8), T.int64(16)))' in text


def test_conv2d_accumulators_channels_innermost():
    """The register tile's buffer is ``[N, OH, OW, K]``: its channel vectors are contiguous (in NCHW
    order a tile LLVM leaves in memory was read and written with scalar gathers, 10x slower)."""
    text = _lowered_conv(_conv_relu(8, 16, 3, 2), torch.randn(1, 8, 10, 10)).script()
    assert ('_local = T.sblock_alloc_buffer((T.int64(1), T.int64(5), T.int64(5), T.int64(16)), '
            'scope="local")') in text


def test_float_lanes_follow_the_vector_width():
    ops = load_module("cpu_ops")
    assert ops.float_lanes(TARGET) == (8, 12)  # host preset: AVX2, 16 ymm registers
    assert ops.float_lanes(AVX512) == (16, 24)  # 32 zmm registers
    assert ops.float_lanes(get_preset("rpi4").tvm_target()) == (8, 12)


def test_conv2d_nchw_channels_not_a_multiple_of_lanes_keeps_generic_tiling():
    func = _lowered_conv(_conv_relu(8, 12, 3, 2), torch.randn(1, 8, 10, 10))
    text = func.script()
    assert "param_0_global" not in text and "T.parallel" in text


@pytest.mark.parametrize("c, k, ks, stride, h", [(3, 16, 7, 2, 30), (16, 32, 3, 2, 14), (16, 32, 1, 2, 14),
                                                 (8, 12, 3, 2, 9), (24, 16, 3, 1, 7)])
@pytest.mark.parametrize("target", ["host", "x86-avx512-vnni"])
def test_float_convs_match_pytorch(c, k, ks, stride, h, target):
    if target != "host" and "avx512" not in host_features():
        pytest.skip("this CPU cannot run AVX-512 code")
    model = _conv_relu(c, k, ks, stride)
    x = torch.randn(1, c, h, h)
    cfg = default_config(tile=4, group=8)
    y = compile_model(model, x, cfg, target=get_preset(target).tvm_target(), winograd=False).runner()(x)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_nearbyint_is_vectorizable():
    assert tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable")


def test_quantization_loops_stay_vector_loops():
    """The V quantization of the input kernel reaches codegen as a vector ``nearbyint``."""
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1)).eval()
    mod, _, _ = prepare_module(model, torch.randn(1, 32, 12, 12), default_config(tile=4, group=16))
    lowered = lower(mod, TARGET)
    (func,) = [f for gv, f in lowered.functions.items() if gv.name_hint.startswith("winoq_input")]
    seen: list[str] = []

    @tvm.instrument.pass_instrument
    class AfterVectorize:
        def run_after_pass(self, mod, info):
            if info.name.endswith("VectorizeLoop"):
                seen.append(mod.script())

    with tvm.transform.PassContext(opt_level=3, instruments=[AfterVectorize()]):
        tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=TARGET)
    text = seen[0]
    rounded = [line for line in text.splitlines() if "T.nearbyint" in line]
    assert rounded and all("T.Ramp" in line for line in rounded)


def _winoq_kernels(c: int, k: int, h: int, w: int, tile: int) -> dict[str, tvm.tirx.PrimFunc]:
    model = torch.nn.Sequential(torch.nn.Conv2d(c, k, 3, padding=1)).eval()
    mod, _, _ = prepare_module(model, torch.randn(1, c, h, w), default_config(tile=tile, group=8))
    lowered = lower(mod, TARGET)
    return {str(f.attrs["winoq.kernel"]): f for f in lowered.functions.values()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "winoq.kernel" in f.attrs}


@pytest.mark.parametrize(("c", "k", "h", "w", "tile", "input_t", "output_t"), [
    (16, 16, 16, 16, 4, 8, True),  # 8 | C, W; 8 | K, W and the tiles cover H, W exactly
    (16, 8, 12, 12, 4, 4, False),  # W = 12: 4x4 input transposes; 8 does not divide W
    (16, 16, 16, 16, 6, 8, False),  # F(6,3): 6 tiles do not cover 16 exactly
    (12, 16, 7, 7, 4, None, False),  # nothing divides 7
])
def test_nchw_transposes_are_shuffles_where_they_fit(c, k, h, w, tile, input_t, output_t):
    """The NCHW input read and the NCHW output store move whole vectors through shuffle transposes
    where the shapes allow (else per-element gathers): checked on the scheduled TIR."""
    funcs = _winoq_kernels(c, k, h, w, tile)
    inp, out = funcs["input"].script(), funcs["output"].script()
    assert ("T.Shuffle" in inp) == (input_t is not None)
    if input_t is not None:
        assert f"T.Ramp(0, 1, {input_t})" in inp
    assert ("T.Shuffle" in out) == output_t


def test_cpu_ops_loads_as_a_helper_module():
    ops = load_module("cpu_ops")
    assert callable(ops.schedule_conv2d_nchw) and ops.SCHEDULED == "tirx.is_scheduled"


def test_loaded_model_outputs_do_not_alias():
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 8, 8, 8)
    runner = compile_model(model, x, default_config(tile=4, group=8), target=TARGET).runner()
    a = runner(x)
    a_copy = a.copy()
    b = runner(2 * x)
    np.testing.assert_array_equal(a, a_copy)  # the second call did not overwrite the first result
    assert not np.array_equal(a, b)
    identity = compile_model(torch.nn.Sequential(torch.nn.Identity()).eval(), x,
                             default_config(tile=4, group=8), target=TARGET).runner()
    first = identity(x)
    identity(3 * x)
    np.testing.assert_array_equal(first, x.numpy())  # not a view of the reused input tensor
