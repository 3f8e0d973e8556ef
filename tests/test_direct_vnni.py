"""The int8 direct kernel on weights packed at compile time, reduced on ``vpdpbusd`` (x86 AVX-512 VNNI).

Packing and the rebuilt kernel are checked everywhere (any x86-64 host compiles for VNNI); the kernel
runs, against the plain kernel and the PyTorch integer reference, where the CPU has VNNI.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from tvm_winoq.config import default_config
from tvm_winoq.convert import quantize_model
from tvm_winoq.errors import ConfigError
from tvm_winoq.quant.baselines import direct_conv2d_int8
from tvm_winoq.relax.build import compile_model, lower, prepare_module
from tvm_winoq.relax.direct import (
    DirectPacking,
    DirectSpec,
    compile_direct_layer,
    direct_constants,
    direct_func,
    packed_direct_func,
)
from tvm_winoq.relax.schedules import load_family
from tvm_winoq.targets import get_preset, host_features

pytestmark = pytest.mark.tvm

VNNI = get_preset("x86-avx512-vnni").tvm_target()
AVX2 = get_preset("host-avx2").tvm_target()
needs_vnni = pytest.mark.skipif("vnni" not in host_features(), reason="this CPU cannot run AVX-512 VNNI code")

CASES = [  # C, K, H, W, kernel, stride, pad
    (64, 64, 14, 14, 3, 1, 1),
    (32, 48, 9, 11, 3, 2, 1),  # stride 2, K = 48: one 16-lane block (kb = 16)
    (16, 32, 8, 8, 1, 1, 0),  # 1x1
    (128, 64, 7, 7, 3, 1, 1),
    (3, 64, 20, 20, 7, 2, 3),  # ResNet's first conv: 3 input channels, padded to a quad
]


def _case(c: int, k: int, h: int, w: int, ks: int, stride: int, pad: int):
    torch.manual_seed(c + k + h)
    x = torch.randn(1, c, h, w)
    x[0, 0, 0, 0] = -4 * x.abs().max()  # the input's absmax lands on -127
    wt, b = torch.randn(k, c, ks, ks) * 0.1, torch.randn(k)
    spec = DirectSpec.of(x.shape, wt.shape, stride=(stride, stride), padding=(pad, pad))
    return x, wt, b, spec


def test_packing_layout_and_offset_sums() -> None:
    w = np.random.default_rng(0).integers(-127, 128, (3, 3, 8, 32), dtype=np.int8)  # KH, KW, C, K
    p = DirectPacking(16)
    packed = p.pack(w)
    assert packed.shape == (2, 3, 3, 2, 16, 4) and packed.flags.c_contiguous
    for r, s, c, k in [(0, 0, 0, 0), (2, 1, 5, 17), (1, 2, 7, 31)]:
        assert packed[k // 16, r, s, c // 4, k % 16, c % 4] == w[r, s, c, k]
    (wc,) = p.extras(w)
    assert wc.dtype == np.int32 and np.array_equal(wc, 128 * w.astype(np.int64).sum(axis=(0, 1, 2)))
    padded = p.pack(w[:, :, :6])  # 6 input channels: zero weights to two whole quads
    assert padded.shape == packed.shape and not padded[:, :, :, 1, :, 2:].any()
    assert np.array_equal(padded[:, :, :, :, :, :][:, :, :, 0], packed[:, :, :, 0])
    with pytest.raises(ValueError, match="blocks of 16"):
        p.pack(w[..., :24])
    with pytest.raises(ValueError, match="bad packing"):
        DirectPacking(0)
    with pytest.raises(ValueError, match="bad packing"):  # q + 1 is not an unsigned byte for q < -1
        DirectPacking(16, x_offset=1)
    assert DirectPacking(16, x_offset=0).x_dtype == "int8"  # no offset: signed bytes (Arm sdot)


def test_packed_kernel_rejects_what_it_cannot_compute() -> None:
    grouped = DirectSpec.of((1, 32, 8, 8), (32, 1, 3, 3), padding=(1, 1), groups=32)
    with pytest.raises(ConfigError, match="does not fit"):
        packed_direct_func(grouped, DirectPacking(16))
    assert DirectPacking(16).fits(DirectSpec.of((1, 6, 8, 8), (16, 6, 3, 3)))  # 6 channels: padded quads
    assert not DirectPacking(16).fits(DirectSpec.of((1, 8, 8, 8), (24, 8, 3, 3)))  # 24: no 16-blocks


def test_spec_round_trips_through_the_kernel_attribute() -> None:
    spec = _case(*CASES[1])[3]
    func = direct_func(spec).with_attr("winoq.kernel", "direct")
    assert DirectSpec.of_func(func) == spec
    assert DirectSpec.of_func(direct_func(spec, debug=True)) is None  # not the plain kernel


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}k{c[1]}_{c[2]}x{c[3]}_{c[4]}x{c[4]}s{c[5]}")
def test_vnni_hook_packs_direct_and_emits_vpdpbusd(case: tuple) -> None:
    fam = load_family("x86")
    spec = _case(*case)[3]
    plain = direct_func(spec).with_attr("winoq.kernel", "direct")
    kernel, packing = fam.prepack_direct(plain, VNNI)
    assert packing == DirectPacking(32 if spec.out_channels % 32 == 0 else 16)
    assert [p.name for p in kernel.params] == ["x", "wq", "sw", "bias", "wc", "y"]
    assert kernel.attrs["winoq.kernel"] == "direct"
    lib = tvm.compile(tvm.IRModule({"k": fam.schedule_direct(kernel, VNNI).with_attr("global_symbol", "k")}),
                      target=VNNI)
    asm = (lib.mod if hasattr(lib, "mod") else lib).inspect_source("asm")
    assert "vpdpbusd" in asm and "vpmulld" not in asm
    assert fam.prepack_direct(plain, AVX2)[1].cw == 2  # no VNNI: pairs for vpmaddwd (test_direct_avx2)


def test_vnni_hook_declines_grouped_and_scheduled_kernels() -> None:
    fam = load_family("x86")
    dw = direct_func(DirectSpec.of((1, 32, 8, 8), (32, 1, 3, 3), padding=(1, 1), groups=32))
    assert fam.prepack_direct(dw.with_attr("winoq.kernel", "direct"), VNNI) is None
    spec = _case(*CASES[0])[3]
    scheduled = fam.schedule_direct(direct_func(spec).with_attr("winoq.kernel", "direct"), AVX2)
    assert fam.prepack_direct(scheduled, VNNI) is None


@needs_vnni
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}k{c[1]}_{c[2]}x{c[3]}_{c[4]}x{c[4]}s{c[5]}")
def test_packed_direct_matches_plain_kernel_and_reference(case: tuple) -> None:
    x, wt, b, spec = _case(*case)
    cfg = default_config(4)
    consts = direct_constants(wt, b, cfg.direct)
    packed = compile_direct_layer(spec, consts, VNNI)
    assert "w_c" in packed.consts  # the family packed the weights
    y = packed(x.numpy())["y"]
    plain = compile_direct_layer(spec, consts, VNNI, schedule=False)(x.numpy())["y"]
    pad, stride = spec.padding[:2], spec.stride
    ref = direct_conv2d_int8(x, wt, b, pad, cfg.direct, cfg.act.qmax, stride).numpy()
    scale = np.abs(ref).max()
    assert np.abs(y - plain).max() <= 1e-6 * scale  # the same integers, the same float expression
    assert np.abs(y - ref).max() <= 1e-6 * scale


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(64, 64, 3, stride=2, padding=1)).eval()


def test_model_direct_layers_use_the_packed_kernel() -> None:
    m, x = _model(), torch.randn(1, 32, 12, 12)
    cfg = default_config(4).with_(layers={"0": "direct", "2": "direct"})
    low = lower(prepare_module(m, x, cfg)[0], VNNI)
    direct = [gv.name_hint for gv in low.functions.keys() if "direct" in gv.name_hint]
    assert len(direct) == 2 and all(n.endswith("_prepacked") and len(low[n].params) == 6 for n in direct)
    low2 = lower(prepare_module(m, x, cfg)[0], AVX2)  # AVX2: the vpmaddwd pairs kernel (test_direct_avx2)
    direct2 = [gv.name_hint for gv in low2.functions.keys() if "direct" in gv.name_hint]
    assert len(direct2) == 2 and all(low2[n].params[1].shape[-1] == 2 for n in direct2)


@needs_vnni
def test_vnni_model_with_direct_layers_matches_reference() -> None:
    m, x = _model(), torch.randn(1, 32, 12, 12)
    cfg = default_config(4).with_(layers={"0": "direct", "2": "direct"})
    y = compile_model(m, x, cfg, target=VNNI).runner()(x)
    qm, _ = quantize_model(m, cfg, None)
    with torch.no_grad():
        ref = qm(x).numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("target", [AVX2, VNNI], ids=["avx2", "vnni"])
def test_ineligible_direct_model_matches_reference(target) -> None:
    """``ineligible="direct"``: the stride-2 conv is int8 direct without naming it, in the compiled model
    and in the PyTorch reference alike (packed ``vpdpbusd`` kernel on VNNI, ``vpmaddwd`` pairs on AVX2)."""
    if target is VNNI and "vnni" not in host_features():
        pytest.skip("this CPU cannot run AVX-512 VNNI code")
    m, x = _model(), torch.randn(1, 32, 12, 12)
    cfg = default_config(4).with_(ineligible="direct")
    cm = compile_model(m, x, cfg, target=target)
    assert [r.kind for r in cm.records] == ["winograd", "direct"]
    y = cm.runner()(x)
    qm, report = quantize_model(m, cfg, None)
    assert [c for _, c in report] == ["f4", "direct"]
    with torch.no_grad():
        ref = qm(x).numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
