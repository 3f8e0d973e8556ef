"""PrepackGemmWeights: the GEMM's constant U packed at compile time (x86 family), same results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from tvm_winoq.config import default_config
from tvm_winoq.convert import quantize_model
from tvm_winoq.relax.build import compile_model, lower, prepare_module
from tvm_winoq.relax.kernels import pack_u
from tvm_winoq.relax.prepack import PrepackGemmWeights

pytestmark = pytest.mark.tvm

TARGET = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 1}


def _model(c: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(c, c, 3, padding=1)).eval()


def test_pack_u_layout() -> None:
    u = np.arange(2 * 6 * 3, dtype=np.int8).reshape(2, 6, 3)  # P, Cp, K
    p = pack_u(u, 2)
    assert p.shape == (2, 3, 3, 2) and p.flags.c_contiguous
    for c in range(6):
        assert np.array_equal(p[:, c // 2, :, c % 2], u[:, c, :])
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_u(u, 4)


def test_pack_u_blocked_layout() -> None:
    u = np.arange(2 * 6 * 8, dtype=np.int8).reshape(2, 6, 8)  # P, Cp, K
    p = pack_u(u, 2, 4)
    assert p.shape == (2, 2, 3, 4, 2) and p.flags.c_contiguous
    for c in range(6):
        for k in range(8):
            assert np.array_equal(p[:, k // 4, c // 2, k % 4, c % 2], u[:, c, k])
    with pytest.raises(ValueError, match="not a multiple of 3"):
        pack_u(u, 2, 3)


def test_declining_hook_changes_nothing() -> None:
    m, x = _model(), torch.randn(1, 32, 9, 9)
    mod, _, _ = prepare_module(m, x, default_config(4))
    seen: list[str] = []

    def hook(func, target):
        seen.append(str(func.attrs["winoq.kernel"]))
        return None

    out = PrepackGemmWeights(hook, None)(mod)
    tvm.ir.assert_structural_equal(out, mod)
    assert seen == ["gemm"]  # asked once per gemm kernel (both convs share one), never for others


@pytest.mark.parametrize(("c", "hw", "tile"), [(32, 9, 4), (64, 7, 6)])
def test_x86_model_uses_prepacked_gemm_and_matches_reference(c: int, hw: int, tile: int) -> None:
    m, x = _model(c), torch.randn(1, c, hw, hw)
    cfg = default_config(tile)
    mod, _, _ = prepare_module(m, x, cfg)
    low = lower(mod, tvm.target.Target(TARGET))
    gemms = [gv.name_hint for gv in low.functions.keys() if "gemm" in gv.name_hint]
    assert gemms and all(n.endswith("_prepacked") for n in gemms), gemms
    for name in gemms:  # U in blocks of the register block's 16 output channels: [P, K/16, Cp/2, 16, 2]
        u = low[name].params[2]
        assert [int(d) for d in u.shape][1:] == [c // 16, c // 2, 16, 2]
    y = compile_model(m, x, cfg, target=TARGET).runner()(x)
    qm, _ = quantize_model(m, cfg, None)
    with torch.no_grad():
        ref = qm(x).numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_x86_hook_declines_scheduled_gemm() -> None:
    """A GEMM that already has a schedule (e.g. from a tune log) keeps its own kernel."""
    from tvm.s_tir import Schedule

    from tvm_winoq.relax.schedules import schedules_for

    m, x = _model(), torch.randn(1, 32, 9, 9)
    mod, _, _ = prepare_module(m, x, default_config(4))
    target = tvm.target.Target(TARGET)
    fam = schedules_for(target)
    gemm = next(f for gv, f in mod.functions.items() if "gemm" in gv.name_hint)
    assert fam.prepack_gemm(gemm, target) is not None
    sch = Schedule(gemm)
    sch.decompose_reduction(sch.get_sblock("gemm_acc"), sch.get_loops(sch.get_sblock("gemm_acc"))[-1])
    assert fam.prepack_gemm(sch.mod["main"].with_attrs(gemm.attrs), target) is None


@pytest.mark.parametrize("kb", [0, 16])
def test_x86_schedules_both_packed_layouts_bit_exact(kb: int) -> None:
    """A kernel on ``U`` packed at compile time, blocked by output channels or not, gets the x86
    micro-kernel and computes the naive kernel's bits."""
    from tvm_winoq.relax.kernels import GemmShape, gemm_kernel
    from tvm_winoq.relax.schedules import load_family

    target = tvm.target.Target(TARGET)
    s = GemmShape(36, 8, 64, 32, 32, 2, 2, 32, "int8")
    rng = np.random.default_rng(0)
    vq, uq = (rng.integers(-127, 128, shape).astype("int8") for shape in ((36, 8, 64), (36, 64, 32)))
    sv, su = rng.random((36, 8, 2)).astype("float32"), rng.random((36, 2, 32)).astype("float32")

    def run(func: tvm.tirx.PrimFunc, u: np.ndarray) -> np.ndarray:
        lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=target)
        mf = tvm.runtime.tensor(np.zeros((36, 8, 32), "float32"))
        lib["k"](*(tvm.runtime.tensor(a) for a in (vq, sv, u, su)), mf)
        return mf.numpy()

    packed = gemm_kernel(s, widen=True, u_pack=2, u_kblock=kb).with_attr("winoq.kernel", "gemm")
    scheduled = load_family("x86").schedule_gemm(packed, target)
    assert "tirx.is_scheduled" in scheduled.attrs
    np.testing.assert_array_equal(run(scheduled, pack_u(uq, 2, kb)), run(gemm_kernel(s), uq))
