"""PrepackWeights: the GEMM's constant U and the direct kernel's W packed at compile time (x86 family), same
results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from tvm_winoq.config import default_config
from tvm_winoq.convert import quantize_model
from tvm_winoq.relax.build import compile_model, lower, prepare_module
from tvm_winoq.relax.gemm import GemmShape, UPacking, block_scales, gemm_kernel, pack_u
from tvm_winoq.relax.prepack import PrepackWeights
from tvm_winoq.relax.schedules import load_family
from tvm_winoq.targets import get_preset, host_features

pytestmark = pytest.mark.tvm

TARGET = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 1}
VNNI = get_preset("x86-avx512-vnni").tvm_target()
needs_vnni = pytest.mark.skipif("vnni" not in host_features(), reason="this CPU cannot run AVX-512 VNNI code")


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

    out = PrepackWeights({"gemm": hook, "direct": hook}, None)(mod)
    tvm.ir.assert_structural_equal(out, mod)
    assert seen == ["gemm"]  # asked once per gemm kernel (both convs share one), never for others


@pytest.mark.parametrize(("c", "hw", "tile", "kb"), [(32, 9, 4, 16), (64, 7, 6, 16), (32, 28, 4, 8)])
def test_x86_model_uses_prepacked_gemm_and_matches_reference(c: int, hw: int, tile: int, kb: int) -> None:
    """U packed in blocks of the register block's output channels: two ymm vectors (16), one (8) where
    the block has 7 tiles (28x28: 49 tiles; 14 accumulators of two vectors would spill)."""
    m, x = _model(c), torch.randn(1, c, hw, hw)
    cfg = default_config(tile)
    mod, _, _ = prepare_module(m, x, cfg)
    low = lower(mod, tvm.target.Target(TARGET))
    gemms = [gv.name_hint for gv in low.functions.keys() if "gemm" in gv.name_hint]
    assert gemms and all(n.endswith("_prepacked") for n in gemms), gemms
    for name in gemms:  # U in blocks of the register block's output channels: [P, K/kb, Cp/2, kb, 2]
        u = low[name].params[2]
        assert [int(d) for d in u.shape][1:] == [c // kb, c // 2, kb, 2]
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


@pytest.mark.parametrize(("t", "k", "lanes", "block"), [(196, 64, 8, (4, 16)), (49, 128, 8, (7, 8)),
                                                        (49, 128, 16, (7, 32)), (16, 8, 8, (4, 8)),
                                                        (9, 64, 8, (3, 16)), (121, 320, 8, (11, 8)),
                                                        (121, 320, 16, (11, 32)), (169, 64, 8, (1, 16))])
def test_x86_register_block(t: int, k: int, lanes: int, block: tuple[int, int]) -> None:
    """Tiles x output channels per register block: never more int32 accumulators than registers hold."""
    assert load_family("x86").register_block(t, k, lanes) == block


@pytest.mark.parametrize("kb", [0, 16])
def test_x86_schedules_both_packed_layouts_bit_exact(kb: int) -> None:
    """A kernel on ``U`` packed at compile time, blocked by output channels or not, gets the x86
    micro-kernel and computes the naive kernel's bits."""
    target = tvm.target.Target(TARGET)
    s = GemmShape(36, 8, 64, 32, 32, 2, 2, 32, "int8")
    rng = np.random.default_rng(0)
    vq, uq = (rng.integers(-127, 128, shape).astype("int8") for shape in ((36, 8, 64), (36, 64, 32)))
    sv, su = rng.random((36, 8, 2)).astype("float32"), rng.random((36, 2, 32)).astype("float32")

    def run(func: tvm.tirx.PrimFunc, u: np.ndarray, scales: np.ndarray) -> np.ndarray:
        lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=target)
        mf = tvm.runtime.tensor(np.zeros((36, 8, 32), "float32"))
        lib["k"](*(tvm.runtime.tensor(a) for a in (vq, sv, u, scales)), mf)
        return mf.numpy()

    packed = gemm_kernel(s, widen=True, u_pack=2, u_kblock=kb).with_attr("winoq.kernel", "gemm")
    scheduled = load_family("x86").schedule_gemm(packed, target)
    assert "tirx.is_scheduled" in scheduled.attrs
    np.testing.assert_array_equal(run(scheduled, pack_u(uq, 2, kb), block_scales(su, kb)),
                                  run(gemm_kernel(s), uq, su))


def test_blocked_scales_follow_the_blocked_weights() -> None:
    """With ``kb`` the U scales come ``[P, K/kb, Gg, kb]``: a channel block's scales over every group
    contiguous, as its weights are."""
    su = np.arange(3 * 2 * 32, dtype="float32").reshape(3, 2, 32)  # [P, Gg, K]
    blocked = UPacking(2, 16).scales(su)
    assert blocked.shape == (3, 2, 2, 16) and blocked.flags.c_contiguous
    for p, g, k in [(0, 0, 0), (1, 1, 17), (2, 0, 31)]:
        assert blocked[p, k // 16, g, k % 16] == su[p, g, k]
    assert UPacking(2).scales(su) is su  # not blocked: as it is
    with pytest.raises(ValueError, match="multiple of 16"):
        block_scales(su[..., :24], 16)


def test_upacking_extras_are_group_sums_times_offset() -> None:
    rng = np.random.default_rng(1)
    u = rng.integers(-128, 128, (3, 64, 16)).astype("int8")
    assert UPacking(2, 16).extras(u) == []
    (uc,) = UPacking(4, 16, 128, 32).extras(u)  # blocked as the scales: [P, K/kb, Gg, kb]
    assert uc.dtype == np.int32 and uc.shape == (3, 1, 2, 16)
    np.testing.assert_array_equal(uc[:, 0, 1, :], 128 * u[:, 32:, :].astype(np.int32).sum(axis=1))
    with pytest.raises(ValueError, match="bad packing"):
        UPacking(4, 16, 128)  # an offset needs the group its sums run over
    with pytest.raises(ValueError, match="multiple of the group 48"):
        UPacking(4, 16, 128, 48).extras(u)


def test_offset_kernel_rejects_what_it_cannot_compute() -> None:
    s = GemmShape(4, 8, 64, 32, 32, 2, 2, 32, "int8")
    with pytest.raises(ValueError, match="v_offset needs"):
        gemm_kernel(s, v_offset=128)  # U not packed
    with pytest.raises(ValueError, match="v_offset needs"):
        gemm_kernel(GemmShape(4, 8, 48, 32, 32, 2, 2, 32, "int8"), u_pack=4, v_offset=128)  # partial group


def _gemm_operands(s: GemmShape, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    vq = rng.integers(-128, 128, (s.p, s.t, s.c)).astype("int8")  # the full int8 range, -128 included
    uq = rng.integers(-128, 128, (s.p, s.c, s.k)).astype("int8")
    sv, su = rng.random((s.p, s.t, s.gv)), rng.random((s.p, s.ng, s.k))
    return vq, sv.astype("float32"), uq, su.astype("float32")


def _run_gemm(func: tvm.tirx.PrimFunc, target: tvm.target.Target, s: GemmShape,
              *args: np.ndarray) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=target)
    mf = tvm.runtime.tensor(np.zeros((s.p, s.t, s.k), "float32"))
    lib["k"](*(tvm.runtime.tensor(a) for a in args), mf)
    return mf.numpy()


VNNI_SHAPES = [GemmShape(36, 8, 64, 32, 32, 2, 2, 32, "int8"),
               GemmShape(16, 12, 128, 48, 64, 2, 4, 32, "int8")]


@pytest.mark.parametrize("s", VNNI_SHAPES, ids=lambda s: f"c{s.c}_k{s.k}_g{s.gg}")
def test_vnni_hook_packs_quads_and_emits_vpdpbusd(s: GemmShape) -> None:
    """On AVX-512 VNNI the hook takes U in quads of input channels plus the offset sums ``u_c``, and the
    scheduled kernel's loop is ``vpdpbusd`` (compiled on any x86 host)."""
    fam = load_family("x86")
    plain = gemm_kernel(s).with_attr("winoq.kernel", "gemm")
    kernel, packing = fam.prepack_gemm(plain, VNNI)
    assert packing == UPacking(4, 32 if s.k % 32 == 0 else 16, 128, s.gg)
    assert [p.name for p in kernel.params] == ["vq", "sv", "uq", "su", "uc", "mf"]
    lib = tvm.compile(tvm.IRModule({"k": fam.schedule_gemm(kernel, VNNI).with_attr("global_symbol", "k")}),
                      target=VNNI)
    asm = (lib.mod if hasattr(lib, "mod") else lib).inspect_source("asm")
    assert "vpdpbusd" in asm and "vpmulld" not in asm
    assert fam.prepack_gemm(plain, tvm.target.Target(TARGET))[1] == UPacking(2, 16)  # AVX2: int16 pairs


@needs_vnni
@pytest.mark.parametrize("s", VNNI_SHAPES, ids=lambda s: f"c{s.c}_k{s.k}_g{s.gg}")
def test_vnni_kernel_bit_exact(s: GemmShape) -> None:
    """``(v + 128) * u - 128 * sum(u)`` on ``vpdpbusd``: the naive kernel's bits, -128 operands included."""
    fam = load_family("x86")
    vq, sv, uq, su = _gemm_operands(s)
    kernel, packing = fam.prepack_gemm(gemm_kernel(s).with_attr("winoq.kernel", "gemm"), VNNI)
    got = _run_gemm(fam.schedule_gemm(kernel, VNNI), VNNI, s,
                    vq, sv, packing.pack(uq), packing.scales(su), *packing.extras(uq))
    np.testing.assert_array_equal(got, _run_gemm(gemm_kernel(s), VNNI, s, vq, sv, uq, su))


@needs_vnni
def test_vnni_model_matches_reference() -> None:
    m, x = _model(64), torch.randn(1, 64, 12, 12)
    cfg = default_config(4)
    low = lower(prepare_module(m, x, cfg)[0], VNNI)
    gemms = [gv.name_hint for gv in low.functions.keys() if "gemm" in gv.name_hint]
    assert gemms and all(n.endswith("_prepacked") and len(low[n].params) == 6 for n in gemms), gemms
    y = compile_model(m, x, cfg, target=VNNI).runner()(x)
    qm, _ = quantize_model(m, cfg, None)
    with torch.no_grad():
        ref = qm(x).numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
