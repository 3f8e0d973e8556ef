"""The int8 direct kernel on AVX2 without VNNI: weights packed in pairs of input channels at compile time,
the input stored as int16, reduced on ``vpmaddwd`` (``schedules/x86.py``).

Needs an x86-64 CPU with AVX2 to run (every CI machine has one); the layers come from
``test_direct_vnni`` so both kernels are checked on the same shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from tests.test_direct_vnni import AVX2, CASES, VNNI, _case
from tvm_winoq.config import default_config
from tvm_winoq.quant.baselines import direct_conv2d_int8
from tvm_winoq.relax.direct import (
    DirectPacking,
    DirectSpec,
    compile_direct_layer,
    direct_constants,
    direct_func,
)
from tvm_winoq.relax.schedules import load_family
from tvm_winoq.targets import host_features

pytestmark = pytest.mark.tvm

needs_avx2 = pytest.mark.skipif("avx2" not in host_features(), reason="this CPU cannot run AVX2 code")
_ids = {"ids": lambda c: f"c{c[0]}k{c[1]}_{c[2]}x{c[3]}_{c[4]}x{c[4]}s{c[5]}"}


def test_pair_packing_layout_and_input_type() -> None:
    w = np.random.default_rng(1).integers(-127, 128, (3, 3, 5, 16), dtype=np.int8)  # KH, KW, C, K
    p = DirectPacking(8, x_offset=0, cw=2)
    packed = p.pack(w)
    assert packed.shape == (2, 3, 3, 3, 8, 2) and packed.dtype == np.int8  # 5 channels: 3 pairs
    for r, s, c, k in [(0, 0, 0, 0), (2, 1, 3, 9), (1, 2, 4, 15)]:
        assert packed[k // 8, r, s, c // 2, k % 8, c % 2] == w[r, s, c, k]
    assert not packed[:, :, :, 2, :, 1].any()  # the padded channel's weights are 0
    assert p.x_dtype == "int16" and p.channels(5) == 6 and not p.extras(w)[0].any()
    with pytest.raises(ValueError, match="bad packing"):
        DirectPacking(8, x_offset=128, cw=2)  # pairs are signed int16: no offset
    with pytest.raises(ValueError, match="bad packing"):
        DirectPacking(8, x_offset=0, cw=3)


@pytest.mark.parametrize("case", CASES, **_ids)
def test_avx2_hook_packs_pairs_and_emits_vpmaddwd(case: tuple) -> None:
    fam = load_family("x86")
    spec = _case(*case)[3]
    kernel, packing = fam.prepack_direct(direct_func(spec).with_attr("winoq.kernel", "direct"), AVX2)
    assert packing.cw == 2 and packing.x_offset == 0 and spec.out_channels % packing.kb == 0
    lib = tvm.compile(tvm.IRModule({"k": fam.schedule_direct(kernel, AVX2).with_attr("global_symbol", "k")}),
                      target=AVX2)
    asm = (lib.mod if hasattr(lib, "mod") else lib).inspect_source("asm")
    assert "vpmaddwd" in asm and "vpmulld" not in asm and "zmm" not in asm


def test_pair_block_fits_the_ymm_registers() -> None:
    """AVX2 has 16 ymm registers: at most 12 accumulators (7 columns x 8 channels at 7 wide, not 16 x 1)."""
    fam = load_family("x86")
    for (h, k), want in {(7, 512): 8, (14, 64): 32, (56, 64): 32, (9, 24): 8}.items():
        spec = DirectSpec.of((1, 16, h, h), (k, 16, 3, 3), padding=(1, 1))
        kb = fam._pair_block(spec, 8)
        assert kb == want, (h, k, kb)
        cols = fam._cpu.packed_direct_columns(spec.out_w, kb, 8, 12)
        assert cols * kb // 8 <= 12
    assert not fam.tensorized_direct(AVX2) and fam.tensorized_direct(VNNI)  # measure only where it pays


@needs_avx2
@pytest.mark.parametrize("case", CASES, **_ids)
def test_avx2_packed_direct_matches_plain_kernel_and_reference(case: tuple) -> None:
    x, wt, b, spec = _case(*case)
    cfg = default_config(4)
    consts = direct_constants(wt, b, cfg.direct)
    packed = compile_direct_layer(spec, consts, AVX2)
    assert packed.consts["w_q"].shape[-1] == 2  # the family packed the weights in pairs
    y = packed(x.numpy())["y"]
    plain = compile_direct_layer(spec, consts, AVX2, schedule=False)(x.numpy())["y"]
    ref = direct_conv2d_int8(x, wt, b, spec.padding[:2], cfg.direct, cfg.act.qmax, spec.stride).numpy()
    scale = np.abs(ref).max()
    assert np.array_equal(y, plain)  # the same integers, the same float expression
    assert np.abs(y - ref).max() <= 1e-6 * scale
