"""``winoq bench``: end-to-end and per-PrimFunc times of a compiled model, here, over RPC, via a tracker.

The fast tests compile a tiny model for the host and bench it in this process, through a local
``python -m tvm.exec.rpc_server`` and against unreachable / silent endpoints.  The ``board`` tests
cross-compile for rpi5 and bench on the emulated aarch64 board (directly and through a tracker); their
times must be labeled as emulated.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("tvm")

from rpc_servers import emulated_board, free_port, rpc_server, rpc_tracker, wait_for  # noqa: E402

from tvm_winoq.bench import bench_job, detect_emulation  # noqa: E402
from tvm_winoq.cli import main  # noqa: E402
from tvm_winoq.errors import ConfigError, DeviceError, TargetError  # noqa: E402
from tvm_winoq.rpc import tracker_summary  # noqa: E402
from tvm_winoq.targets import get_preset  # noqa: E402

board = pytest.mark.board
slow = pytest.mark.slow

MODEL = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
    nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
).eval()
example_input = torch.randn(1, 8, 16, 16)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("bench")
    (root / "net.py").write_text(MODEL)
    (root / "tune_logs").mkdir()  # empty: hand schedules only
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WINOQ_TUNE_LOGS_DIR", str(root / "tune_logs"))
        mp.setenv("WINOQ_CACHE", str(root / "cache"))
        yield root


def _compile(env: Path, target: str) -> Path:
    out = env / f"out-{target}"
    if not out.exists():
        args = ["compile", str(env / "net.py"), "--target", target, "--tile", "4", "--scales", "standard",
                "--fallback", "none"]
        assert main([*args, "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def host_out(env: Path) -> Path:
    return _compile(env, "host")


def _check_result(res: dict, emulated: bool) -> None:
    e2e = res["end_to_end"]
    assert 0 < e2e["min_ms"] <= e2e["median_ms"] and len(e2e["times_ms"]) == e2e["repeat"]
    assert res["emulated"] is emulated and bool(res["note"]) is emulated
    kinds = [r["kind"] for r in res["layers"]]
    assert {"winoq-input", "winoq-gemm", "winoq-output", "op"} <= set(kinds), kinds
    assert all(r["median_ms"] > 0 or r["kind"] == "op" for r in res["layers"])
    assert res["sum_layers_ms"] > 0 and all(r["calls"] >= 1 for r in res["layers"])


def test_bench_local(host_out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(host_out), "--local", "--number", "2", "--repeat", "3"]) == 0
    text = capsys.readouterr().out
    assert "end to end median" in text and "winoq_gemm_" in text and "VM overhead" in text
    assert "EMULATED" not in text
    res = json.loads((host_out / "bench.json").read_text())
    _check_result(res, emulated=False)
    assert res["device"] == "local" and res["preset"] == "host-avx2"


def test_bench_local_rpc_server(host_out: Path, tmp_path: Path) -> None:
    """A stock `python -m tvm.exec.rpc_server` on 127.0.0.1 (host code: a real, not emulated, device)."""
    with rpc_server() as addr:
        res = bench_job(host_out, rpc=addr, number=2, repeat=2, json_path=tmp_path / "b.json", log=print)
    _check_result(res, emulated=False)
    assert json.loads((tmp_path / "b.json").read_text())["device"] == f"rpc {addr}"


def test_bench_through_tracker_fleet(host_out: Path) -> None:
    """Two stock RPC servers under one key at a tracker: with one busy, bench gets the other."""
    from tvm_winoq.rpc import connect

    with rpc_tracker() as tracker, rpc_server(tracker, "host-pool"), rpc_server(tracker, "host-pool"):
        assert len(tracker_summary(tracker)["host-pool"]["servers"]) == 2
        busy = connect(tracker=tracker, key="host-pool", timeout=30)  # holds one server
        res = bench_job(
            host_out, tracker=tracker, key="host-pool", number=1, repeat=2, timeout=120, log=lambda s: None
        )
        del busy
    _check_result(res, emulated=False)
    assert res["device"] == f"tracker {tracker} key host-pool"


def test_bench_end_to_end_only(host_out: Path, tmp_path: Path) -> None:
    res = bench_job(
        host_out, local=True, layers=False, repeat=2, json_path=tmp_path / "b.json", log=lambda s: None
    )
    assert (
        res["layers"] is None and "not measured" in res["layers_note"] and res["end_to_end"]["median_ms"] > 0
    )


def test_dead_and_silent_devices_fail_fast(host_out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening, or a server that never answers: a DeviceError from the probe, not a hang."""
    assert main(["bench", str(host_out), "--rpc", f"127.0.0.1:{free_port()}", "--no-layers"]) == 2
    assert "connection refused" in capsys.readouterr().err
    with socket.socket() as listener:  # accepts TCP, never answers: hung or busy device
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        addr = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(DeviceError, match="did not answer within 3"):
            bench_job(host_out, rpc=addr, layers=False, timeout=3, log=lambda s: None)


def test_unknown_tracker_key(host_out: Path) -> None:
    with rpc_tracker() as tracker:
        with pytest.raises(DeviceError, match="no device with key 'nope'.*registered keys: none"):
            bench_job(host_out, tracker=tracker, key="nope", layers=False, log=lambda s: None)


def test_bad_arguments(host_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        bench_job(host_out, rpc="127.0.0.1:1", local=True)
    with pytest.raises(ConfigError, match="repeat"):
        bench_job(host_out, local=True, repeat=0)
    assert main(["bench", str(tmp_path), "--local"]) == 2
    assert "not a winoq compile output" in capsys.readouterr().err
    # a module built for a board cannot run here
    arm = tmp_path / "arm"
    shutil.copytree(host_out, arm)
    meta = json.loads((arm / "config.json").read_text())
    (arm / "config.json").write_text(json.dumps({**meta, "target": "rpi5"}))
    with pytest.raises(TargetError, match="built for rpi5.*--rpc"):
        bench_job(arm, local=True)


def test_emulation_detection() -> None:
    rpi5, host = get_preset("rpi5"), get_preset("host")
    assert detect_emulation(rpi5, rpc="127.0.0.1:9")["emulated"]  # aarch64 code served on this x86 machine
    assert not detect_emulation(host, rpc="127.0.0.1:9")["emulated"]
    assert not detect_emulation(rpi5, rpc="10.1.2.3:9190")["emulated"]  # a real board elsewhere
    assert not detect_emulation(rpi5, local=True)["emulated"]


# ---------------------------------------------------------------------------------------------------------
# the emulated board


@pytest.fixture(scope="module")
def rpi5_out(env: Path) -> Path:
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("no aarch64 cross gcc")
    return _compile(env, "rpi5")


@board
@slow
def test_bench_on_emulated_board(rpi5_out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with emulated_board(cpu="max") as info:
        assert main(["bench", str(rpi5_out), "--rpc", info["rpc"], "--number", "1", "--repeat", "2"]) == 0
    text = capsys.readouterr().out
    assert "*** EMULATED" in text and "emulated ms" in text and "emulated us" in text
    res = json.loads((rpi5_out / "bench.json").read_text())
    _check_result(res, emulated=True)
    assert "qemu board" in res["emulation"] or "serves rpi5 code" in res["emulation"]


@board
@slow
def test_bench_through_tracker_on_emulated_board(rpi5_out: Path, tmp_path: Path) -> None:
    """A board registered at a tracker under its key: bench asks the tracker; a missing key is named."""
    with rpc_tracker() as tracker, emulated_board(cpu="max", key="rpi5-emu", tracker=tracker, max_sessions=1):
        wait_for(lambda: "rpi5-emu" in tracker_summary(tracker), "board registration")
        res = bench_job(
            rpi5_out,
            tracker=tracker,
            key="rpi5-emu",
            number=1,
            repeat=2,
            timeout=300,
            json_path=tmp_path / "b.json",
            log=lambda s: None,
        )
        _check_result(res, emulated=True)
        with pytest.raises(DeviceError, match="no device with key 'rpi5'.*rpi5-emu"):
            bench_job(rpi5_out, tracker=tracker, key="rpi5", layers=False, log=lambda s: None)
