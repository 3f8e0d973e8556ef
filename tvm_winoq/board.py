"""Emulated aarch64 board: an arm64 Debian Python + TVM under ``qemu-aarch64-static``, served over RPC.

:func:`board_start` prepares (once, cached under ``<cache_dir>/board/``) and starts the board:

1. Debian packages ``qemu-user-static mmdebstrap gcc-aarch64-linux-gnu libc6-dev-arm64-cross``
   (installed with apt-get when running as root, else a clear error);
2. an arm64 Debian bookworm root file system with ``python3`` (3.11), built by ``mmdebstrap``;
3. the aarch64 wheels of the *same* ``apache-tvm`` / ``apache-tvm-ffi`` / ``numpy`` versions as the
   host (``pip download --platform manylinux_2_28_aarch64``), installed into that root file system;
4. ``tvm_winoq/board_server.py`` -- a crash-tolerant TVM RPC server -- run by the emulated Python:
   ``qemu-aarch64-static -cpu <cpu> -L ROOTFS ROOTFS/usr/bin/python3.11 board_server.py ...``.

``-cpu max`` has dot product, i8mm and SVE; ``-cpu cortex-a72`` (Raspberry Pi 4) has neither, so
dotprod code dies there with ``SIGILL`` -- reported to the client, and the board keeps serving.
Each board's pid is recorded in ``<root>/state/board-<port>.json``; :func:`board_stop` ends exactly
that process group.  Emulated timings say nothing about real hardware; use the board for correctness.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata as md
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DeviceError
from .paths import cache_dir
from .rpc import probe_server

__all__ = ["board_setup", "board_start", "board_status", "board_stop"]

DEBIAN_SUITE = "bookworm"  # python3 is 3.11 there, matching the cp311 wheels
DEBIAN_MIRROR = os.environ.get("WINOQ_DEBIAN_MIRROR", "http://deb.debian.org/debian")
ROOTFS_PACKAGES = ("python3", "libstdc++6", "libgcc-s1")
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
# Distributions copied into the board's Python, pinned to the host's installed versions.
GUEST_DISTS = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions")
# Host tools -> Debian package providing them.
HOST_PACKAGES = {
    "qemu-aarch64-static": "qemu-user-static",
    "mmdebstrap": "mmdebstrap",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "/usr/aarch64-linux-gnu/include/stdio.h": "libc6-dev-arm64-cross",
}
_GUEST_PY = "usr/bin/python3.11"
_SITE = "usr/local/lib/python3.11/dist-packages"
_PROCS: dict[int, subprocess.Popen] = {}  # boards started by this process, reaped on stop


def _root(root: str | os.PathLike[str] | None) -> Path:
    path = Path(root) if root is not None else cache_dir() / "board"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, **kwargs: Any) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise DeviceError(f"board setup: {what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def _missing_packages() -> list[str]:
    missing = []
    for tool, package in HOST_PACKAGES.items():
        found = Path(tool).exists() if tool.startswith("/") else shutil.which(tool) is not None
        if not found:
            missing.append(package)
    return missing


def ensure_host_packages() -> None:
    """Install the Debian packages the board needs (as root), or explain how to.

    Raises
    ------
    DeviceError
        If packages are missing and this process is not root, or apt-get fails.
    """
    missing = _missing_packages()
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise DeviceError(
            "the emulated board needs the Debian packages " + ", ".join(missing) + "; install them with: "
            "sudo apt-get update && sudo apt-get install -y " + " ".join(missing)
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], "apt-get update", env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], "apt-get install", env=env)


def _build_rootfs(root: Path) -> Path:
    rootfs = root / f"rootfs-{DEBIAN_SUITE}-arm64"
    if (rootfs / ".winoq-rootfs-ok").exists():
        return rootfs
    tmp = root / f"rootfs.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    cmd = [
        "mmdebstrap",
        "--variant=extract",
        "--architectures=arm64",
        "--include=" + ",".join(ROOTFS_PACKAGES),
    ]
    _run([*cmd, DEBIAN_SUITE, str(tmp), DEBIAN_MIRROR], "building the arm64 root file system (mmdebstrap)")
    if not (tmp / _GUEST_PY).exists():
        raise DeviceError(f"board setup: {tmp / _GUEST_PY} missing after mmdebstrap (not bookworm?)")
    tmp.rename(rootfs)
    (rootfs / ".winoq-rootfs-ok").write_text(DEBIAN_SUITE + "\n")
    return rootfs


def _host_versions() -> dict[str, str]:
    try:
        return {dist: md.version(dist) for dist in GUEST_DISTS}
    except md.PackageNotFoundError as exc:
        raise DeviceError(f"board setup: {exc.name} is not installed on the host") from exc


def _install_wheels(root: Path, rootfs: Path) -> None:
    versions = _host_versions()
    site = rootfs / _SITE
    marker = site / ".winoq-wheels.json"
    if marker.exists() and json.loads(marker.read_text()) == versions:
        return
    wheels = root / "wheels"
    wheels.mkdir(exist_ok=True)
    pins = [f"{dist}=={ver}" for dist, ver in versions.items()]
    plat = ["--platform", WHEEL_PLATFORM, "--python-version", "311", "--implementation", "cp"]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run(
        [*pip, "download", "--no-deps", "--only-binary=:all:", *plat, "-d", str(wheels), *pins],
        "downloading the aarch64 wheels (" + ", ".join(pins) + ")",
    )
    shutil.rmtree(site, ignore_errors=True)
    files = [
        str(p)
        for p in sorted(wheels.glob("*.whl"))
        if any(_wheel_matches(p.name, d, v) for d, v in versions.items())
    ]
    _run(
        [*pip, "install", "--no-deps", "--no-compile", "--no-index", "--only-binary=:all:", *plat,
         "--target", str(site), *files],
        "installing the aarch64 wheels into the root file system",
    )  # fmt: skip
    # Byte-compile with the host's Python 3.11 (same .pyc magic as the guest's): import tvm under
    # qemu drops from ~15 s to ~6 s.
    if sys.version_info[:2] == (3, 11):
        _run(
            [sys.executable, "-m", "compileall", "-q", str(rootfs / "usr/lib/python3.11"), str(site)],
            "byte-compiling the guest Python",
        )
    marker.write_text(json.dumps(versions))


def _wheel_matches(filename: str, dist: str, version: str) -> bool:
    name = dist.replace("-", "_").lower()
    fname = filename.lower()
    return fname.startswith(f"{name}-{version.lower()}-") and (
        "aarch64" in fname or fname.endswith("-any.whl")
    )


def board_setup(root: str | os.PathLike[str] | None = None) -> Path:
    """Prepare the emulated board's files (idempotent; seconds when cached).

    Parameters
    ----------
    root : path-like, optional
        Cache folder; defaults to ``<tvm_winoq.paths.cache_dir()>/board``.

    Returns
    -------
    Path
        The arm64 root file system.

    Raises
    ------
    DeviceError
        If a step fails (the message names it and shows the tool's output).
    """
    base = _root(root)
    with _locked(base):
        ensure_host_packages()
        rootfs = _build_rootfs(base)
        _install_wheels(base, rootfs)
    return rootfs


def _state_path(root: Path, port: int) -> Path:
    return root / "state" / f"board-{port}.json"


def _alive(pid: int, port: int) -> bool:
    """Whether ``pid`` is still our board server for ``port`` (guards against recycled pids)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        return False
    return b"board_server.py" in b" ".join(cmdline) and str(port).encode() in cmdline


def _read_state(root: Path, port: int) -> dict[str, Any] | None:
    try:
        return json.loads(_state_path(root, port).read_text())
    except (OSError, ValueError):
        return None


def board_status(port: int | None = None, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Status of the recorded boards.

    Parameters
    ----------
    port : int, optional
        Only this board; default: all recorded boards.
    root : path-like, optional
        Cache folder (as for :func:`board_setup`).

    Returns
    -------
    dict
        ``{port: {"pid", "cpu", "host", "port", "key", "tracker", "log", "running", "answers"}}`` where
        ``running`` says the process exists and ``answers`` whether it completed an RPC handshake
        within 3 s (false while it serves another session).
    """
    base = _root(root)
    ports = (
        [port]
        if port is not None
        else sorted(int(p.stem.split("-")[1]) for p in base.glob("state/board-*.json"))
    )
    out: dict[str, Any] = {}
    for prt in ports:
        state = _read_state(base, prt)
        if state is None:
            continue
        state["running"] = _alive(int(state["pid"]), prt)
        state["answers"] = False
        if state["running"]:
            try:
                probe_server(state["host"], prt, timeout=3.0)
                state["answers"] = True
            except DeviceError:
                pass
        out[prt] = state
    return out


def _stop_pid(pid: int, port: int) -> None:
    proc = _PROCS.pop(port, None)
    if not _alive(pid, port):
        if proc is not None:
            proc.wait(timeout=5)
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)  # the board runs in its own session: pgid == its pid
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return
            if proc is None and not _alive(pid, port):
                return
            time.sleep(0.1)


def board_stop(port: int | None = None, root: str | os.PathLike[str] | None = None) -> list[int]:
    """Stop the board on ``port`` (default: every recorded board) and its session processes.

    Parameters
    ----------
    port : int, optional
        Board to stop.
    root : path-like, optional
        Cache folder (as for :func:`board_setup`).

    Returns
    -------
    list of int
        Ports of the boards that were stopped.
    """
    base = _root(root)
    stopped = []
    for prt, state in board_status(port, base).items():
        _stop_pid(int(state["pid"]), prt)
        _state_path(base, prt).unlink(missing_ok=True)
        shutil.rmtree(base / "tmp" / str(prt), ignore_errors=True)
        stopped.append(prt)
    return stopped


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def board_start(
    cpu: str = "max",
    port: int = 9190,
    root: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    key: str = "",
    tracker: str | None = None,
    threads: int = 1,
    max_sessions: int = 4,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Start (or reuse) an emulated aarch64 board serving TVM RPC on ``host:port``.

    Parameters
    ----------
    cpu : str
        ``qemu-aarch64 -cpu`` model: ``max`` (dotprod, i8mm, SVE), ``cortex-a76`` (dotprod),
        ``cortex-a72`` (NEON only), ``neoverse-n1``, ...; see ``qemu-aarch64-static -cpu help``.
    port : int
        TCP port to serve on.
    root : path-like, optional
        Cache folder (as for :func:`board_setup`).
    host : str
        Address to bind; keep ``127.0.0.1`` (the RPC server runs arbitrary uploaded code).
    key : str
        Device key; registered at ``tracker`` when given.
    tracker : str, optional
        ``"HOST:PORT"`` of an RPC tracker to register at.
    threads : int
        ``TVM_NUM_THREADS`` on the board (emulated threads all share the host's cores).
    max_sessions : int
        Sessions served at once (each in its own forked process); 1 mimics a stock server.
    timeout : float
        Seconds to wait for the server to answer.

    Returns
    -------
    dict
        The board's status (see :func:`board_status`) plus ``"rpc": "HOST:PORT"``.

    Raises
    ------
    DeviceError
        If setup fails, the port is taken by another program, or the server does not come up.
    """
    base = _root(root)
    wanted = {"cpu": cpu, "host": host, "key": key, "tracker": tracker, "threads": threads}
    wanted["max_sessions"] = max_sessions
    current = board_status(port, base).get(port)
    # Reuse a running board with the same settings even when it does not answer right now: with
    # max_sessions=1 it is simply busy serving someone.
    if current and current["running"] and all(current.get(k) == v for k, v in wanted.items()):
        return {**current, "rpc": f"{host}:{port}"}
    if current:
        board_stop(port, base)
    rootfs = board_setup(base)
    for old_log in base.glob("board-*.log"):  # logs of boards stopped over a day ago
        if (
            not _state_path(base, int(old_log.stem[6:])).exists()
            and time.time() - old_log.stat().st_mtime > 86400
        ):
            old_log.unlink(missing_ok=True)
    if not _port_free(host, port):
        raise DeviceError(f"board: port {host}:{port} is already in use by another program")
    qemu = shutil.which("qemu-aarch64-static") or "qemu-aarch64-static"
    server = base / "board_server.py"
    shutil.copyfile(Path(__file__).with_name("board_server.py"), server)
    cmd = [qemu, "-cpu", cpu, "-L", str(rootfs), str(rootfs / _GUEST_PY), "-u", str(server)]
    cmd += ["--host", host, "--port", str(port), "--max-sessions", str(max_sessions)]
    cmd += ["--key", key] + (["--tracker", tracker] if tracker else [])
    tmp = base / "tmp" / str(port)  # session dirs; emptied on every (re)start of this board
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(base), "LANG": "C.UTF-8", "TMPDIR": str(tmp)}
    env |= {"PYTHONNOUSERSITE": "1", "TVM_NUM_THREADS": str(threads)}
    log = base / f"board-{port}.log"
    (base / "state").mkdir(exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(tmp),
            start_new_session=True,
        )
    _PROCS[port] = proc
    state = {**wanted, "pid": proc.pid, "port": port, "log": str(log), "rootfs": str(rootfs)}
    state["started"] = time.time()
    _state_path(base, port).write_text(json.dumps(state, indent=1))
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            _state_path(base, port).unlink(missing_ok=True)
            _PROCS.pop(port, None)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise DeviceError(
                f"board: the RPC server exited with status {proc.returncode} (log {log}):\n{tail}"
            )
        if "WINOQ_BOARD_READY" in log.read_text(errors="replace"):
            try:
                probe_server(host, port, timeout=5.0)
                break
            except DeviceError:
                pass
        if time.monotonic() > deadline:
            board_stop(port, base)
            raise DeviceError(
                f"board: the RPC server on {host}:{port} did not answer within {timeout:g}s (log {log})"
            )
        time.sleep(0.2)
    return {**board_status(port, base)[port], "rpc": f"{host}:{port}"}
