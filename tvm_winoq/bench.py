"""``winoq bench``: time a ``winoq compile`` output end to end and per PrimFunc, here or on a device.

End to end, ``module.so`` is uploaded (or loaded here with ``local=True``) and ``main`` is timed with the
Relax VM's ``time_evaluator`` (one discarded warm-up run, ``repeat`` measurements of ``number`` runs;
median and min reported).  Relax 0.27 has no ``vm.profile()``, so per-layer times come from rebuilding
the lowered module from ``config.json`` (same model, configuration, learned scales and tune log as the
compile), building every PrimFunc of it -- our Winograd kernels (``winoq.kernel`` input / gemm /
output) and the other fused operators -- into one library, uploading it next to ``module.so`` and timing
each function on random inputs of its buffer shapes.  ``calls x median`` summed over the PrimFuncs,
compared with the end-to-end time, leaves the VM's own overhead (allocation, builtins).

Times measured on the emulated board (qemu user mode; detected from the board registry, and for any
local endpoint serving a cross-compiled preset) are labeled ``emulated`` everywhere and are not
performance.

Examples
--------
>>> res = bench_job(Path("out"), rpc="127.0.0.1:9190")                        # doctest: +SKIP
>>> res = bench_job(Path("out"), tracker="127.0.0.1:9000", key="rpi5")        # doctest: +SKIP
>>> res["end_to_end"]["median_ms"], res["emulated"]                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, TargetError, WinoqError

__all__ = ["bench_job", "detect_emulation", "format_bench", "lowered_module", "primfunc_table"]

EMULATED_NOTE = (
    "EMULATED: measured on the qemu user-mode board; these times are not performance "
    "(use them for correctness and smoke tests only)"
)
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


# --------------------------------------------------------------------------------------------------------
# where does it run


def detect_emulation(
    preset: Any, rpc: str | None = None, tracker: str | None = None, key: str = "", local: bool = False
) -> dict[str, Any]:
    """Whether the device behind ``rpc`` / ``tracker`` + ``key`` is emulated.

    An endpoint is emulated when it is the port of a board recorded by :mod:`tvm_winoq.board`, or
    when it is on this machine and the preset is cross-compiled (this host cannot run that ISA
    natively, so only an emulator can serve it).

    Returns
    -------
    dict
        ``emulated`` (bool) and ``reason`` (str).
    """
    if local:
        return {"emulated": False, "reason": "this host"}
    from .rpc import parse_address, tracker_summary

    if rpc is not None:
        endpoints = [parse_address(rpc, "rpc")]
    else:
        servers = tracker_summary(tracker or "", timeout=10.0).get(key, {}).get("servers", [])
        endpoints = [parse_address(s, "tracker server") for s in servers if ":" in s]
    boards: dict[int, Any] = {}
    try:
        from .board import board_status

        boards = {int(p): s for p, s in board_status().items() if s.get("running")}
    except (WinoqError, OSError):
        pass
    for host, port in endpoints:
        if host in _LOCAL_HOSTS and port in boards:
            return {"emulated": True, "reason": f"qemu board (-cpu {boards[port].get('cpu')}) on port {port}"}
        if host in _LOCAL_HOSTS and preset.is_cross:
            return {"emulated": True, "reason": f"{host}:{port} serves {preset.name} code on this x86 host"}
    where = rpc if rpc is not None else f"tracker {tracker} key {key}"
    return {"emulated": False, "reason": f"device at {where}"}


def _preflight(rpc: str | None, tracker: str | None, key: str, timeout: float) -> None:
    """Fail fast (DeviceError) when the server does not answer or the tracker lacks ``key``."""
    from .rpc import parse_address, probe_server, require_key, tracker_summary

    if rpc is not None:
        probe_server(*parse_address(rpc, "rpc"), timeout=timeout)
    elif tracker is not None:
        require_key(tracker_summary(tracker, timeout=timeout), key, tracker)


def _open_session(rpc: str | None, tracker: str | None, key: str, local: bool, timeout: float) -> Any:
    if local:
        import tvm.rpc

        return tvm.rpc.LocalSession()
    from .rpc import connect

    return connect(rpc=rpc, tracker=tracker, key=key, timeout=min(timeout, 30.0), session_timeout=timeout)


# --------------------------------------------------------------------------------------------------------
# per-PrimFunc library


def lowered_module(meta: dict[str, Any], target: Any, log: Callable[[str], None] = print) -> Any:
    """Rebuild the lowered (fused, scheduled) Relax module of a ``winoq compile`` output.

    Parameters
    ----------
    meta : dict
        ``config.json`` of the output (model, options, config, scales, tune log).
    target : tvm.target.Target

    Raises
    ------
    WinoqError
        If the model cannot be loaded again (a ``.py`` file that moved) or the tune log is unusable.
    """
    from .config import config_from_dict
    from .pipeline import load_model
    from .quant.plan import LayerScales
    from .relax.build import lower, prepare_module

    opts = meta["options"]
    model, x, _ = load_model(meta["model"], meta["input_shape"][-1] if opts.get("input_size") else None)
    cfg = config_from_dict(meta["config"])
    scales = meta.get("scales")
    if scales is not None:
        per_layer = opts.get("scales") == "learned-per-layer"
        scales = (
            {k: LayerScales.from_dict(v) for k, v in scales.items()}
            if per_layer
            else (LayerScales.from_dict(scales))
        )
    database = None
    if meta.get("tune_log"):
        from .tune import read_tune_log

        if Path(meta["tune_log"]).is_dir():
            database = read_tune_log(meta["tune_log"], target)
        else:
            log(f"  tune log {meta['tune_log']} is gone: per-PrimFunc times use the hand schedules")
    mod, _, _ = prepare_module(
        model, x, cfg, scales=scales, keep_params_as_input=opts.get("keep_params", False)
    )
    return lower(mod, target, database=database)


def primfunc_table(mod: Any) -> list[dict[str, Any]]:
    """The PrimFuncs called by ``main`` of a lowered module, in call order.

    Returns
    -------
    list of dict
        ``name``, ``kind`` (``winoq-input`` / ``winoq-gemm`` / ``winoq-output`` or ``op``), ``tuned``,
        ``calls`` (call sites in ``main``) and ``args`` (``(shape, dtype)`` of every buffer parameter).
    """
    from tvm import tirx
    from tvm.tirx.buffer import BufferType

    from .relax.calls import call_tir_sites

    calls: dict[str, int] = {}
    for call in call_tir_sites(mod["main"]):
        calls[call.args[0].name_hint] = calls.get(call.args[0].name_hint, 0) + 1
    rows = []
    for name, count in calls.items():
        func = mod[name]
        if not isinstance(func, tirx.PrimFunc):
            continue
        attrs = func.attrs if func.attrs is not None else {}
        args = []
        for param in func.params:
            if not isinstance(getattr(param, "ty", None), BufferType):  # a scalar parameter
                args = None
                break
            args.append(([int(d) for d in param.shape], str(param.dtype)))
        kind = f"winoq-{attrs['winoq.kernel']}" if "winoq.kernel" in attrs else "op"
        rows.append(
            {"name": name, "kind": kind, "tuned": "winoq.tuned" in attrs, "calls": count, "args": args}
        )
    return rows


def _kernel_library(mod: Any, rows: list[dict[str, Any]], preset: Any, target: Any, folder: Path) -> Path:
    import tvm

    funcs = {
        r["name"]: mod[r["name"]].with_attr("global_symbol", r["name"]) for r in rows if r["args"] is not None
    }
    lib = tvm.compile(tvm.IRModule(funcs), target=target)
    return preset.export_library(lib, folder / "kernels.so")


def _random_args(args: list[tuple[list[int], str]], dev: Any, rng: np.random.Generator) -> list[Any]:
    import tvm

    out = []
    for shape, dtype in args:
        if dtype.startswith(("int", "uint")):
            value = rng.integers(-127 if dtype.startswith("int") else 0, 127, size=shape).astype(dtype)
        elif dtype == "bool":
            value = rng.integers(0, 2, size=shape).astype(bool)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        out.append(tvm.runtime.tensor(value, dev))
    return out


def _time_primfuncs(
    remote: Any, lib_path: Path, rows: list[dict[str, Any]], number: int, repeat: int, min_repeat_ms: int
) -> None:
    remote.upload(str(lib_path), target=lib_path.name)
    lib = remote.load_module(lib_path.name)
    dev = remote.cpu(0)
    rng = np.random.default_rng(0)
    for row in rows:
        if row["args"] is None:
            row["skipped"] = "non-buffer parameters"
            continue
        args = _random_args(row["args"], dev, rng)
        timer = lib.time_evaluator(
            row["name"], dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
        )
        times = [float(t) * 1e3 for t in timer(*args).results]
        row.update(median_ms=float(np.median(times)), min_ms=min(times), times_ms=times)
        row["total_ms"] = row["calls"] * row["median_ms"]


# --------------------------------------------------------------------------------------------------------
# the job


def bench_job(
    out_dir: Path,
    *,
    rpc: str | None = None,
    tracker: str | None = None,
    key: str = "",
    local: bool = False,
    number: int = 5,
    repeat: int = 5,
    min_repeat_ms: int = 0,
    layers: bool = True,
    threads: int | None = None,
    timeout: float = 300.0,
    json_path: Path | None = None,
    emulated: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Benchmark a ``winoq compile`` output folder; print a table and write JSON.

    Parameters
    ----------
    out_dir : Path
        Output folder of ``winoq compile`` (``module.so``, ``module.json``, ``config.json``).
    rpc, tracker, key, local
        Where to run: exactly one of ``rpc="HOST:PORT"`` (RPC server, emulated board),
        ``tracker="HOST:PORT"`` (with ``key``; default the preset's ``rpc_key``) or ``local=True``.
    number, repeat, min_repeat_ms : int
        ``time_evaluator`` settings (after one discarded warm-up run).
    layers : bool
        Also time every PrimFunc (rebuilds the lowered module from ``config.json``).
    threads : int, optional
        Runtime threads on the device (``runtime.config_threadpool``); default: the device's own.
    timeout : float
        Seconds for the whole remote part (the session is killed by the server after it as well): a
        silent or dead device is an error, never a hang.
    json_path : Path, optional
        Result file; default ``out_dir / "bench.json"``.
    emulated : bool, optional
        Override the emulation detection (:func:`detect_emulation`).
    log : callable
        Output.

    Returns
    -------
    dict
        ``module``, ``model``, ``preset``, ``device``, ``emulated``, ``note``, ``end_to_end`` (``median_ms``,
        ``min_ms``, ``times_ms``, ...), ``layers`` (per PrimFunc: ``name``, ``kind``, ``tuned``,
        ``calls``, ``median_ms``, ``min_ms``, ``total_ms``; ``None`` when not measured),
        ``layers_note``, ``sum_layers_ms``.

    Raises
    ------
    WinoqError
        Not a compile output folder.
    ConfigError
        Not exactly one of ``rpc``/``tracker``/``local``, or bad timing settings.
    TargetError
        ``local`` for a module this host cannot run.
    DeviceError
        Unreachable, silent or dead device, unknown tracker key, crash on the device.
    """
    from .pipeline import read_compiled
    from .rpc import _call_with_timeout, _device_error, bench_module
    from .targets import get_preset

    out_dir = Path(out_dir)
    meta = read_compiled(out_dir)
    if [rpc is not None, tracker is not None, bool(local)].count(True) != 1:
        raise ConfigError("bench: give exactly one of --rpc HOST:PORT, --tracker HOST:PORT or --local")
    if number < 1 or repeat < 1 or min_repeat_ms < 0 or timeout <= 0:
        raise ConfigError(
            f"bench: need number, repeat >= 1, min_repeat_ms >= 0, timeout > 0 (got {number}, "
            f"{repeat}, {min_repeat_ms}, {timeout})"
        )
    preset = get_preset(meta["target"])
    if local:
        missing = preset.missing_features()
        if preset.is_cross or missing:
            why = "cross-compiled" if preset.is_cross else "needs " + ", ".join(missing)
            raise TargetError(
                f"bench: {out_dir}/module.so was built for {preset.name} ({why}); run it on that device with "
                "--rpc HOST:PORT or --tracker HOST:PORT --key KEY"
            )
    if tracker is not None and not key:
        key = preset.rpc_key
    target = preset.tvm_target()
    shape = tuple(json.loads((out_dir / "module.json").read_text())["input_shape"])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    _preflight(rpc, tracker, key, min(timeout, 30.0))  # a dead endpoint fails before the rebuild
    rows: list[dict[str, Any]] | None = None
    layers_note = "not measured (--no-layers)"
    tmp = tempfile.TemporaryDirectory(prefix="winoq-bench-")
    lib_path = None
    if layers:
        try:
            log("[bench] rebuilding the lowered module for per-PrimFunc times ...")
            mod = lowered_module(meta, target, log)
            rows = primfunc_table(mod)
            lib_path = _kernel_library(mod, rows, preset, target, Path(tmp.name))
            layers_note = "each PrimFunc rebuilt from config.json and timed alone on random inputs"
        except (WinoqError, OSError) as exc:
            rows, layers_note = None, f"not measured: {exc}"
            log(f"  per-PrimFunc times unavailable: {exc}")

    where = "local" if local else (f"rpc {rpc}" if rpc else f"tracker {tracker} key {key}")
    emu = detect_emulation(preset, rpc, tracker, key, local)
    if emulated is not None:
        emu = {"emulated": emulated, "reason": "given"}

    def remote_part() -> dict[str, Any]:
        remote = _open_session(rpc, tracker, key, local, timeout)
        what = f"benchmarking on {where}"
        try:
            if threads:
                remote.get_function("runtime.config_threadpool")(1, threads)
            e2e = bench_module(
                remote, out_dir / "module.so", [x], number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
            )
            if rows is not None and lib_path is not None:
                _time_primfuncs(remote, lib_path, rows, number, repeat, min_repeat_ms)
        except WinoqError:
            raise
        except Exception as exc:
            raise _device_error(exc, what) from exc
        return e2e

    log(f"[bench] {out_dir}/module.so on {where}" + (" (EMULATED)" if emu["emulated"] else ""))
    try:
        e2e = _call_with_timeout(remote_part, timeout + 30.0, f"benchmarking on {where}")
    finally:
        tmp.cleanup()
    e2e.pop("outputs", None)
    e2e.pop("library", None)
    result: dict[str, Any] = {
        "module": str(out_dir / "module.so"),
        "model": meta["model"],
        "preset": preset.name,
        "device": where,
        "emulated": bool(emu["emulated"]),
        "emulation": emu["reason"],
        "note": EMULATED_NOTE if emu["emulated"] else "",
        "threads": threads,
        "tuned": meta.get("tuned", []),
        "end_to_end": e2e,
        "layers": rows,
        "layers_note": layers_note,
        "sum_layers_ms": sum(r.get("total_ms", 0.0) for r in rows) if rows else None,
    }
    if rows:
        for row in rows:
            row.pop("args", None)
    path = Path(json_path) if json_path is not None else out_dir / "bench.json"
    path.write_text(json.dumps(result, indent=1))
    log(format_bench(result))
    log(f"wrote {path}")
    return result


def format_bench(result: dict[str, Any]) -> str:
    """Plain-text table of :func:`bench_job`'s result (emulated times are labeled as such)."""
    emu = "emulated " if result["emulated"] else ""
    e2e = result["end_to_end"]
    lines = []
    if result["emulated"]:
        lines.append(f"*** {result['note']} ({result['emulation']}) ***")
    lines.append(
        f"{result['model']} [{result['preset']}] on {result['device']}: end to end median "
        f"{e2e['median_ms']:.3f} {emu}ms, min {e2e['min_ms']:.3f} {emu}ms "
        f"({e2e['repeat']} x {e2e['number']} runs)"
    )
    rows = result["layers"]
    if not rows:
        lines.append(f"per PrimFunc: {result['layers_note']}")
        return "\n".join(lines)
    total = result["sum_layers_ms"] or 0.0
    unit = f"{emu}us"
    lines.append(
        f"{'PrimFunc':42s} {'kind':14s} {'calls':>5s} {'median ' + unit:>18s} {'min ' + unit:>16s} "
        f"{'total ' + unit:>18s} {'share':>6s}"
    )
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"{r['name'][:42]:42s} {r['kind']:14s} {r['calls']:5d}  skipped: {r.get('skipped')}")
            continue
        kind = r["kind"] + (" *" if r["tuned"] else "")
        share = 100.0 * r["total_ms"] / total if total else 0.0
        lines.append(
            f"{r['name'][:42]:42s} {kind:14s} {r['calls']:5d} {1e3 * r['median_ms']:18.2f} "
            f"{1e3 * r['min_ms']:16.2f} {1e3 * r['total_ms']:18.2f} {share:5.1f}%"
        )
    lines.append(f"{'sum of PrimFuncs':42s} {'':14s} {'':5s} {'':18s} {'':16s} {1e3 * total:18.2f}")
    over = 1e3 * (e2e["median_ms"] - total)
    lines.append(f"{'VM overhead (end to end - sum)':42s} {'':14s} {'':5s} {'':18s} {'':16s} {over:18.2f}")
    if any(r["tuned"] for r in rows):
        lines.append("* MetaSchedule-tuned schedule (winoq tune)")
    return "\n".join(lines)
