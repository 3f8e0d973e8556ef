"""The layer benchmark: peers compute the right conv, the interleaved timer is sane, bad rows are caught."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repo root

from benchmarks import peers  # noqa: E402
from benchmarks.run_layers import main as run_layers_main  # noqa: E402
from tvm_winoq.errors import TargetError  # noqa: E402

SMALL = peers.parse_shape("32@14")
PEERS = ["torch-fp32", "torch-int8", "ort-int8", "ncnn-int8-wino43", "ncnn-int8-wino23", "ncnn-int8-direct"]


@pytest.fixture(scope="module")
def layer():
    x, w, b = peers.make_layer(SMALL, seed=1)
    return x, w, b, peers.reference_conv(x, w, b)


@pytest.fixture
def registry():
    """Register throwaway implementations; removed afterwards."""
    added: list[str] = []

    def add(name, factory, **kw):
        peers.register_impl(name, factory, **kw)
        added.append(name)

    yield add
    for name in added:
        peers.unregister_impl(name)


def _zeros(x, w, b, threads):
    return lambda: np.zeros((1, w.shape[0], *x.shape[2:]), np.float32)


def _fp32_plus_noise(x, w, b, threads):
    y = peers.reference_conv(x, w, b).astype(np.float32)
    y += np.random.default_rng(0).standard_normal(y.shape).astype(np.float32) * y.std() * 0.3  # ~10 dB
    return lambda: y


def test_parse_shape_and_ops():
    assert peers.parse_shape("64@56") == peers.Shape(64, 64, 56, 56)
    assert peers.parse_shape("32x16@8x4") == peers.Shape(32, 16, 8, 4)
    assert peers.parse_shape("32x16@8x4").label == "32x16@8x4" and SMALL.label == "32@14"
    assert peers.parse_shape("64@56").ops == 2 * 64 * 64 * 56 * 56 * 9
    with pytest.raises(ValueError, match="bad shape"):
        peers.parse_shape("64x56")


def test_sqnr():
    a = np.arange(1.0, 5.0)
    assert peers.sqnr_db(a, a) == float("inf")
    assert abs(peers.sqnr_db(a, a * 1.1) - 20.0) < 1e-9
    assert peers.sqnr_db(a, a[:3]) == float("-inf") and peers.sqnr_db(a, a * np.nan) == float("-inf")


@pytest.mark.parametrize("name", PEERS)
def test_peer_matches_fp32(name, layer):
    x, w, b, ref = layer
    impl = peers._REGISTRY[name]
    try:
        call = impl.factory(x, w, b, 1)
    except peers.Unavailable as e:
        pytest.skip(f"{name}: {e}")
    y = call()
    assert y.shape == ref.shape and y.dtype == np.float32
    floor = 60.0 if name == "torch-fp32" else 25.0
    assert impl.min_sqnr_db == floor
    assert peers.sqnr_db(ref, y) > floor
    np.testing.assert_array_equal(call(), y)  # repeatable: the timed call is the checked call


def test_ncnn_model_layout(layer):
    x, w, b, _ = layer
    param, blob = peers.ncnn_files(x, w, b)
    k, c = w.shape[:2]
    assert f"0={k} 1=3 3=1 4=1 5=1 6={k * c * 9} 8=1" in param
    n = k * c * 9
    assert len(blob) == 4 + n + (-n % 4) + 4 * k + 4 * k + 4
    assert int.from_bytes(blob[:4], "little") == 0x000D4B38
    scales = np.frombuffer(blob[-4 * (k + 1):], "<f4")
    np.testing.assert_allclose(scales[:k], 127 / np.abs(w).reshape(k, -1).max(1), rtol=1e-6)
    np.testing.assert_allclose(scales[k], 127 / np.abs(x).max(), rtol=1e-6)


def test_ncnn_int8_paths_agree_bit_for_bit(layer):
    """ncnn's int8 Winograd is exact integer arithmetic: the three paths agree bit for bit."""
    pytest.importorskip("ncnn")
    x, w, b, _ = layer
    outs = [peers._REGISTRY[n].factory(x, w, b, 1)() for n in PEERS[3:]]
    for y in outs[1:]:
        np.testing.assert_array_equal(y, outs[0])


def test_time_interleaved_is_round_robin_and_sane():
    order: list[str] = []

    def sleeper(name, s):
        def call():
            order.append(name)
            time.sleep(s)
        return call

    calls = {"a": sleeper("a", 2e-3), "b": sleeper("b", 0), "c": sleeper("c", 4e-3)}
    t = peers.time_interleaved(calls, repeat=6, warmup=1, min_sample_s=0)
    assert all(len(tm.samples_s) == 6 and tm.number == 1 for tm in t.values())
    med = {n: float(np.median(tm.samples_s)) for n, tm in t.items()}
    # sleeps give lower bounds only: no upper bounds on a shared, loaded machine
    assert med["a"] >= 2e-3 and med["c"] >= 4e-3 and med["b"] < med["c"]
    assert t["a"].cpu_per_wall >= 0
    timed = order[3:]  # after one warmup round
    assert [timed[i * 3] for i in range(6)] == ["a", "b", "c", "a", "b", "c"]  # start rotates each round
    assert all(sorted(timed[i:i + 3]) == ["a", "b", "c"] for i in range(0, 18, 3))


def test_time_interleaved_budget_and_batching():
    t = peers.time_interleaved({"slow": lambda: time.sleep(0.01), "fast": lambda: None}, repeat=100,
                               warmup=1, min_sample_s=1e-3, budget_s=0.0, min_repeat=3)
    assert len(t["slow"].samples_s) == 3 and t["slow"].number == 1 and t["fast"].number > 1


def test_broken_impls_are_flagged_and_not_timed(registry, capsys):
    registry("zeros", _zeros)
    registry("noisy", _fp32_plus_noise)
    registry("raises", lambda x, w, b, t: 1 / 0)
    registry("absent", lambda x, w, b, t: (_ for _ in ()).throw(peers.Unavailable("not here")))
    res = peers.run_benchmark(["16@8"], [1], ["torch-fp32", "zeros", "noisy", "raises", "absent"], repeat=3,
                              gap_s=0, verbose=False)
    rows = {r["impl"]: r for r in res["rows"]}
    assert rows["torch-fp32"]["status"] == "ok" and rows["torch-fp32"]["median_ms"] > 0
    assert rows["torch-fp32"]["sqnr_db"] > 100 and len(rows["torch-fp32"]["samples_ms"]) == 3
    for name in ("zeros", "noisy"):
        assert rows[name]["status"] == "invalid" and rows[name]["median_ms"] is None
        assert "SQNR" in rows[name]["reason"]
    assert 5 < rows["noisy"]["sqnr_db"] < 15
    assert rows["raises"]["status"] == "error" and "ZeroDivisionError" in rows["raises"]["reason"]
    assert rows["absent"]["status"] == "skipped" and rows["absent"]["reason"] == "not here"
    assert rows["torch-fp32"]["speedup"] == {}
    assert "INVALID noisy" in capsys.readouterr().err
    md = peers.to_markdown(res)
    assert "| 16@8 | 1 | " in md and "INVALID" in md and "ZeroDivisionError" in md


def test_time_invalid_times_but_keeps_the_flag(registry):
    registry("noisy", _fp32_plus_noise)
    res = peers.run_benchmark([peers.Shape(8, 8, 6, 6)], [1], ["torch-fp32", "noisy"], repeat=2, gap_s=0,
                              time_invalid=True, verbose=False)
    rows = {r["impl"]: r for r in res["rows"]}
    assert rows["noisy"]["status"] == "invalid" and rows["noisy"]["median_ms"] > 0
    assert "torch-fp32" in rows["noisy"]["speedup"] and "noisy" not in rows["torch-fp32"]["speedup"]


def test_peers_ratios_and_report(tmp_path):
    res = peers.run_benchmark(["16@8"], [1], ["torch-fp32", "ort-int8", "ncnn-int8-direct"], repeat=3,
                              gap_s=0, verbose=False)
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    assert ok and all(r["gops"] == pytest.approx(r["gop"] / r["median_ms"] * 1e3) for r in ok)
    for r in ok:
        for p, s in r["speedup"].items():
            other = next(o for o in ok if o["impl"] == p)
            assert s == pytest.approx(other["median_ms"] / r["median_ms"], rel=1e-2)
    meta = res["meta"]
    assert meta["cores"] >= 1 and meta["date"] and "loadavg_after" in meta
    peers.save_results(res, tmp_path / "r.json", tmp_path / "r.md")
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["shape"] == "16@8"
    assert (tmp_path / "r.md").read_text().startswith("# 3x3 s1 p1 conv layers")


def test_cli_strict_exit_code(registry, tmp_path, capsys):
    registry("zeros", _zeros)
    args = ["--shapes", "8@6", "--threads", "1", "--repeat", "2", "--spin", "--markdown",
            str(tmp_path / "o.md")]
    assert run_layers_main(args + ["--impls", "torch-fp32"]) == 0
    assert run_layers_main(args + ["--impls", "torch-fp32", "zeros", "--strict"]) == 1
    assert "| 8@6 | 1 |" in (tmp_path / "o.md").read_text()
    capsys.readouterr()


@pytest.mark.tvm
@pytest.mark.slow
def test_ours_builds_and_runs_or_is_skipped(layer):
    """The TVM slot: compiles through ``compile_model`` and runs (fidelity is reported, not asserted here)."""
    x, w, b, ref = layer
    try:
        call = peers._REGISTRY["ours-f4"].factory(x, w, b, 1)
    except peers.Unavailable as e:
        pytest.skip(str(e))
    y = call()
    assert y.shape == ref.shape and np.isfinite(y).all()
    auto = peers._REGISTRY["ours-auto"].factory(x, w, b, 1)()  # measured F(4,3) vs direct, the faster
    assert auto.shape == ref.shape and np.isfinite(auto).all()
    (timings,) = [v for k, v in peers._STATE["choices"].items() if k.endswith("threads=1")]
    assert len(timings) == 1 and set(timings[0]["ms"]) == {"f4", "direct"}


@pytest.mark.tvm
@pytest.mark.slow
def test_end_to_end_models_benchmark(tmp_path):
    """benchmarks.run_models on the trained Fashion-MNIST net: every implementation checked and timed."""
    from benchmarks import run_models

    peers.set_preset("host")
    result = run_models.run(["fmnist_resnet"], [1], 4, repeat=3, budget_s=1.0, steps=10, calib=2)
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"torch-fp32", "ort-int8", "ours-f4", "ours-auto", "ours-auto-w8a8"}
    assert rows["ort-int8"]["sqnr_db"] > 25
    assert min(rows[n]["sqnr_db"] for n in ("ours-f4", "ours-auto", "ours-auto-w8a8")) > 15
    assert all(r["median_ms"] > 0 and r["top1_agree"] is not None for r in rows.values())
    md = run_models.to_markdown(result)
    assert "| fmnist_resnet | 1 | ours-f4 |" in md and "- fmnist_resnet threads=1 ours-auto: " in md
    assert isinstance(rows["ours-auto"]["direct_layers"], list)
    with pytest.raises(TargetError, match="unknown target preset"):
        peers.set_preset("no-such-board")


def test_cli_unknown_preset_is_one_line_error(capsys):
    assert run_layers_main(["--preset", "no-such-board", "--shapes", "8@6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "unknown target preset 'no-such-board'" in err[0]


def test_cli_unknown_impl_is_one_line_error(capsys):
    assert run_layers_main(["--impls", "ours-f9", "--shapes", "8@6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "unknown implementation(s) ['ours-f9']" in err[0]
