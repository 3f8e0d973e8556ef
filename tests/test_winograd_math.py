"""Exactness of the Cook-Toom transforms, the diagonal-scale factorization and the tiling (float64)."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from tvm_winoq.errors import ConfigError
from tvm_winoq.winograd import (
    ALTERNATIVE_POINTS,
    extract_tiles,
    geometry,
    scaled_transforms,
    winograd_conv2d_float,
    winograd_matrices,
)
from tvm_winoq.winograd.scaled import conv2d_reference


def _corr1d(d, g, m):
    return np.array([sum(g[k] * d[i + k] for k in range(len(g))) for i in range(m)])


@pytest.mark.parametrize("m,r", [(2, 3), (4, 3), (6, 3), (3, 2), (2, 5), (5, 3)])
def test_cook_toom_1d_exact_rational(m, r):
    n = m + r - 1
    pts = [Fraction(p) for p in (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2), 3, -3)[: n - 1]]
    w = winograd_matrices(m, r, pts)
    rng = np.random.default_rng(0)
    d = [Fraction(int(v)) for v in rng.integers(-9, 9, n)]
    g = [Fraction(int(v)) for v in rng.integers(-9, 9, r)]
    gt = [sum(w.G[j][k] * g[k] for k in range(r)) for j in range(n)]
    bd = [sum(w.BT[j][k] * d[k] for k in range(n)) for j in range(n)]
    y = [sum(w.AT[i][j] * gt[j] * bd[j] for j in range(n)) for i in range(m)]
    assert y == [sum(g[k] * d[i + k] for k in range(r)) for i in range(m)]  # exact, in rationals


def test_default_points_match_known_f23():
    w = winograd_matrices(2)
    at, g, bt = w.numpy()
    np.testing.assert_array_equal(bt, [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, -1, 0, 1]])
    np.testing.assert_array_equal(g, [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    np.testing.assert_array_equal(at, [[1, 1, 1, 0], [0, 1, -1, 1]])


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scaled_2d_equals_direct_conv_for_any_scales(m, seed):
    gen = torch.Generator().manual_seed(seed)
    w = winograd_matrices(m)
    sb = torch.exp(torch.randn(w.n, generator=gen, dtype=torch.float64))
    sg = torch.exp(torch.randn(w.n, generator=gen, dtype=torch.float64))
    sb = sb * torch.where(torch.rand(w.n, generator=gen) < 0.3, -1.0, 1.0).double()  # any nonzero sign
    tr = scaled_transforms(w, sb, sg)
    x = torch.randn(2, 5, 17, 13, generator=gen, dtype=torch.float64)
    k = torch.randn(7, 5, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(7, generator=gen, dtype=torch.float64)
    for pad in [(1, 1), (0, 0), (2, 0)]:
        ref = conv2d_reference(x, k, b, pad)
        y = winograd_conv2d_float(x, k, b, pad, tr)
        assert y.shape == ref.shape
        assert ((y - ref).norm() / ref.norm()).item() < 1e-9


@pytest.mark.parametrize("name", sorted(ALTERNATIVE_POINTS))
def test_alternative_point_sets_exact(name):
    w = winograd_matrices(6, 3, ALTERNATIVE_POINTS[name])
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    k = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    tr = scaled_transforms(w)
    ref = conv2d_reference(x, k, None, (1, 1))
    assert ((winograd_conv2d_float(x, k, None, (1, 1), tr) - ref).norm() / ref.norm()).item() < 1e-9


def test_integer_bt_reconstructs():
    for m in (2, 4, 6):
        w = winograd_matrices(m)
        bt_int, c = w.integer_bt()
        np.testing.assert_array_equal(bt_int / c[:, None], w.numpy()[2])
        assert np.all(bt_int == np.round(bt_int))


def test_tiling_covers_ragged_outputs():
    x = torch.arange(1 * 1 * 7 * 9, dtype=torch.float64).reshape(1, 1, 7, 9)
    geo = geometry(tuple(x.shape), 4, 3, (1, 1))
    assert (geo.out_h, geo.out_w, geo.tiles_h, geo.tiles_w) == (7, 9, 2, 3)
    t = extract_tiles(x, geo)
    assert t.shape == (6, 1, 6, 6)
    # top-left tile starts with the zero padding, then the image
    assert t[0, 0, 0].abs().sum() == 0 and t[0, 0, 1, 1] == 0 and t[0, 0, 1, 2] == 1


def test_bad_points_raise_config_errors():
    with pytest.raises(ConfigError, match="points"):
        winograd_matrices(4, 3, [0, 1, -1])
    with pytest.raises(ConfigError, match="distinct"):
        winograd_matrices(2, 3, [0, 1, 1])
    with pytest.raises(ConfigError, match="rational"):
        winograd_matrices(2, 3, [0, 1, "x"])
