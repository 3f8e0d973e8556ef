"""Crash-tolerant TVM RPC server for the emulated (or a real) board.

This file runs *inside* the board's Python (for the emulated board: the arm64 Debian python3 under
``qemu-aarch64-static``) and therefore imports nothing from ``tvm_winoq``; only ``tvm`` and the
standard library.  Start it as a script::

    python3 board_server.py --host 127.0.0.1 --port 9190 [--tracker HOST:PORT --key rpi5]

Why not ``python -m tvm.exec.rpc_server``?  The stock server serves each session in a forked child,
but when that child dies from a signal (e.g. ``SIGILL`` when a module built with ``+dotprod`` runs
on a core without dot-product instructions) it raises out of its listen thread: the socket stays
open, clients queue forever and the server never answers again.  This supervisor reuses the stock
handshake and tracker logic (``tvm.rpc.server._listen_loop``) but replaces the per-session step:

* each session runs in a forked child (``multiprocessing`` with ``fork``), up to ``--max-sessions``
  at once (default 1: one at a time, like the stock server);
* when the child dies abnormally, the client gets a clear ``RPCSessionCrashed`` error message naming
  the signal (``SIGILL: illegal instruction ...``) instead of a hang;
* the session timeout requested by the client is honoured (the child is killed);
* whatever happens, the listen loop continues with the next client.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import resource
import signal
import socket
import sys
import threading
from typing import Any

from tvm.rpc import _ffi_api
from tvm.rpc import server as _server
from tvm.support import utils

LOG = logging.getLogger("winoq.board_server")

_HINTS = {
    "SIGILL": "illegal instruction: the module uses an ISA extension this CPU lacks "
    "(e.g. +dotprod/+i8mm built for a newer core); rebuild for this board's target preset",
    "SIGSEGV": "segmentation fault in the module (out-of-bounds access or ABI mismatch)",
    "SIGBUS": "bus error (misaligned access or truncated file)",
    "SIGFPE": "arithmetic exception (integer division by zero?)",
    "SIGABRT": "the runtime aborted",
    "SIGKILL": "killed (out of memory?)",
}


def describe_exit(exitcode: int | None) -> str:
    """Human-readable description of a session child's exit code.

    Parameters
    ----------
    exitcode : int or None
        ``multiprocessing.Process.exitcode`` (negative: killed by that signal).

    Returns
    -------
    str
        For example ``"SIGILL (illegal instruction: ...)"`` or ``"exit status 3"``.
    """
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = _HINTS.get(name)
        return f"{name} ({hint})" if hint else name
    return f"exit status {exitcode}"


def _return_error(sock: socket.socket, message: str) -> None:
    try:
        _ffi_api.ReturnException(sock.fileno(), message)
    except Exception:  # the client may already be gone
        LOG.debug("could not send the error to the client", exc_info=True)


_SLOTS = threading.BoundedSemaphore(1)


def _session_child(sock: socket.socket, load_library: str | None, work_path: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the C++ serve loop never returns to Python handlers
    os.chdir(work_path.path)  # stray output (and qemu core files, if enabled) land in the session dir
    _server._serve_loop(sock, load_library, work_path)


def _watch(proc: Any, sock: socket.socket, addr: Any, opts: dict, work_path: Any) -> None:
    """Wait for one session child; report an abnormal end to the client; always clean up."""
    try:
        timeout = opts.get("timeout")
        proc.join(timeout)
        if proc.is_alive():
            LOG.warning("session from %s exceeded its %ss timeout; killing pid %d", addr, timeout, proc.pid)
            _return_error(
                sock,
                f"RPCSessionTimeoutError: Your {timeout}s session has expired, "
                'try to increase the "session_timeout" value.',
            )
            proc.kill()
            proc.join(10)
        elif proc.exitcode != 0:
            what = describe_exit(proc.exitcode)
            LOG.error("session child %d from %s died: %s", proc.pid, addr, what)
            _return_error(sock, f"RPCSessionCrashed: the board's session process died with {what}")
        else:
            LOG.info("finish serving %s", addr)
    except Exception:  # keep serving whatever happened
        LOG.exception("session from %s failed", addr)
    finally:
        with contextlib.suppress(OSError):
            work_path.remove()
        with contextlib.suppress(OSError):
            sock.close()
        _SLOTS.release()


def _robust_serving(sock: socket.socket, addr: Any, opts: dict, load_library: str | None) -> None:
    """Start one session in a forked child and return; never raises, so the listen loop keeps going.

    Blocks while ``max_sessions`` sessions are running (with 1, sessions are served one at a time,
    like the stock server).
    """
    _SLOTS.acquire()
    LOG.info("connected from %s", addr)
    try:
        work_path = utils.tempdir()
        proc = multiprocessing.get_context("fork").Process(
            target=_session_child, args=(sock, load_library, work_path), daemon=False
        )
        proc.start()
    except Exception:  # keep serving whatever happened
        LOG.exception("could not start a session for %s", addr)
        with contextlib.suppress(OSError):
            sock.close()
        _SLOTS.release()
        return
    threading.Thread(target=_watch, args=(proc, sock, addr, opts, work_path), daemon=True).start()


def serve(
    host: str = "127.0.0.1",
    port: int = 9190,
    key: str = "",
    tracker: tuple[str, int] | None = None,
    custom_addr: str | None = None,
    load_library: str | None = None,
    max_sessions: int = 1,
) -> None:
    """Bind ``host:port`` and serve RPC sessions forever (optionally registered at a tracker).

    Parameters
    ----------
    host, port : str, int
        Address to bind (exactly this port; no port search, so callers know where it listens).
    key : str
        Device key reported to the tracker (and matched by direct clients when non-empty).
    tracker : tuple of (str, int), optional
        RPC tracker address to register at.
    custom_addr : str, optional
        Address reported to the tracker instead of the peer address it sees.
    load_library : str, optional
        Colon-separated extra shared libraries to load in every session.
    max_sessions : int
        Sessions served at once, each in its own forked process.
    """
    global _SLOTS
    _SLOTS = threading.BoundedSemaphore(max(1, max_sessions))
    _server._serving = _robust_serving  # the listen loop looks this name up at call time
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(8)
    LOG.info("bind to %s:%d (pid %d, key %r, tracker %s)", host, port, os.getpid(), key, tracker)
    print(f"WINOQ_BOARD_READY {host}:{port}", flush=True)
    _server._listen_loop(sock, port, key, tracker, load_library, custom_addr)


def _parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (runs in the board's Python)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9190)
    parser.add_argument("--key", default="")
    parser.add_argument("--tracker", type=_parse_addr, default=None)
    parser.add_argument("--custom-addr", default=None)
    parser.add_argument("--load-library", default=None)
    parser.add_argument("--max-sessions", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Exit at once on SIGTERM: running the atexit temp-dir cleanup while session watcher threads still
    # remove their own directories only produces noise; the caller owns (and cleans) TMPDIR.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with contextlib.suppress(ValueError, OSError):  # no multi-GB (qemu) core files from crashed sessions
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    serve(
        args.host, args.port, args.key, args.tracker, args.custom_addr, args.load_library, args.max_sessions
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
