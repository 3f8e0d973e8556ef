"""``winoq tune``: MetaSchedule tuning of a compiled model's PrimFuncs (resumable).

The model goes through the same front end as ``winoq compile`` (:func:`tvm_winoq.pipeline.prepare_job`,
:func:`tvm_winoq.relax.build.prepare_module`) and is lowered *without* our hand schedules
(``lower(..., schedule=False)``: legalized, fused, naive TIR).  Every PrimFunc of that fused module is a
task -- our Winograd kernels (``winoq.kernel`` = input / gemm / output) and the remaining fused
operators -- tuned with the XGBoost cost model on the host (``LocalRunner``) or on a device
(``RPCRunner``, direct ``--rpc`` or through a ``--tracker``); see :mod:`tvm_winoq.tune_ms`.

The database lives in ``tune_logs/<preset>/<model>/`` (format, validation and how ``winoq compile``
applies it: :mod:`tvm_winoq.tune_log`, whose public names are importable from here as well).

Tuning is resumable: a second run counts the records each task already has and only runs the missing
trials (tasks that finished their budget are skipped); an unterminated last line left by a killed
process is dropped.  Ctrl-C stops after the current batch (its records are kept; a second Ctrl-C
stops at once).  A trial whose build or run fails -- a timeout, a crash, an RPC device that went away --
is recorded as failed and tuning goes on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import ConfigError, TargetError
from .tune_log import (
    FAILED_RUN_SECS,
    META_FILE,
    META_FORMAT,
    RECORD_FILE,
    WORKLOAD_FILE,
    TuneLog,
    apply_database,
    config_key,
    find_tune_log,
    model_key,
    read_tune_log,
    resolve_tune_log,
    target_key,
    tune_log_dir,
)
from .tune_ms import (
    Interrupt,
    Task,
    make_builder,
    make_context,
    make_runner,
    measure_hand_schedules,
    stop_callback,
    verify_against_hand,
)

__all__ = [
    "FAILED_RUN_SECS",
    "META_FILE",
    "META_FORMAT",
    "RECORD_FILE",
    "TASK_CHOICES",
    "WORKLOAD_FILE",
    "TuneLog",
    "apply_database",
    "config_key",
    "find_tune_log",
    "format_tune_table",
    "model_key",
    "read_tune_log",
    "resolve_tune_log",
    "tune_job",
    "tune_log_dir",
]

TASK_CHOICES = ("all", "winoq", "ops")
_target_key = target_key  # the name the tests and older code use


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Write ``tune_meta.json`` atomically (a temporary file renamed over the old one)."""
    tmp = folder / f".{META_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / META_FILE)


def _check_device(preset: Any, rpc: str | None, tracker: str | None, key: str, timeout: float) -> str:
    """Validate where trials run and reach the device once (a clear error before any work)."""
    if rpc is not None and tracker is not None:
        raise ConfigError("tune: give at most one of --rpc and --tracker")
    if tracker is not None and not key:
        raise ConfigError("tune: --tracker needs --key (the device key, e.g. rpi5)")
    if rpc is None and tracker is None:
        if preset.is_cross or preset.missing_features():
            raise TargetError(
                f"tune: preset {preset.name!r} does not run on this host; measure on the device with "
                "--rpc HOST:PORT or --tracker HOST:PORT --key KEY"
            )
        return "host (LocalRunner)"
    from .rpc import connect

    remote = connect(rpc=rpc, tracker=tracker, key=key, timeout=min(30.0, timeout))  # fail fast, clearly
    del remote
    return f"RPC {rpc}" if rpc else f"tracker {tracker} key {key}"


def _extract_tasks(job: Any, opts: Any, target: Any, which: str) -> list[Task]:
    """The PrimFuncs of the fused, unscheduled model as tasks (``which``: all / winoq / ops)."""
    from tvm import tirx
    from tvm.s_tir import meta_schedule as ms

    from .relax.build import lower, prepare_module

    mod, _, _ = prepare_module(
        job.model, job.example_input, job.cfg, scales=job.scales, keep_params_as_input=opts.keep_params
    )
    fused = lower(mod, target, schedule=False)
    kinds = {
        gv.name_hint: str(f.attrs["winoq.kernel"])
        for gv, f in fused.functions.items()
        if isinstance(f, tirx.PrimFunc) and f.attrs is not None and "winoq.kernel" in f.attrs
    }
    return [
        Task(t.task_name, kinds.get(t.task_name, "op"), int(t.weight), t.dispatched[0])
        for t in ms.relax_integration.extract_tasks(fused, target)
        if which == "all" or (which == "winoq") == (t.task_name in kinds)
    ]


def _heaviest(tasks: list[Task], top: int) -> list[Task]:
    """The ``top`` tasks with the most estimated FLOPs per model run (calls x FLOPs of one call)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    def cost(task: Task) -> float:
        try:
            return task.weight * float(estimate_tir_flops(task.mod))
        except Exception:  # noqa: BLE001 - a PrimFunc TVM cannot estimate counts as cheap
            return 0.0

    return sorted(tasks, key=cost, reverse=True)[:top]


def _plan(tasks: list[Task], tl: TuneLog, conf: dict[str, Any], trials: int) -> None:
    """Key every task in the database; mark the ones that finished ``trials`` before as done."""
    db = tl.database
    for task in tasks:
        task.workload = str(db.commit_workload(task.mod).as_json()[0])
        task.done = tl.records.get(task.workload, 0)
        entry = conf["tasks"].get(task.name, {})
        same = entry.get("workload") == task.workload
        if (same and entry.get("complete", 0) >= trials) or task.done >= trials:
            task.skipped = "done"  # finished its budget before (the search may stop short of it)
        conf["tasks"][task.name] = {
            "workload": task.workload,
            "kind": task.kind,
            "weight": task.weight,
            "complete": entry.get("complete", 0) if same else 0,
        }


def _search(
    todo: list[Task],
    *,
    folder: Path,
    meta: dict[str, Any],
    conf: dict[str, Any],
    database: Any,
    trials: int,
    trials_per_iter: int | None,
    builder: Any,
    runner: Any,
    log: Callable[[str], None],
) -> None:
    """Run the searches (tasks missing the same number of trials together); Ctrl-C: KeyboardInterrupt."""
    from tvm.s_tir import meta_schedule as ms

    groups: dict[int, list[Task]] = {}
    for task in todo:
        groups.setdefault(trials - task.done, []).append(task)
    stop = Interrupt()
    for remaining, group in sorted(groups.items(), reverse=True):
        per_iter = min(remaining, trials_per_iter or 16)
        log(f"[tune] {len(group)} tasks x {remaining} trials ({per_iter} per round) ...")
        with stop:
            try:
                ms.tune_tasks(
                    tasks=[t.context for t in group],
                    task_weights=[float(t.weight) for t in group],
                    work_dir=str(folder),
                    max_trials_global=remaining * len(group),
                    max_trials_per_task=remaining,
                    num_trials_per_iter=per_iter,
                    builder=builder,
                    runner=runner,
                    database=database,
                    cost_model=ms.cost_model.XGBModel(num_tuning_cores=1),
                    measure_callbacks=[*ms.MeasureCallback.create("default"), stop_callback(stop.flag)],
                    task_scheduler="round-robin",
                )
            except Exception:
                if stop.flag.is_set():  # our callback stopped the C++ loop (as some TVM error type)
                    raise KeyboardInterrupt from None
                raise
            if stop.flag.is_set():
                raise KeyboardInterrupt
        for task in group:
            conf["tasks"][task.name]["complete"] = trials
        write_meta(folder, meta)


def _rows(tasks: list[Task], final: TuneLog) -> list[dict[str, Any]]:
    """Per task: records, failures, the best measured time in ``final`` and the hand schedule's."""
    baselines = (final.meta or {}).get("baselines", {})
    verified = (final.meta or {}).get("verified", {})
    rows = []
    for task in tasks:
        best = None
        if final.records.get(task.workload, 0) > final.failures.get(task.workload, 0):
            top = final.database.get_top_k(final.database.commit_workload(task.mod), 1)
            if top:
                best = 1e3 * float(sum(float(s) for s in top[0].run_secs) / len(top[0].run_secs))
        hand, tuned = baselines.get(task.workload), verified.get(task.workload, best)
        status = "tuned" if task.skipped in ("", "done") else f"skipped: {task.skipped}"
        if status == "tuned" and best is None and final.records.get(task.workload, 0) > 0:
            status = "every trial failed (see logs/)"
        if status == "tuned" and tuned is not None and hand is not None and tuned >= hand:
            status = "tuned, hand schedule faster (kept)"
        rows.append(
            {
                "name": task.name,
                "kind": task.kind,
                "weight": task.weight,
                "records": final.records.get(task.workload, 0),
                "failed": final.failures.get(task.workload, 0),
                "best_ms": best,
                "tuned_ms": tuned,
                "hand_ms": hand,
                "status": status,
                "dropped_rules": task.dropped_rules,
            }
        )
    return rows


def tune_job(
    opts: Any,
    trials: int,
    *,
    rpc: str | None = None,
    tracker: str | None = None,
    key: str = "",
    timeout: float = 120.0,
    log_dir: str | os.PathLike[str] | None = None,
    trials_per_iter: int | None = None,
    seed: int = 0,
    tasks: str = "all",
    top: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tune the PrimFuncs of a model for a preset; resumable (see the module docstring).

    Parameters
    ----------
    opts : CompileOptions
        Model, preset (``opts.target``) and configuration, as for ``winoq compile``.
    trials : int
        Measured trials per task (PrimFunc).
    rpc, tracker, key : str, optional
        Measure on a device: ``rpc="HOST:PORT"`` (RPC server / emulated board) or
        ``tracker="HOST:PORT"`` with ``key``.  Default: on this host (the preset must run here).
    timeout : float
        Seconds per build and per measurement (RPC session); a trial over it is recorded as failed.
    log_dir : path-like, optional
        Database folder (default ``tune_logs/<preset>/<model>/``).
    trials_per_iter : int, optional
        Candidates measured per task and search round (default ``min(trials, 16)``).
    seed : int
        Search seed.
    tasks : str
        ``all`` PrimFuncs, only our Winograd kernels (``winoq``), or only the other operators (``ops``).
    top : int, optional
        Of those, only the ``top`` tasks with the most estimated FLOPs per model run (a budget for
        big models: the heaviest PrimFuncs dominate the run time).
    log : callable
        Progress output.

    Returns
    -------
    dict
        ``log_dir``, ``preset``, ``model``, ``config``, ``device``, ``emulated``, ``emulation``,
        ``trials``, ``seconds``, ``records`` (total) and ``tasks``: per task ``name``, ``kind``
        (``input``/``gemm``/``output`` for our kernels, ``op`` otherwise), ``weight``, ``records``,
        ``failed``, ``best_ms``, ``status`` (``tuned``, ``skipped: ...``), ``dropped_rules``.

    Raises
    ------
    ConfigError, TargetError
        Bad options, or a preset that cannot run here without ``--rpc``/``--tracker``.
    DeviceError
        The device cannot be reached (checked before tuning starts).
    TuneLogError
        The existing log is corrupt or foreign.
    KeyboardInterrupt
        Ctrl-C; the records measured so far are kept.
    """
    import tvm

    from .pipeline import _phase, prepare_job
    from .targets import get_preset

    t0 = time.time()
    if trials < 1:
        raise ConfigError(f"tune: --trials must be >= 1, got {trials}")
    if timeout <= 0:
        raise ConfigError(f"tune: --timeout must be > 0, got {timeout}")
    if trials_per_iter is not None and trials_per_iter < 1:
        raise ConfigError(f"tune: --trials-per-iter must be >= 1, got {trials_per_iter}")
    if tasks not in TASK_CHOICES:
        raise ConfigError(f"tune: --tasks must be one of {TASK_CHOICES}, got {tasks!r}")
    if top is not None and top < 1:
        raise ConfigError(f"tune: --top must be >= 1, got {top}")
    preset = get_preset(opts.target)
    target = preset.tvm_target()
    device = _check_device(preset, rpc, tracker, key, timeout)
    if importlib.util.find_spec("psutil") is None:
        log(
            "  warning: psutil is not installed; TVM's MetaSchedule runner fails every trial without it "
            "(pip install psutil)"
        )
    emulation = {"emulated": False, "reason": "this host"}
    if rpc is not None or tracker is not None:
        from .bench import detect_emulation

        emulation = detect_emulation(preset, rpc, tracker, key)
        if emulation["emulated"]:
            log(
                f"  NOTE: {emulation['reason']}: the device is EMULATED; tuning optimizes qemu's speed, not "
                "the board's; use it to test the flow only"
            )
    job = prepare_job(opts, log)
    folder = Path(log_dir) if log_dir is not None else tune_log_dir(preset.name, job.spec, writable=True)
    if (folder / RECORD_FILE).is_file():  # a corrupt or foreign log fails before the extraction
        read_tune_log(folder, target, model=job.spec, repair=True)
    cfg_key = config_key(opts)
    with _phase("extract", log):
        todo = _extract_tasks(job, opts, target, tasks)
        if top is not None and top < len(todo):
            log(f"  the {top} of {len(todo)} tasks with the most FLOPs per run: --top {top}")
            todo = _heaviest(todo, top)
            log("  " + ", ".join(t.name for t in todo))
    log(f"  {len(todo)} tasks ({sum(t.kind != 'op' for t in todo)} Winograd kernels) -> {folder}")
    tl = read_tune_log(folder, target, model=job.spec, repair=True, allow_missing=True)
    meta = tl.meta or {
        "format": META_FORMAT,
        "preset": preset.name,
        "target": str(target),
        "target_key": target_key(target),
        "model": job.spec,
        "model_key": model_key(job.spec),
        "configs": {},
    }
    meta["tvm"] = tvm.__version__
    conf = meta["configs"].setdefault(cfg_key, {"options": asdict(opts), "tasks": {}})
    all_tasks = list(todo)
    _plan(all_tasks, tl, conf, trials)
    write_meta(folder, meta)
    todo = [t for t in all_tasks if not t.skipped]
    resumed = sum(1 for t in todo if t.done)
    log(f"  {len(all_tasks) - len(todo)} tasks already done, {resumed} resumed, device: {device}")
    if todo:
        from tvm.s_tir import meta_schedule as ms

        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        if ms_logger.level == logging.NOTSET:
            ms_logger.setLevel(logging.INFO)  # console: progress tables; logs/: everything (DEBUG)
        loggers = ms.logging.get_loggers_from_work_dir(str(folder), [t.name for t in todo])
        with _phase("design spaces", log):
            for i, (task, logger) in enumerate(zip(todo, loggers, strict=True)):
                make_context(task, target, trials, seed + i, logger)
                if task.dropped_rules:
                    log(f"  {task.name}: schedule rule {task.dropped_rules[0]} fails on it; tuned without")
                elif task.skipped:
                    log(f"  {task.name}: skipped ({task.skipped})")
        todo = [t for t in todo if not t.skipped]
    builder = make_builder(preset, timeout)
    runner = make_runner(preset, rpc, tracker, key, timeout)
    baselines = meta.setdefault("baselines", {})
    fresh = [t for t in all_tasks if t.workload not in baselines]
    if fresh:
        with _phase("hand schedules", log):
            baselines.update(measure_hand_schedules(fresh, target, builder, runner))
            write_meta(folder, meta)
            log(f"  timed the hand schedule of {len(fresh)} tasks (a tuned schedule must beat it)")
    if todo:
        try:
            _search(
                todo,
                folder=folder,
                meta=meta,
                conf=conf,
                database=tl.database,
                trials=trials,
                trials_per_iter=trials_per_iter,
                builder=builder,
                runner=runner,
                log=log,
            )
        except KeyboardInterrupt:
            kept = read_tune_log(folder, target, repair=True)
            log(
                f"winoq tune: interrupted; {kept.total_records} records kept in {folder} "
                "(run the same command again to continue)"
            )
            raise
    final = read_tune_log(folder, target, model=job.spec, config=cfg_key, repair=True)
    verified = meta.setdefault("verified", {})
    recheck = [
        t
        for t in all_tasks
        if final.records.get(t.workload, 0) > final.failures.get(t.workload, 0)
        and (not t.skipped or t.workload not in verified)  # tuned now, or never re-timed
    ]
    if recheck:
        with _phase("verify", log):
            found = verify_against_hand(recheck, final.database, target, builder, runner)
            for wl, (hand, tuned) in found.items():
                if hand is not None:
                    baselines[wl] = hand
                verified[wl] = tuned
            write_meta(folder, meta)
            final.meta = meta
            log(f"  re-timed the best tuned and the hand schedule of {len(found)} tasks, alternately")
    result = {
        "log_dir": str(folder),
        "default_dir": log_dir is None,
        "preset": preset.name,
        "model": job.spec,
        "config": cfg_key,
        "device": device,
        "emulated": bool(emulation["emulated"]),
        "emulation": emulation["reason"],
        "trials": trials,
        "seconds": time.time() - t0,
        "records": final.total_records,
        "tasks": _rows(all_tasks, final),
    }
    log(format_tune_table(result))
    return result


def format_tune_table(result: dict[str, Any]) -> str:
    """Plain-text table of :func:`tune_job`'s result (emulated times are labeled as such).

    Parameters
    ----------
    result : dict
        What :func:`tune_job` returned.

    Returns
    -------
    str
    """
    emu = result.get("emulated", False)
    lines = (
        [f"*** EMULATED device ({result['emulation']}): the times below are not performance ***"]
        if emu
        else []
    )
    unit = "emulated ms" if emu else "ms"
    lines.append(
        f"{'task':40s} {'kind':6s} {'calls':>5s} {'trials':>6s} {'failed':>6s} {'best trial':>12s} "
        f"{'tuned ' + unit:>17s} {'hand ' + unit:>16s}  status"
    )

    def ms(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "-"

    for r in result["tasks"]:
        lines.append(
            f"{r['name'][:40]:40s} {r['kind']:6s} {r['weight']:5d} {r['records']:6d} {r['failed']:6d} "
            f"{ms(r['best_ms']):>12s} {ms(r.get('tuned_ms')):>17s} {ms(r.get('hand_ms')):>16s}  {r['status']}"
        )
    how = f"winoq compile {result['model']} --target {result['preset']}"
    if not result.get("default_dir", True):
        how += f" --tune-log {result['log_dir']}"
    took = f"{result['records']} records in {result['log_dir']} ({result['seconds']:.0f} s)"
    lines.append(f"{took}; `{how}` with the same model options applies them")
    return "\n".join(lines)
