"""Emulated aarch64 board + RPC: cross-compile for the rpi5 preset, run under qemu, compare bit for bit.

The ``board`` tests start qemu boards (``-cpu max`` direct, ``-cpu cortex-a72`` behind a tracker) on
free local ports and stop them in finalizers.  A cold first run builds the board (~25 s); later runs
reuse ``<cache>/board`` and start a board in ~9 s.  The timeout tests at the end need no board.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from rpc_servers import free_port, rpc_tracker, start_board, wait_for  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from tvm_winoq.errors import ConfigError, DeviceError  # noqa: E402
from tvm_winoq.rpc import (  # noqa: E402
    RPC_MAGIC,
    RPC_TRACKER_MAGIC,
    RemoteCrashError,
    bench_module,
    connect,
    remote_bench,
    tracker_summary,
)
from tvm_winoq.targets import get_preset  # noqa: E402

M = 64
board = pytest.mark.board
slow = pytest.mark.slow
needs_cross = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="no aarch64 cross gcc")


# ---------------------------------------------------------------------------------------------------------
# kernels


@T.prim_func
def sdot_kernel(a: T.Buffer((M, 16), "int8"), b: T.Buffer((M, 16), "int8"), c: T.Buffer((M, 4), "int32")):
    """c[m, j] = sum_t a[m, 4j+t] * b[m, 4j+t], one AArch64 SDOT per row (needs +dotprod)."""
    T.func_attr({"global_symbol": "sdot", "tir.noalias": True})
    for m in range(M):
        c[m, T.ramp(0, 1, 4)] = T.call_llvm_pure_intrin(
            "int32x4",
            "llvm.aarch64.neon.sdot.v4i32.v16i8",
            T.broadcast(T.int32(0), 4),
            a.vload([m, 0], "int8x16"),
            b.vload([m, 0], "int8x16"),
        )


@T.prim_func
def dot4_kernel(a: T.Buffer((M, 16), "int8"), b: T.Buffer((M, 16), "int8"), c: T.Buffer((M, 4), "int32")):
    """The same result in plain TIR (NEON-only code on rpi4)."""
    T.func_attr({"global_symbol": "dot4", "tir.noalias": True})
    for m, j in T.grid(M, 4):
        c[m, j] = T.int32(0)
        for t in range(4):
            c[m, j] = c[m, j] + T.Cast("int32", a[m, j * 4 + t]) * T.Cast("int32", b[m, j * 4 + t])


@tvm.script.ir_module
class Int8Matmul:
    @R.function
    def main(x: R.Tensor((8, 32), "int8"), w: R.Tensor((16, 32), "int8")) -> R.Tensor((8, 16), "int32"):
        with R.dataflow():
            y = R.matmul(R.astype(x, "int32"), R.permute_dims(R.astype(w, "int32")))
            R.output(y)
        return y


def _dot4_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.int32) * b.astype(np.int32)).reshape(M, 4, 4).sum(-1)


def _dot4_inputs(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (M, 16), dtype=np.int8)
    b = rng.integers(-128, 128, (M, 16), dtype=np.int8)
    a[0], b[0] = -128, -128  # extreme products: 4 * 16384
    return [a, b, np.zeros((M, 4), np.int32)]


@pytest.fixture(scope="module")
def libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Cross-compiled libraries: sdot + Relax VM for rpi5, plain dot4 for rpi4."""
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("no aarch64 cross gcc (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)")
    out = tmp_path_factory.mktemp("libs")
    rpi5, rpi4 = get_preset("rpi5"), get_preset("rpi4")
    sdot = tvm.compile(tvm.IRModule({"sdot": sdot_kernel}), target=rpi5.tvm_target())
    dot4 = tvm.compile(tvm.IRModule({"dot4": dot4_kernel}), target=rpi4.tvm_target())
    vm = tvm.compile(Int8Matmul, target=rpi5.tvm_target())
    return {
        "sdot": rpi5.export_library(sdot, out / "sdot_rpi5.so"),
        "dot4": rpi4.export_library(dot4, out / "dot4_rpi4.so"),
        "vm": rpi5.export_library(vm, out / "matmul_rpi5.so"),
    }


# ---------------------------------------------------------------------------------------------------------
# processes (every one is stopped by its own pid in a finalizer, even when the test fails)


@pytest.fixture(scope="module")
def board_max() -> Iterator[dict]:
    from tvm_winoq.board import board_stop

    port = free_port()
    try:
        yield start_board(cpu="max", port=port)
    finally:
        board_stop(port)


@pytest.fixture(scope="module")
def tracker() -> Iterator[str]:
    with rpc_tracker() as addr:
        yield addr


@pytest.fixture(scope="module")
def board_a72(tracker: str) -> Iterator[dict]:
    """A Raspberry Pi 4-like board (no dot product) registered at the tracker as ``rpi4-emu``."""
    from tvm_winoq.board import board_stop

    port = free_port()
    try:
        info = start_board(cpu="cortex-a72", port=port, key="rpi4-emu", tracker=tracker, max_sessions=1)
        wait_for(lambda: "rpi4-emu" in tracker_summary(tracker), "board registration at the tracker")
        yield info
    finally:
        board_stop(port)


# ---------------------------------------------------------------------------------------------------------
# board tests


@board
@slow
def test_dotprod_kernel_bit_exact_on_board(board_max: dict, libs: dict[str, Path]) -> None:
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:
        asm = subprocess.run([objdump, "-d", str(libs["sdot"])], capture_output=True, text=True).stdout
        assert "\tsdot\t" in asm, "the rpi5 library should use the SDOT instruction"
    remote = connect(rpc=board_max["rpc"], timeout=30, session_timeout=300)
    inputs = _dot4_inputs()
    res = bench_module(remote, libs["sdot"], inputs, number=5, repeat=3, func_name="sdot")
    assert res["kind"] == "module"
    np.testing.assert_array_equal(res["outputs"][2], _dot4_ref(inputs[0], inputs[1]))
    assert len(res["times_ms"]) == 3 and 0 < res["min_ms"] <= res["median_ms"] <= res["max_ms"]


@board
@slow
def test_relax_vm_on_board(board_max: dict, libs: dict[str, Path]) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (8, 32), dtype=np.int8)
    w = rng.integers(-128, 128, (16, 32), dtype=np.int8)
    res = remote_bench(libs["vm"], [x, w], rpc=board_max["rpc"], timeout=30, number=2, repeat=2)
    assert res["kind"] == "relax-vm" and res["endpoint"] == board_max["rpc"]
    np.testing.assert_array_equal(res["outputs"][0], x.astype(np.int32) @ w.astype(np.int32).T)


@board
@slow
def test_board_start_is_idempotent(board_max: dict) -> None:
    from tvm_winoq.board import board_start, board_status

    again = board_start(cpu="max", port=board_max["port"])
    assert again["pid"] == board_max["pid"]
    status = board_status(board_max["port"])[board_max["port"]]
    assert status["running"] and status["answers"] and status["cpu"] == "max"


@board
@slow
def test_missing_function_is_a_clear_error(board_max: dict, libs: dict[str, Path]) -> None:
    from tvm_winoq.errors import ModelError

    remote = connect(rpc=board_max["rpc"], timeout=30)
    with pytest.raises(ModelError, match="no function 'nope'"):
        bench_module(remote, libs["sdot"], _dot4_inputs(), func_name="nope")


@board
@slow
def test_sigill_on_cortex_a72_then_board_keeps_serving(
    tracker: str, board_a72: dict, libs: dict[str, Path]
) -> None:
    """Dotprod code on a core without it: a clear SIGILL error, and the board serves the next session."""
    remote = connect(tracker=tracker, key="rpi4-emu", timeout=30, session_timeout=300)
    with pytest.raises(RemoteCrashError) as info:
        bench_module(remote, libs["sdot"], _dot4_inputs(), func_name="sdot", number=1, repeat=1)
    assert info.value.signal == "SIGILL"
    assert "illegal instruction" in str(info.value) and "sdot_rpi5.so:sdot" in str(info.value)
    del remote

    # A new session through the tracker: NEON-only code built for rpi4 runs bit-exactly.
    inputs = _dot4_inputs(seed=2)
    res = remote_bench(libs["dot4"], inputs, tracker=tracker, key="rpi4-emu", timeout=30, func_name="dot4")
    np.testing.assert_array_equal(res["outputs"][2], _dot4_ref(inputs[0], inputs[1]))
    from tvm_winoq.board import board_status

    assert board_status(board_a72["port"])[board_a72["port"]]["running"]


@board
@slow
def test_tracker_unknown_key_fails_fast(tracker: str, board_a72: dict) -> None:
    assert tracker_summary(tracker)["rpi4-emu"]["servers"]
    with pytest.raises(DeviceError, match=r"no device with key 'rpi5'.*registered keys: rpi4-emu"):
        connect(tracker=tracker, key="rpi5", timeout=5)


# ---------------------------------------------------------------------------------------------------------
# no board needed


def test_protocol_constants_match_tvm() -> None:
    from tvm.rpc import base

    assert (RPC_MAGIC, RPC_TRACKER_MAGIC) == (base.RPC_MAGIC, base.RPC_TRACKER_MAGIC)


def test_dead_port_fails_fast() -> None:
    port = free_port()  # nothing listens there
    for kwargs in ({"rpc": f"127.0.0.1:{port}"}, {"tracker": f"127.0.0.1:{port}", "key": "rpi5"}):
        with pytest.raises(DeviceError, match="connection refused"):
            connect(timeout=3, **kwargs)  # type: ignore[arg-type]


def test_silent_server_times_out() -> None:
    """A server that accepts TCP but never answers (hung, or busy with another session)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        addr = f"127.0.0.1:{listener.getsockname()[1]}"
        for kwargs in ({"rpc": addr}, {"tracker": addr, "key": "rpi5"}):
            with pytest.raises(DeviceError, match="within 1s|did not answer"):
                connect(timeout=1, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"rpc": "a:1", "tracker": "b:2"}, {"rpc": "nohost"}, {"rpc": "h:99999"}, {"tracker": "h:1"}],
)
def test_bad_connect_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        connect(**kwargs)
