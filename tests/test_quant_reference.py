"""The integer reference: independent float64 recomputation, fake-quant agreement, baselines."""

import numpy as np
import pytest
import torch

from tvm_winoq.config import PerChannel, PerGroup, QuantSpec, groupwise, per_tensor
from tvm_winoq.metrics import sqnr_db
from tvm_winoq.quant import (
    LayerScales,
    direct_conv2d_int8,
    plan_layer,
    transforms_for,
    winograd_conv2d_fakequant,
    winograd_conv2d_int,
)
from tvm_winoq.quant.ops import fma_f32
from tvm_winoq.winograd.scaled import conv2d_reference


def _layer(seed=0, c=48, k=40, h=13, w=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, h, w, generator=g).relu()
    wt = torch.randn(k, c, 3, 3, generator=g) * 0.05
    b = torch.randn(k, generator=g) * 0.1
    return x, wt, b


def _random_scales(n, seed):
    g = torch.Generator().manual_seed(seed)
    return LayerScales(
        torch.exp(0.3 * torch.randn(n, generator=g, dtype=torch.float64)),
        torch.exp(0.3 * torch.randn(n, generator=g, dtype=torch.float64)),
    )


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize("pad", [(1, 1), (0, 0)])
def test_integer_reference_matches_independent_float64_recomputation(tile, pad):
    x, wt, b = _layer()
    cfg = groupwise(tile, 32)
    sc = _random_scales(tile + 2, tile)
    plan = plan_layer(wt, b, pad, cfg, sc)
    y, tr = winograd_conv2d_int(x, plan, return_trace=True)
    n, qmax = tile + 2, 127
    # 1. input quantization, recomputed in numpy float32
    xn = x.numpy().astype(np.float32)
    s_x = np.float32(np.abs(xn).max()) / np.float32(127)
    np.testing.assert_array_equal(tr.x_q.numpy(), np.clip(np.round(xn * (np.float32(1) / s_x)), -qmax, qmax))
    # 2. V from the float64 scaled transform of the quantized tiles, within half a quantization step
    at, g_, bt = (m.astype(np.float64) for m in transforms_for(cfg).numpy())
    bts = sc.s_b.numpy()[:, None] * bt
    from tvm_winoq.winograd.tiling import extract_tiles

    d = extract_tiles(tr.x_q.double(), tr.geo).numpy()
    v64 = np.einsum("ia,tcab,jb->ijtc", bts, d, bts).reshape(n * n, d.shape[0], d.shape[1])
    s_v = np.repeat(tr.s_v.numpy().astype(np.float64), 32, axis=-1)[..., : x.shape[1]]
    assert np.all(np.abs(tr.v_q.numpy() * s_v - v64) <= 0.5 * s_v * (1 + 1e-4))
    # 3. the int32 accumulators are the exact integer group sums
    vq, uq = tr.v_q.numpy().astype(np.int64), plan.u_q.numpy().astype(np.int64)
    for gi in range(tr.acc.shape[-1]):
        sl = slice(32 * gi, 32 * (gi + 1))
        np.testing.assert_array_equal(
            tr.acc.numpy()[..., gi], np.einsum("ptc,pkc->ptk", vq[..., sl], uq[..., sl])
        )
    # 4. dequantized GEMM: float64 sum agrees to float32 rounding
    su = plan.s_u.numpy().astype(np.float64)
    m64 = sum(
        tr.acc.numpy()[..., gi].astype(np.float64)
        * (tr.s_v.numpy()[:, :, None, gi].astype(np.float32) * plan.s_u.numpy()[:, None, :, gi]).astype(
            np.float64
        )
        for gi in range(tr.acc.shape[-1])
    )
    assert np.abs(tr.m_f.numpy() - m64).max() <= 4e-7 * np.abs(m64).max()
    del su
    # 5. M quantization within half a step, one scale across all positions per (tile, group)
    assert tr.s_m.shape[0] == 1
    s_m = np.repeat(tr.s_m.numpy().astype(np.float64), 32, axis=-1)[..., : plan.out_channels]
    assert np.all(np.abs(tr.m_q.numpy() * s_m - m64) <= 0.5 * s_m * (1 + 1e-5) + 1e-6 * np.abs(m64).max())
    # 6. output transform in float64 of the quantized M
    mt = (tr.m_q.numpy() * s_m).reshape(n, n, *tr.m_q.shape[1:]).transpose(2, 3, 0, 1)
    ats = at / (sc.s_b.numpy() * sc.s_g.numpy())[None, :]
    yt = np.einsum("ia,tkab,jb->tkij", ats, mt, ats) * np.float64(tr.s_x)
    from tvm_winoq.winograd.tiling import assemble_tiles

    y64 = assemble_tiles(torch.from_numpy(yt), tr.geo, x.shape[0]).numpy() + b.numpy()[None, :, None, None]
    np.testing.assert_allclose(y.numpy(), y64, rtol=0, atol=2e-6 * np.abs(y64).max())


@pytest.mark.parametrize(
    "cfg",
    [groupwise(4, 32), groupwise(6, 16), per_tensor(6), groupwise(2, 64)],
    ids=["f4g32", "f6g16", "f6tensor", "f2g64"],
)
def test_fakequant_agrees_with_integer_reference(cfg):
    x, wt, b = _layer(1)
    sc = _random_scales(cfg.tile + 2, 3)
    y = winograd_conv2d_int(x, plan_layer(wt, b, (1, 1), cfg, sc))
    yf = winograd_conv2d_fakequant(x, wt, b, (1, 1), cfg, transforms_for(cfg), sc.s_b.float(), sc.s_g.float())
    ref = conv2d_reference(x.double(), wt, b, (1, 1))
    # the same rounding points up to ties: far closer to each other than either is to FP32.  V is
    # integer-valued before scaling, so x / s lands exactly on k + 1/2 often; x * (1 / s) (the
    # quantizer, see quant/ops.py) moves such a tie by the reciprocal's rounding, differently for the
    # scaled and the unscaled V of the fast path: +-1 step on those (f2g64: 48.9 dB vs 32.1 dB error)
    assert sqnr_db(y, yf) > 45 and sqnr_db(y, yf) > sqnr_db(ref, y) + 15


def test_fakequant_fast_path_equals_general_path():
    x, wt, b = _layer(2)
    cfg = groupwise(6, 32)
    sc = _random_scales(8, 4)
    mats = transforms_for(cfg)
    fast = winograd_conv2d_fakequant(x, wt, b, (1, 1), cfg, mats, sc.s_b.float(), sc.s_g.float(), {})
    slow = winograd_conv2d_fakequant(x, wt, b, (1, 1), cfg, mats, sc.s_b.float(), sc.s_g.float(), fast=False)
    assert sqnr_db(fast, slow) > 45
    s_b = sc.s_b.float().requires_grad_()
    y = winograd_conv2d_fakequant(x, wt, b, (1, 1), cfg, mats, s_b, sc.s_g.float(), {})
    y.square().sum().backward()
    assert s_b.grad is not None and torch.isfinite(s_b.grad).all() and s_b.grad.abs().sum() > 0


def test_scales_do_not_change_unquantized_result_but_change_quantized():
    x, wt, b = _layer(3)
    hi = QuantSpec(PerGroup(32), True, True, 16)
    cfg = groupwise(4, 32).with_(
        act=QuantSpec(bits=16), v=hi, u=hi, m=QuantSpec(PerGroup(32), True, True, 16)
    )
    ref = conv2d_reference(x.double(), wt, b, (1, 1))
    y1 = winograd_conv2d_int(x, plan_layer(wt, b, (1, 1), cfg, None))
    y2 = winograd_conv2d_int(x, plan_layer(wt, b, (1, 1), cfg, _random_scales(6, 5)))
    assert sqnr_db(ref, y1) > 60 and sqnr_db(ref, y2) > 60
    g8 = groupwise(4, 32)
    assert (
        sqnr_db(
            winograd_conv2d_int(x, plan_layer(wt, b, (1, 1), g8, None)),
            winograd_conv2d_int(x, plan_layer(wt, b, (1, 1), g8, _random_scales(6, 5))),
        )
        < 60
    )


def test_direct_int8_baseline_is_accurate_and_exact_integer():
    x, wt, b = _layer(4)
    ref = conv2d_reference(x.double(), wt, b, (1, 1))
    y = direct_conv2d_int8(x, wt, b, (1, 1), QuantSpec(PerChannel()))
    assert 30 < sqnr_db(ref, y) < 60


def test_fma_f32_matches_exact_rounding():
    from fractions import Fraction

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3000, generator=g), torch.randn(3000, generator=g)
    c = torch.randn(3000, generator=g) * torch.exp(6 * torch.randn(3000, generator=g))
    r = fma_f32(a, b, c)
    for i in range(0, 3000, 7):
        exact = Fraction(a[i].item()) * Fraction(b[i].item()) + Fraction(c[i].item())
        f = np.float32(float(exact))
        cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
        best = min(
            cands, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.float32(v).view(np.int32)) & 1)
        )
        assert best == r[i].item()


def test_partial_groups_and_bad_input():
    x, wt, b = _layer(5, c=37, k=19)
    plan = plan_layer(wt, b, (1, 1), groupwise(2, 16))
    y, tr = winograd_conv2d_int(x, plan, return_trace=True)
    assert tr.acc.shape[-1] == 3 and tr.s_v.shape[-1] == 3 and tr.s_m.shape[-1] == 2
    assert sqnr_db(conv2d_reference(x.double(), wt, b, (1, 1)), y) > 0
    with pytest.raises(ValueError, match="expected input"):
        winograd_conv2d_int(torch.randn(1, 5, 8, 8), plan)


def test_rounding_modes():
    from tvm_winoq.quant.ops import round_nearest

    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 1.2])
    assert round_nearest(x, "half-even").tolist() == [0, 2, 2, 0, -2, 0, 1]
    assert round_nearest(x, "half-away").tolist() == [1, 2, 3, -1, -3, 0, 1]
    with pytest.raises(ValueError, match="rounding"):
        QuantSpec(rounding="up")
