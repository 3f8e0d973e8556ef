"""The TIR Winograd kernels reproduce the PyTorch integer reference bit for bit (scheduled and naive)."""

import numpy as np
import pytest
import torch

from tvm_winoq.config import PerGroup, QuantSpec, groupwise, per_tensor
from tvm_winoq.quant import LayerScales, plan_layer, winograd_conv2d_int
from tvm_winoq.relax.build import compile_layer
from tvm_winoq.relax.kernels import KernelSpec

pytestmark = pytest.mark.tvm

TARGET = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}
INTEGER = ("v_q", "acc", "m_q")
SCALES = ("s_x", "s_v", "s_m")


def _case(tile, c, k, h, w, pad, batch=1, seed=0, cfg=None, scales=None, zero=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(batch, c, h, w) if zero else torch.randn(batch, c, h, w, generator=g)
    wt = torch.randn(k, c, 3, 3, generator=g) * 0.1
    b = torch.randn(k, generator=g) * 0.1
    plan = plan_layer(wt, b, (pad, pad), cfg or groupwise(tile=tile), scales)
    y, trace = winograd_conv2d_int(x, plan, return_trace=True)
    return x, plan, y, trace


def _check_trace(out, y, trace):
    for name in INTEGER + SCALES + ("m_f",):
        ref = getattr(trace, name).numpy()
        got = out[name].reshape(ref.shape)
        assert got.dtype == ref.dtype or name in SCALES, f"{name}: {got.dtype} vs {ref.dtype}"
        assert np.array_equal(got, ref), f"{name}: {np.sum(got != ref)} of {ref.size} differ"
    ref_y = y.numpy()
    err = np.abs(out["y"] - ref_y).max() / max(np.abs(ref_y).max(), 1e-30)
    assert err < 1e-5, f"y: max relative error {err}"


CASES = [
    # tile, C, K, H, W, pad, batch
    (2, 48, 40, 7, 9, 0, 1),
    (2, 32, 64, 11, 13, 1, 2),
    (4, 48, 40, 9, 11, 1, 1),
    (4, 64, 64, 15, 15, 1, 1),
    (4, 48, 40, 13, 7, 0, 2),
    (6, 48, 40, 13, 9, 1, 1),
    (6, 96, 32, 11, 11, 0, 1),
    # shuffle transposes (schedules/cpu.py): input 8x8 (8 | C, W), output 8x8 (8 | K, W, tiles exact)
    (4, 32, 16, 16, 16, 1, 1),
    (6, 24, 8, 12, 24, 1, 2),
    # input 4x4 only (W = 12), output per element
    (2, 16, 24, 12, 12, 1, 1),
    # 128 channels: the input kernel's tile work in chunks of 64 channels (two V scale groups)
    (4, 128, 16, 8, 8, 1, 1),
]


@pytest.mark.parametrize(("tile", "c", "k", "h", "w", "pad", "batch"), CASES)
def test_scheduled_debug_kernels_match_reference_trace(tile, c, k, h, w, pad, batch):
    x, plan, y, trace = _case(tile, c, k, h, w, pad, batch)
    layer = compile_layer(plan, tuple(x.shape), TARGET, debug=True, schedule=True)
    _check_trace(layer(x), y, trace)


@pytest.mark.parametrize(("tile", "c", "k", "h", "w", "pad", "batch"),
                         [CASES[2], CASES[5], CASES[7], CASES[8]])
def test_production_kernels_match_debug_kernels(tile, c, k, h, w, pad, batch):
    """The fused production GEMM/output kernels give the same M_f and y bits as the debug ones."""
    x, plan, y, trace = _case(tile, c, k, h, w, pad, batch)
    prod = compile_layer(plan, tuple(x.shape), TARGET, debug=False, schedule=True)(x)
    dbg = compile_layer(plan, tuple(x.shape), TARGET, debug=True, schedule=True)(x)
    for name in ("v_q", "s_v", "s_x", "m_f", "y"):
        assert np.array_equal(prod[name], dbg[name]), name
    assert np.array_equal(prod["m_f"], trace.m_f.numpy())


def test_naive_kernels_match_reference_trace():
    x, plan, y, trace = _case(4, 48, 40, 9, 11, 1)
    layer = compile_layer(plan, tuple(x.shape), TARGET, debug=True, schedule=False)
    _check_trace(layer(x), y, trace)


def test_learned_scales_nested_groups_and_zero_input():
    n = 6
    g = torch.Generator().manual_seed(3)
    scales = LayerScales(torch.exp(0.3 * torch.randn(n, generator=g, dtype=torch.float64)),
                         torch.exp(0.3 * torch.randn(n, generator=g, dtype=torch.float64)))
    cfg = groupwise(tile=4).with_(
        v=QuantSpec(PerGroup(16), per_position=True, per_row=True),
        m=QuantSpec(PerGroup(8), per_position=True, per_row=True),
    )
    x, plan, y, trace = _case(4, 40, 24, 10, 10, 1, cfg=cfg, scales=scales)
    assert plan.gemm_group == 16
    _check_trace(compile_layer(plan, tuple(x.shape), TARGET, debug=True)(x), y, trace)
    x, plan, y, trace = _case(4, 40, 24, 10, 10, 1, cfg=cfg, zero=True)
    out = compile_layer(plan, tuple(x.shape), TARGET, debug=True)(x)
    _check_trace(out, y, trace)
    assert out["s_x"][0] == 1.0 and not out["v_q"].any()


def test_channel_chunks_with_small_v_groups():
    """Chunks of 64 channels = 8 V scale groups of 8 (vectors must not cross a group)."""
    x, plan, y, trace = _case(4, 128, 24, 8, 12, 1, cfg=groupwise(tile=4, group=8))
    _check_trace(compile_layer(plan, tuple(x.shape), TARGET, debug=True)(x), y, trace)


def test_m_scales_spanning_tiles():
    """M scales shared by all tiles (``per_row=False``): no per-tile fusion, still exact."""
    cfg = groupwise(tile=2).with_(m=QuantSpec(PerGroup(16), per_position=False, per_row=False))
    x, plan, y, trace = _case(2, 24, 40, 9, 9, 1, cfg=cfg)
    assert tuple(trace.s_m.shape) == (1, 1, 3)
    _check_trace(compile_layer(plan, tuple(x.shape), TARGET, debug=True)(x), y, trace)
    prod = compile_layer(plan, tuple(x.shape), TARGET)(x)
    assert np.abs(prod["y"] - y.numpy()).max() <= 1e-5 * np.abs(y.numpy()).max()


def test_unsupported_v_layout_is_rejected():
    _, plan, _, _ = _case(4, 8, 8, 6, 6, 1, cfg=per_tensor(tile=4))
    with pytest.raises(ValueError, match="per position and tile"):
        KernelSpec.from_plan(plan, (1, 8, 6, 6))



@pytest.mark.parametrize(("tile", "qmax", "dtype"), [(2, 127, "int16"), (4, 127, "int16"), (6, 127, "int32"),
                                                    (4, 32767, "int32")])
def test_input_transform_type_holds_every_partial_sum(tile, qmax, dtype):
    """int16 only where the largest ``|V_int|`` any input reaches (``d = qmax * sign(BT_i) sign(BT_j)^T``:
    ``qmax * L1_i * L1_j``) fits; the scheduled kernels above run it (F(2,3), F(4,3))."""
    from tvm_winoq.relax.kernels import transform_dtype

    bt = np.asarray(plan_layer(torch.randn(8, 8, 3, 3), None, (1, 1), groupwise(tile=tile)).bt_int, np.int64)
    assert transform_dtype(bt.tolist(), qmax) == dtype
    l1 = np.abs(bt).sum(axis=1)
    i, j = np.unravel_index(np.argmax(np.outer(l1, l1)), (len(l1), len(l1)))
    d = qmax * np.outer(np.sign(bt[i]), np.sign(bt[j]))  # the input tile reaching that bound
    reached = abs(int(bt[i] @ d @ bt[j]))
    assert reached == qmax * l1[i] * l1[j]
    assert (reached <= 32767) == (dtype == "int16")
