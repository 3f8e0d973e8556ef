"""RPC helpers: connect to a board (directly or through a tracker) and benchmark a compiled library.

Every failure a user can hit -- nothing listening, a busy or hung server, an unknown tracker key, a
session that crashed on the board (``SIGILL`` from a missing ISA extension) -- surfaces as
:class:`tvm_winoq.errors.DeviceError` within the given timeout instead of a hang or a C++ traceback.
These are plain functions (no argparse) for the ``winoq`` CLI and for Python users.

Examples
--------
>>> remote = connect(rpc="127.0.0.1:9190", timeout=10)                  # doctest: +SKIP
>>> remote = connect(tracker="127.0.0.1:9000", key="rpi5", timeout=30)   # doctest: +SKIP
>>> res = bench_module(remote, "net.so", [x], number=10, repeat=3)       # doctest: +SKIP
>>> res["median_ms"], res["outputs"][0].shape                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .errors import ConfigError, DeviceError, ModelError

__all__ = [
    "RemoteCrashError",
    "bench_module",
    "connect",
    "parse_address",
    "probe_server",
    "remote_bench",
    "require_key",
    "tracker_summary",
]

# Wire constants of the TVM RPC protocol (tvm/rpc/base.py); kept here so probing needs no TVM import.
RPC_MAGIC = 0xFF271
RPC_TRACKER_MAGIC = 0x2F271
_TRACKER_SUCCESS, _TRACKER_REQUEST, _TRACKER_SUMMARY = 0, 4, 6
_PROBE_KEY = "client:__winoq_probe__"

T = TypeVar("T")


class RemoteCrashError(DeviceError):
    """The board's session process died running our code; ``signal`` names it (``"SIGILL"``) if known."""

    def __init__(self, message: str, signal: str | None = None) -> None:
        super().__init__(message)
        self.signal = signal


def parse_address(text: str, what: str = "rpc") -> tuple[str, int]:
    """Split ``"HOST:PORT"`` (IPv6: ``"[::1]:9190"``) into ``(host, port)``.

    Raises
    ------
    ConfigError
        If ``text`` is not ``HOST:PORT`` with a port in 1..65535 (``what`` names the option).
    """
    host, sep, port = str(text).strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: expected HOST:PORT (e.g. 127.0.0.1:9190), got {text!r}")
    return host, int(port)


def _open(host: str, port: int, timeout: float, what: str) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError as exc:
        raise DeviceError(f"{what} at {host}:{port}: connection refused (nothing listening)") from exc
    except TimeoutError as exc:
        raise DeviceError(f"{what} at {host}:{port}: no TCP connection within {timeout:g}s") from exc
    except OSError as exc:
        raise DeviceError(f"{what} at {host}:{port}: {exc.strerror or exc}") from exc
    sock.settimeout(timeout)
    return sock


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by peer")
        buf += chunk
    return buf


def probe_server(host: str, port: int, timeout: float = 5.0) -> None:
    """Check within ``timeout`` seconds that an RPC server answers a handshake, opening no session.

    Sends a deliberately mismatching client key; an idle TVM RPC server answers (with a mismatch code)
    and goes back to listening.

    Raises
    ------
    DeviceError
        If nothing listens, or the server accepts the connection but does not answer in time (it is
        serving another session, or hung).
    """
    sock = _open(host, port, timeout, "RPC server")
    try:
        key = _PROBE_KEY.encode()
        sock.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
        code = struct.unpack("<i", _recv_exact(sock, 4))[0]
    except TimeoutError as exc:
        raise DeviceError(
            f"RPC server at {host}:{port} accepted the connection but did not answer within {timeout:g}s "
            "(busy with another session, or hung)"
        ) from exc
    except OSError as exc:
        raise DeviceError(f"RPC server at {host}:{port} dropped the handshake: {exc}") from exc
    finally:
        sock.close()
    if code not in (RPC_MAGIC, RPC_MAGIC + 1, RPC_MAGIC + 2):
        raise DeviceError(f"{host}:{port} is not a TVM RPC server (answered {code:#x})")


def _call_with_timeout(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run a blocking TVM call in a daemon thread; give up (leaving it behind) after ``timeout``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="winoq-rpc", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise DeviceError(f"{what}: no answer within {timeout:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("  File")]
    return lines[-1] if lines else type(exc).__name__


def _device_error(exc: BaseException, what: str) -> DeviceError:
    """Translate a TVM/RPC exception into a one-line DeviceError."""
    if isinstance(exc, DeviceError):
        return exc
    text = str(exc)
    if "RPCSessionCrashed" in text:
        detail = text.split("RPCSessionCrashed:", 1)[1].strip().splitlines()[0]
        sig = re.search(r"\b(SIG[A-Z]+)\b", detail)
        return RemoteCrashError(f"{what}: {detail}", signal=sig.group(1) if sig else None)
    if "RPCSessionTimeoutError" in text:
        return DeviceError(f"{what}: the board killed the session after its session_timeout")
    if "mismatch" in text.lower():
        return DeviceError(f"{what}: the server rejected the key ({_short(exc)})")
    return DeviceError(f"{what}: {_short(exc)}")


def _tracker_call(sock: socket.socket, message: list) -> Any:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack("<i", len(data)) + data)
    size = struct.unpack("<i", _recv_exact(sock, 4))[0]
    return json.loads(_recv_exact(sock, size).decode())


def _tracker_open(host: str, port: int, timeout: float) -> socket.socket:
    sock = _open(host, port, timeout, "RPC tracker")
    try:
        sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", _recv_exact(sock, 4))[0]
    except OSError as exc:
        sock.close()
        raise DeviceError(f"{host}:{port} did not answer as an RPC tracker: {exc}") from exc
    if magic != RPC_TRACKER_MAGIC:
        sock.close()
        raise DeviceError(f"{host}:{port} is not a TVM RPC tracker")
    return sock


def _summary(sock: socket.socket) -> dict[str, dict[str, Any]]:
    value = _tracker_call(sock, [_TRACKER_SUMMARY])
    if value[0] != _TRACKER_SUCCESS:
        raise DeviceError(f"RPC tracker refused the summary request: {value}")
    data = value[1]
    out: dict[str, dict[str, Any]] = {}
    for item in data.get("server_info", []):
        key = str(item.get("key", "")).removeprefix("server:")
        entry = out.setdefault(key, {"free": 0, "pending": 0, "servers": []})
        entry["servers"].append(":".join(str(a) for a in item.get("addr", [])))
    for key, info in data.get("queue_info", {}).items():
        if key in out:
            out[key].update(free=info.get("free", 0), pending=info.get("pending", 0))
    return out


def tracker_summary(tracker: str, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """Devices registered at the RPC tracker ``"HOST:PORT"`` (answer within ``timeout`` seconds).

    Returns
    -------
    dict
        ``{key: {"free": int, "pending": int, "servers": ["host:port", ...]}}``.

    Raises
    ------
    DeviceError
        If the tracker is unreachable or does not answer in time.
    """
    host, port = parse_address(tracker, "tracker")
    sock = _tracker_open(host, port, timeout)
    try:
        return _summary(sock)
    except OSError as exc:
        raise DeviceError(f"RPC tracker at {host}:{port}: {exc}") from exc
    finally:
        sock.close()


def connect(
    rpc: str | None = None,
    tracker: str | None = None,
    key: str = "",
    timeout: float = 10.0,
    session_timeout: float = 0.0,
    priority: int = 1,
) -> Any:
    """Open an RPC session on a board, directly or through a tracker.

    Parameters
    ----------
    rpc : str, optional
        ``"HOST:PORT"`` of an RPC server (``python -m tvm.exec.rpc_server`` or the emulated board).
    tracker : str, optional
        ``"HOST:PORT"`` of an RPC tracker; then ``key`` selects the device kind.
    key : str
        Device key (required with ``tracker``; with ``rpc`` it must match the server's key, if any).
    timeout : float
        Seconds to wait for the connection, the tracker's answer and a free device.
    session_timeout : float
        Seconds after which the server kills the session (0: never).
    priority : int
        Tracker request priority (higher is served first).

    Returns
    -------
    tvm.rpc.RPCSession
        The session (``remote.cpu()``, ``remote.upload``, ``remote.load_module``, ...).  It closes when
        the session and every remote object (modules, tensors) from it are garbage collected.

    Raises
    ------
    ConfigError
        Neither or both of ``rpc``/``tracker``, a malformed address, or ``tracker`` without ``key``.
    DeviceError
        Connection refused, no answer within ``timeout``, unknown tracker key (the message lists the
        registered keys) or no free device in time.
    """
    if (rpc is None) == (tracker is None):
        raise ConfigError("connect: give exactly one of rpc='HOST:PORT' or tracker='HOST:PORT'")
    if timeout <= 0:
        raise ConfigError(f"connect: timeout must be > 0 seconds, got {timeout}")
    if rpc is not None:
        host, port = parse_address(rpc, "rpc")
        probe_server(host, port, timeout)
        return _open_session(host, port, key, session_timeout, timeout, f"RPC server at {host}:{port}")
    if not key:
        raise ConfigError("connect: a device key is required with tracker= (e.g. key='rpi5')")
    thost, tport = parse_address(tracker or "", "tracker")
    url, port, matchkey = _tracker_request(thost, tport, key, priority, timeout)
    what = f"{key!r} device at {url}:{port} (via tracker {thost}:{tport})"
    return _open_session(url, int(port), matchkey, session_timeout, timeout, what)


def _open_session(host: str, port: int, key: str, session_timeout: float, timeout: float, what: str) -> Any:
    import tvm.rpc

    try:
        return _call_with_timeout(
            lambda: tvm.rpc.connect(host, port, key, session_timeout), timeout, f"connecting to {what}"
        )
    except Exception as exc:
        raise _device_error(exc, f"connecting to {what}") from exc


def require_key(devices: dict[str, Any], key: str, tracker: str) -> None:
    """Raise :class:`DeviceError` naming the registered keys when ``key`` is not among ``devices``.

    Parameters
    ----------
    devices : dict
        :func:`tracker_summary` of the tracker.
    key : str
        The device key asked for.
    tracker : str
        ``HOST:PORT`` of the tracker (for the message).
    """
    if key not in devices:
        known = ", ".join(sorted(devices)) or "none"
        raise DeviceError(
            f"no device with key {key!r} is registered at the RPC tracker {tracker} "
            f"(registered keys: {known})"
        )


def _tracker_request(host: str, port: int, key: str, priority: int, timeout: float) -> list:
    """Ask the tracker for a free server with ``key``: ``[url, port, matchkey]``."""
    sock = _tracker_open(host, port, timeout)
    try:
        require_key(_summary(sock), key, f"{host}:{port}")
        value = _tracker_call(sock, [_TRACKER_REQUEST, key, "", priority])
    except TimeoutError as exc:
        raise DeviceError(
            f"no free {key!r} device at the RPC tracker {host}:{port} within {timeout:g}s "
            "(all busy; raise timeout or add boards)"
        ) from exc
    except OSError as exc:
        raise DeviceError(f"RPC tracker at {host}:{port}: {exc}") from exc
    finally:
        sock.close()
    if value[0] != _TRACKER_SUCCESS:
        raise DeviceError(f"RPC tracker at {host}:{port} refused the request for {key!r}: {value}")
    return list(value[1])


def _to_numpy(value: Any) -> list[np.ndarray]:
    if isinstance(value, tuple | list):
        return [arr for item in value for arr in _to_numpy(item)]
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [np.asarray(value)]


def _remote_inputs(inputs: Sequence[Any], dev: Any) -> list[Any]:
    import tvm

    out = []
    for value in inputs:
        if isinstance(value, tvm.runtime.Tensor):
            if value.device.dlpack_device_type() >= 128:  # already on the remote side (RPC_SESS_MASK)
                out.append(value)
                continue
            value = value.numpy()
        out.append(tvm.runtime.tensor(np.ascontiguousarray(value), dev))
    return out


def bench_module(
    remote: Any,
    lib_path: str | os.PathLike[str],
    inputs: Sequence[Any],
    number: int = 10,
    repeat: int = 3,
    min_repeat_ms: int = 0,
    func_name: str = "main",
    device: str = "cpu",
) -> dict[str, Any]:
    """Upload a compiled library to a board, run it once, then time it with ``time_evaluator``.

    Parameters
    ----------
    remote : tvm.rpc.RPCSession
        Session from :func:`connect`.
    lib_path : path-like
        Shared library from ``export_library`` (built for the board's target).
    inputs : sequence of numpy.ndarray or tvm.runtime.Tensor
        Arguments.  For a Relax VM library these are the function's parameters; for a plain TIR
        module they are all buffer arguments, outputs included (destination-passing style).
    number, repeat, min_repeat_ms : int
        ``time_evaluator`` settings: ``repeat`` measurements of ``number`` runs each (``number`` grows
        until one measurement takes ``min_repeat_ms``); one extra warm-up run is discarded.
    func_name : str
        Function to run (``main`` for Relax modules; the PrimFunc name for TIR modules).
    device : str
        Remote device kind: ``cpu``, ``cuda``, ``vulkan``, ``opencl``, ...

    Returns
    -------
    dict
        ``kind`` (``"relax-vm"`` or ``"module"``), ``function``, ``device``, ``number``, ``repeat``,
        ``min_repeat_ms``, ``times_ms`` (one mean per repeat), ``median_ms``, ``min_ms``, ``mean_ms``,
        ``max_ms``, ``std_ms`` and ``outputs`` (numpy arrays: the VM's results, or every argument
        after the run for a plain module).

    Raises
    ------
    ModelError
        If the library lacks ``func_name``.
    RemoteCrashError
        If the board's session died running it (e.g. ``SIGILL``: the library uses an ISA extension
        the board lacks).
    DeviceError
        On any other RPC failure.
    """
    if number < 1 or repeat < 1 or min_repeat_ms < 0:
        raise ConfigError(
            f"bench: need number >= 1, repeat >= 1, min_repeat_ms >= 0 (got {number}, "
            f"{repeat}, {min_repeat_ms})"
        )
    path = Path(lib_path)
    if not path.is_file():
        raise ModelError(f"library {str(path)!r} does not exist")
    from tvm import relax

    what = f"running {path.name}:{func_name} on the board"
    try:
        remote.upload(str(path), target=path.name)
        lib = remote.load_module(path.name)
        dev = remote.device(device, 0)
        args = _remote_inputs(inputs, dev)
        if lib.implements_function("vm_load_executable"):
            kind = "relax-vm"
            vm = relax.VirtualMachine(lib, dev)
            vm.set_input(func_name, *args)
            vm.invoke_stateful(func_name)
            outputs = _to_numpy(vm.get_outputs(func_name))
            timer = vm.time_evaluator("invoke_stateful", dev, number, repeat, min_repeat_ms)
            result = timer(func_name)
        else:
            kind = "module"
            if not lib.implements_function(func_name):
                raise ModelError(f"{path.name} has no function {func_name!r} (pass func_name=...)")
            lib[func_name](*args)
            outputs = [arg.numpy() for arg in args]
            timer = lib.time_evaluator(
                func_name, dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
            )
            result = timer(*args)
    except (ModelError, ConfigError):
        raise
    except Exception as exc:
        raise _device_error(exc, what) from exc
    times = [float(t) * 1e3 for t in result.results]
    return {
        "kind": kind,
        "function": func_name,
        "library": str(path),
        "device": device,
        "number": number,
        "repeat": repeat,
        "min_repeat_ms": min_repeat_ms,
        "times_ms": times,
        "median_ms": float(np.median(times)),
        "min_ms": min(times),
        "mean_ms": float(np.mean(times)),
        "max_ms": max(times),
        "std_ms": float(np.std(times)),
        "outputs": outputs,
    }


def remote_bench(
    lib_path: str | os.PathLike[str],
    inputs: Sequence[Any],
    rpc: str | None = None,
    tracker: str | None = None,
    key: str = "",
    timeout: float = 10.0,
    session_timeout: float = 0.0,
    **bench_kwargs: Any,
) -> dict[str, Any]:
    """:func:`connect` with ``rpc``/``tracker``/``key``/``timeout``/``session_timeout``, then
    :func:`bench_module` with ``bench_kwargs``; returns its dict plus ``"endpoint"``."""
    remote = connect(rpc=rpc, tracker=tracker, key=key, timeout=timeout, session_timeout=session_timeout)
    try:
        result = bench_module(remote, lib_path, inputs, **bench_kwargs)
    finally:
        del remote  # the session ends once no remote object refers to it
    result["endpoint"] = rpc if rpc is not None else f"{tracker} key={key}"
    return result
