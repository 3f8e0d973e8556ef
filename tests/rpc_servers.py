"""Real local RPC endpoints for the tests: TVM RPC servers, trackers and emulated boards on free ports.

Every process is started in its own session and stopped by its own pid when the ``with`` block ends,
even when the test fails.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tvm_winoq.errors import DeviceError


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    ready: Callable[[], bool], what: str, proc: subprocess.Popen | None = None, within: float = 60
) -> None:
    """Poll ``ready()`` (a ``DeviceError`` counts as not ready) until it holds; fail if ``proc`` exits.

    ``within`` only bounds how long a process that never comes up is waited for (a start-up guard).
    """
    deadline = time.monotonic() + within
    while True:
        try:
            if ready():
                return
        except DeviceError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready within {within:g} s")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def tvm_exec(module: str, ready: Callable[[str], bool], *extra: str) -> Iterator[str]:
    """Run ``python -m tvm.exec.<module>`` on a free 127.0.0.1 port; yields ``"127.0.0.1:PORT"``."""
    port = free_port()
    cmd = [sys.executable, "-m", f"tvm.exec.{module}", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--port-end", str(port + 1), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    addr = f"127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(addr), f"tvm.exec.{module}", proc)
        yield addr
    finally:
        _stop(proc)


@contextmanager
def rpc_tracker() -> Iterator[str]:
    """A TVM RPC tracker (skips the test when ``tornado`` is missing)."""
    from tvm_winoq.rpc import tracker_summary

    pytest.importorskip("tornado", reason="the TVM RPC tracker needs tornado (pip install tornado)")
    def ready(addr: str) -> bool:
        return tracker_summary(addr, timeout=1) is not None

    with tvm_exec("rpc_tracker", ready, "--silent") as addr:
        yield addr


@contextmanager
def rpc_server(tracker: str | None = None, key: str = "") -> Iterator[str]:
    """The stock ``tvm.exec.rpc_server`` (host code: a real, not emulated, device).

    With ``tracker`` it registers there under ``key`` (ready once the tracker lists one more free server).
    """
    from tvm_winoq.rpc import parse_address, probe_server, tracker_summary

    if tracker is None:

        def ready(addr: str) -> bool:
            probe_server(*parse_address(addr), timeout=2)  # DeviceError until it answers
            return True

        with tvm_exec("rpc_server", ready) as addr:
            yield addr
        return

    def free() -> int:
        return int(tracker_summary(tracker, timeout=2).get(key, {}).get("free", 0))

    before = free()
    with tvm_exec("rpc_server", lambda addr: free() > before, "--tracker", tracker, "--key", key) as addr:
        yield addr


def start_board(**kwargs: object) -> dict:
    """:func:`tvm_winoq.board.board_start`; skips the test where the Debian packages cannot be installed."""
    from tvm_winoq.board import board_start

    try:
        return board_start(**kwargs)  # type: ignore[arg-type]
    except DeviceError as exc:
        if "sudo apt-get" in str(exc):  # not root and the Debian packages are missing
            pytest.skip(str(exc))
        raise


@contextmanager
def emulated_board(**kwargs: object) -> Iterator[dict]:
    """An emulated aarch64 board (:func:`start_board`) on a free port, stopped afterwards."""
    from tvm_winoq.board import board_stop

    port = free_port()
    try:
        yield start_board(port=port, **kwargs)
    finally:
        board_stop(port)
