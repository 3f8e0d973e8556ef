"""``winoq tune``: MetaSchedule tuning of a compiled model's PrimFuncs, and applying the result.

The model goes through the same front end as ``winoq compile`` (:func:`tvm_winoq.pipeline.prepare_job`,
:func:`tvm_winoq.relax.build.prepare_module`) and is lowered *without* our hand schedules
(``lower(..., schedule=False)``: legalized, fused, naive TIR).  Every PrimFunc of that fused module is a
task -- our Winograd kernels (``winoq.kernel`` = input / gemm / output) and the remaining fused
operators -- tuned with the XGBoost cost model on the host (``LocalRunner``) or on a device
(``RPCRunner``, direct ``--rpc`` or through a ``--tracker``).

The database lives in ``tune_logs/<preset>/<model>/`` (:func:`tvm_winoq.paths.tune_logs_dir`):

* ``database_workload.json`` / ``database_tuning_record.json`` -- MetaSchedule's ``JSONDatabase``
  (one JSON document per line, appended as each measurement finishes);
* ``tune_meta.json`` -- what was tuned: preset, target, model, and per configuration (tile, group,
  scales, ...) the tasks with their workload hash and trial budget;
* ``logs/`` -- MetaSchedule's per-task logs.

Tuning is resumable: a second run counts the records each task already has and only runs the missing
trials (tasks that finished their budget are skipped); an unterminated last line left by a killed
process is dropped.  ``winoq compile`` applies the log of its preset and model when it exists
(:func:`resolve_tune_log`): tuned PrimFuncs win over the hand schedules.  A corrupt log, or one made
for another target or model, raises :class:`~tvm_winoq.errors.TuneLogError` naming the file.

Worker functions (``_ms_build``, ``_ms_export``, ``_ms_create_session``) run in MetaSchedule's builder
and runner processes; they import nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .errors import ConfigError, TargetError, TuneLogError

__all__ = [
    "TuneLog",
    "apply_database",
    "config_key",
    "find_tune_log",
    "model_key",
    "read_tune_log",
    "resolve_tune_log",
    "tune_job",
    "tune_log_dir",
]

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "tune_meta.json"
META_FORMAT = "tvm-winoq tune log 1"
FAILED_RUN_SECS = 1e9  # MetaSchedule stores failed builds/runs with run_secs = 1e10
TASK_CHOICES = ("all", "winoq", "ops")
_TUNED_ATTR = "winoq.tuned"
_SCHEDULED_ATTR = "tirx.is_scheduled"


# --------------------------------------------------------------------------------------------------------
# naming


def model_key(spec: str) -> str:
    """Folder name of a model under ``tune_logs/<preset>/``: the registered name or the ``.py`` file stem."""
    return Path(spec).stem if spec.endswith(".py") else spec


def config_key(opts: Any) -> str:
    """Stable short id of everything in :class:`~tvm_winoq.pipeline.CompileOptions` that changes kernels."""
    keep = {
        k: getattr(opts, k) for k in ("tile", "group", "scales", "steps", "seed", "input_size", "keep_params")
    }
    keep["layers"] = dict(sorted(dict(opts.layers).items()))
    if keep["scales"] == "standard":  # finetuning settings do not matter then
        keep.pop("steps"), keep.pop("seed")
    text = json.dumps(keep, sort_keys=True)
    return f"f{opts.tile}-g{opts.group}-{opts.scales}-" + hashlib.sha1(text.encode()).hexdigest()[:8]


def tune_log_dir(preset: str, spec: str, writable: bool = False) -> Path:
    """``<tune_logs>/<preset>/<model>/`` (see :func:`tvm_winoq.paths.tune_logs_dir`)."""
    from .paths import tune_logs_dir

    return tune_logs_dir(writable=writable) / preset / model_key(spec)


def find_tune_log(preset: str, spec: str) -> Path | None:
    """The tune log folder of ``preset`` and model ``spec``: the writable location first, then the shipped."""
    seen: list[Path] = []
    for writable in (True, False):
        try:
            path = tune_log_dir(preset, spec, writable=writable)
        except FileNotFoundError:
            continue
        if path not in seen and (path / RECORD_FILE).is_file():
            return path
        seen.append(path)
    return None


# --------------------------------------------------------------------------------------------------------
# reading and validating a log


def _target_key(target: Any) -> dict[str, Any]:
    """What must agree between a log and a build: kind, triple, CPU and features (not the core count)."""
    if not isinstance(target, dict):
        target = dict(target.export())
    attrs = [str(a) for a in target.get("mattr", [])]
    out = {
        "kind": str(target.get("kind", "")),
        "mtriple": str(target.get("mtriple", "")),
        "mcpu": str(target.get("mcpu", "")),
        "mattr": sorted(attrs),
    }
    if "arch" in target:  # GPU targets
        out["arch"] = str(target["arch"])
    return out


def _describe(key: dict[str, Any]) -> str:
    parts = [key["kind"]] + [f"{k}={key[k]}" for k in ("mtriple", "mcpu", "arch") if key.get(k)]
    if key.get("mattr"):
        parts.append("mattr=" + ",".join(key["mattr"]))
    return " ".join(parts)


@dataclass
class TuneLog:
    """A validated ``winoq tune`` database (see :func:`read_tune_log`).

    Attributes
    ----------
    path : Path
        Folder holding the JSON files.
    database : tvm.s_tir.meta_schedule.database.JSONDatabase
        The loaded MetaSchedule database.
    workloads : list of str
        Structural hash of every workload line, in file order.
    records : dict of str to int
        Records (measured trials, failures included) per workload hash.
    failures : dict of str to int
        Failed trials (build or run error, timeout, lost device) per workload hash.
    meta : dict or None
        ``tune_meta.json`` (``None`` for a plain MetaSchedule database).
    expect_match : bool
        Whether applying it to a model that matches none of its workloads is an error (the log
        claims this configuration, or it has no metadata to say what it is for).
    """

    path: Path
    database: Any
    workloads: list[str]
    records: dict[str, int]
    failures: dict[str, int]
    meta: dict[str, Any] | None
    expect_match: bool = True

    @property
    def total_records(self) -> int:
        """Number of tuning records."""
        return sum(self.records.values())

    @property
    def valid_records(self) -> int:
        """Number of tuning records with a measured time (failures excluded)."""
        return self.total_records - sum(self.failures.values())


def _read_lines(path: Path, repair: bool) -> list[tuple[int, Any]]:
    """Parse a JSON-lines file; ``repair`` drops an unterminated (interrupted) last line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TuneLogError(f"{path}: cannot read tune log ({exc.strerror or exc})") from exc
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if not repair:
            lineno = data.count(b"\n") + 1
            raise TuneLogError(
                f"{path}: last line {lineno} is truncated (an interrupted write); "
                "run `winoq tune` again to repair it, or delete the tune log"
            )
        path.write_bytes(data[:cut])
        data = data[:cut]
    out = []
    for lineno, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            out.append((lineno, json.loads(raw)))
        except json.JSONDecodeError as exc:
            raise TuneLogError(f"{path}:{lineno}: corrupt tune log line (not JSON: {exc.msg})") from exc
    return out


def read_tune_log(
    path: str | os.PathLike[str],
    target: Any,
    *,
    model: str | None = None,
    config: str | None = None,
    repair: bool = False,
    allow_missing: bool = False,
) -> TuneLog:
    """Validate and load the tune log in folder ``path`` for a build for ``target``.

    Parameters
    ----------
    path : path-like
        Folder with ``database_workload.json`` / ``database_tuning_record.json`` (and, for logs written
        by ``winoq tune``, ``tune_meta.json``).
    target : tvm.target.Target
        The build target; every record must have been measured for the same kind, triple, CPU and
        features (the core count may differ).
    model : str, optional
        Model spec the log must belong to (checked against ``tune_meta.json``).
    config : str, optional
        :func:`config_key` of the build; sets :attr:`TuneLog.expect_match`.
    repair : bool
        Drop an unterminated last line (left by a killed ``winoq tune``) instead of failing.
    allow_missing : bool
        Create empty files when there are none (for tuning).

    Returns
    -------
    TuneLog

    Raises
    ------
    TuneLogError
        Missing files, a line that is not JSON or not a MetaSchedule record, a record for another
        target, metadata for another model or preset, or a file TVM cannot load.  The message names
        the file (and line).
    """
    from tvm.s_tir import meta_schedule as ms

    folder = Path(path)
    wl_path, rec_path, meta_path = folder / WORKLOAD_FILE, folder / RECORD_FILE, folder / META_FILE
    if allow_missing:
        folder.mkdir(parents=True, exist_ok=True)
        for p in (wl_path, rec_path):
            p.touch()
    for p in (wl_path, rec_path):
        if not p.is_file():
            raise TuneLogError(
                f"{p}: tune log file missing (a tune log folder holds {WORKLOAD_FILE} and {RECORD_FILE})"
            )
    want = _target_key(target)
    meta: dict[str, Any] | None = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
                raise ValueError(f"not a {META_FORMAT!r} file")
            have = meta["target_key"]
        except (ValueError, KeyError, OSError) as exc:
            raise TuneLogError(f"{meta_path}: corrupt tune log metadata ({exc})") from exc
        if have != want:
            raise TuneLogError(
                f"{meta_path}: foreign tune log: tuned for target {_describe(have)} "
                f"(preset {meta.get('preset')!r}), not {_describe(want)}"
            )
        if model is not None and meta.get("model_key") != model_key(model):
            raise TuneLogError(
                f"{meta_path}: foreign tune log: tuned for model {meta.get('model')!r}, not {model!r}"
            )

    workloads: list[str] = []
    for lineno, item in _read_lines(wl_path, repair):
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item)):
            raise TuneLogError(f"{wl_path}:{lineno}: corrupt tune log line (expected [hash, module])")
        workloads.append(item[0])
    records = dict.fromkeys(workloads, 0)
    failures = dict.fromkeys(workloads, 0)
    for lineno, item in _read_lines(rec_path, repair):
        ok = (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], int)
            and isinstance(item[1], list)
            and len(item[1]) == 4
            and isinstance(item[1][2], dict)
        )
        if not ok:
            raise TuneLogError(
                f"{rec_path}:{lineno}: corrupt tune log line (not a MetaSchedule tuning record)"
            )
        index, (_, run_secs, rec_target, _) = item
        if not 0 <= index < len(workloads):
            raise TuneLogError(
                f"{rec_path}:{lineno}: record of workload #{index}, but {wl_path.name} has "
                f"{len(workloads)} workloads (wrong or mixed-up workload file)"
            )
        have = _target_key(rec_target)
        if have != want:
            raise TuneLogError(
                f"{rec_path}:{lineno}: foreign tune log: record measured on target {_describe(have)}, "
                f"not {_describe(want)}"
            )
        shash = workloads[index]
        records[shash] += 1
        if not run_secs or min(float(s) for s in run_secs) >= FAILED_RUN_SECS:
            failures[shash] += 1
    try:
        db = ms.database.JSONDatabase(
            path_workload=str(wl_path), path_tuning_record=str(rec_path), allow_missing=False
        )
    except Exception as exc:  # TVM raises its own error types
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        raise TuneLogError(f"{folder}: TVM cannot load the tune log: {lines[-1] if lines else exc}") from exc
    expect = meta is None or (config is not None and config in meta.get("configs", {}))
    return TuneLog(folder, db, workloads, records, failures, meta, expect_match=expect)


def resolve_tune_log(
    database: str | os.PathLike[str] | bool | None,
    opts: Any,
    spec: str,
    target: Any,
    log: Callable[[str], None] = print,
) -> TuneLog | None:
    """The tune log ``winoq compile`` applies (``None``: hand schedules only).

    Parameters
    ----------
    database : path-like, bool or None
        ``None``/``True``: the log of ``opts.target`` and ``spec`` when it exists; a path: that log
        folder; ``False``: none.
    opts : CompileOptions
        The build options (preset name, configuration).
    spec : str
        Canonical model spec.
    target : tvm.target.Target
        The build target.
    log : callable
        Progress output.

    Raises
    ------
    TuneLogError
        If the log is corrupt or foreign (see :func:`read_tune_log`).
    """
    if database is False:
        return None
    if database is None or database is True:
        from .targets import get_preset

        preset = get_preset(opts.target).name
        path = find_tune_log(preset, spec)
        if path is None:
            log(f"  no tune log for {preset}/{model_key(spec)}: hand schedules only")
            return None
    else:
        path = Path(database)
    tl = read_tune_log(path, target, model=spec, config=config_key(opts))
    log(f"  tune log {tl.path}: {tl.total_records} records, {len(tl.workloads)} workloads")
    return tl


def apply_database(mod: Any, target: Any, database: Any) -> Any:
    """Apply a tune log to a fused module (from ``lower(..., schedule=False)`` or the same passes).

    PrimFuncs with a record get the best schedule (``tirx.is_scheduled`` and ``winoq.tuned`` set, the
    ``winoq.kernel`` attribute kept); the others are returned unchanged.

    Parameters
    ----------
    mod : IRModule
        Fused Relax module.
    target : tvm.target.Target
    database : TuneLog or tvm.s_tir.meta_schedule.database.Database

    Raises
    ------
    TuneLogError
        If ``database`` is a :class:`TuneLog` with ``expect_match`` and records but none of its
        workloads is a PrimFunc of ``mod`` (a log for other kernels: stale, or another model).
    """
    import tvm
    from tvm import relax, tirx

    db = database.database if isinstance(database, TuneLog) else database
    before = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    with target, db, tvm.transform.PassContext(opt_level=3):
        out = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    tuned = []
    for gv, func in list(out.functions.items()):
        old = before.get(gv.name_hint)
        if not isinstance(func, tirx.PrimFunc) or old is None or func.same_as(old):
            continue
        if func.attrs is None or _SCHEDULED_ATTR not in func.attrs:
            continue
        func = func.with_attr(_TUNED_ATTR, True)
        if old.attrs is not None and "winoq.kernel" in old.attrs:
            func = func.with_attr("winoq.kernel", old.attrs["winoq.kernel"])
        out[gv] = func
        tuned.append(gv.name_hint)
    if isinstance(database, TuneLog) and database.expect_match and database.valid_records and not tuned:
        where = database.path / (META_FILE if database.meta is not None else WORKLOAD_FILE)
        raise TuneLogError(
            f"{where}: foreign or stale tune log: none of its {len(database.workloads)} workloads is a "
            "PrimFunc of this model and configuration (tuned with another tvm-winoq/TVM version or model?); "
            "re-run `winoq tune` or delete the log"
        )
    return out


# --------------------------------------------------------------------------------------------------------
# MetaSchedule worker functions (run in builder / runner processes)


def _ms_build(mod: Any, target: Any, params: Any) -> Any:
    """Builder: like MetaSchedule's default build, without importing every tensor intrinsic (~1 min)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    del params
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _ms_export(mod: Any, compiler: str | None = None, options: Sequence[str] = ()) -> str:
    """Builder: export a shared library (cross-compiled for boards, so they need no compiler)."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="winoq-ms-"), "tune_mod.so")
    if compiler:
        from tvm.support import cc

        mod.export_library(path, fcompile=cc.cross_compiler(compiler, options=list(options) or None))
    else:
        mod.export_library(path)
    return path


def _ms_create_session(
    rpc_config: Any, rpc: str | None = None, tracker: str | None = None, key: str = "", timeout: float = 30.0
) -> Any:
    """Runner: open the session with :func:`tvm_winoq.rpc.connect` (fast, clear failures)."""
    from .rpc import connect

    return connect(
        rpc=rpc,
        tracker=tracker,
        key=key,
        timeout=timeout,
        session_timeout=float(rpc_config.session_timeout_sec),
    )


# --------------------------------------------------------------------------------------------------------
# tuning


@dataclass
class _Task:
    name: str
    kind: str
    weight: int
    mod: Any
    workload: str = ""
    done: int = 0
    skipped: str = ""
    dropped_rules: list[str] = field(default_factory=list)
    context: Any = None


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    tmp = folder / f".{META_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / META_FILE)


def _space(rules: list[Any]) -> Any:
    from tvm.s_tir import meta_schedule as ms

    # No RewriteLayout: a rewritten weight layout would not match the constants of the Relax program.
    post = [p for p in ms.Postproc.create("llvm") if type(p).__name__ != "RewriteLayout"]
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=post, mutator_probs="llvm")


def _make_context(task: _Task, target: Any, trials: int, seed: int, logger: Any) -> None:
    """Build the TuneContext; when the design space fails, drop schedule rules until it generates."""
    from tvm.s_tir import meta_schedule as ms

    rules = list(ms.ScheduleRule.create("llvm"))  # generic CPU rules: auto-tensorized spaces do not build
    population = min(512, max(32, 16 * trials))

    def context(rs: list[Any]) -> Any:
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=population, init_min_unmeasured=min(50, population)
        )
        ctx = ms.TuneContext(
            mod=task.mod,
            target=target,
            space_generator=_space(rs),
            search_strategy=strategy,
            task_name=task.name,
            logger=logger,
            rand_state=seed,
            num_threads=1,
        )
        ctx.generate_design_space()
        return ctx

    try:
        task.context = context(rules)
        return
    except Exception as first:  # a schedule rule that fails on this PrimFunc aborts the whole run
        error = first
    order = sorted(range(len(rules)), key=lambda i: type(rules[i]).__name__ != "MultiLevelTiling")
    for i in order:
        try:
            task.context = context([r for j, r in enumerate(rules) if j != i])
            task.dropped_rules = [type(rules[i]).__name__]
            return
        except Exception:  # noqa: BLE001 - try the next rule
            continue
    lines = [ln for ln in str(error).splitlines() if ln.strip()]
    task.skipped = "no design space: " + (lines[-1] if lines else type(error).__name__)


def _runner(preset: Any, rpc: str | None, tracker: str | None, key: str, timeout: float) -> Any:
    from tvm.s_tir import meta_schedule as ms

    if rpc is None and tracker is None:
        return ms.runner.LocalRunner(
            timeout_sec=timeout,
            evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50),
        )
    from .rpc import parse_address

    host, port = parse_address(rpc or tracker or "", "rpc" if rpc else "tracker")
    cfg = ms.runner.RPCConfig(
        tracker_host=host,
        tracker_port=port,
        tracker_key=key or preset.rpc_key,
        session_timeout_sec=int(timeout),
    )
    return ms.runner.RPCRunner(
        rpc_config=cfg,
        evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=0),
        f_create_session=partial(
            _ms_create_session, rpc=rpc, tracker=tracker, key=key, timeout=min(30.0, timeout)
        ),
        max_workers=1,
    )


def _check_device(preset: Any, rpc: str | None, tracker: str | None, key: str, timeout: float) -> str:
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
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tune every PrimFunc of a model for a preset; resumable (see the module docstring).

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
    log : callable
        Progress output.

    Returns
    -------
    dict
        ``log_dir``, ``preset``, ``model``, ``config``, ``device``, ``trials``, ``seconds``,
        ``records`` (total) and ``tasks``: per task ``name``, ``kind`` (``input``/``gemm``/``output``
        for our kernels, ``op`` otherwise), ``weight``, ``records``, ``failed``, ``best_ms``,
        ``status`` (``tuned``, ``skipped: ...``), ``dropped_rules``.

    Raises
    ------
    ConfigError, TargetError
        Bad options, or a preset that cannot run here without ``--rpc``/``--tracker``.
    DeviceError
        The device cannot be reached (checked before tuning starts).
    TuneLogError
        The existing log is corrupt or foreign.
    """
    from tvm import tirx
    from tvm.s_tir import meta_schedule as ms

    from .pipeline import prepare_job
    from .relax.build import lower, prepare_module
    from .targets import get_preset

    t0 = time.time()
    if trials < 1:
        raise ConfigError(f"tune: --trials must be >= 1, got {trials}")
    if timeout <= 0:
        raise ConfigError(f"tune: --timeout must be > 0, got {timeout}")
    preset = get_preset(opts.target)
    target = preset.tvm_target()
    which = tasks
    if which not in TASK_CHOICES:
        raise ConfigError(f"tune: --tasks must be one of {TASK_CHOICES}, got {which!r}")
    device = _check_device(preset, rpc, tracker, key, timeout)
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
    cfg_key = config_key(opts)
    tl = read_tune_log(folder, target, model=job.spec, repair=True, allow_missing=True)
    meta = tl.meta or {
        "format": META_FORMAT,
        "preset": preset.name,
        "target": str(target),
        "target_key": _target_key(target),
        "model": job.spec,
        "model_key": model_key(job.spec),
        "configs": {},
    }
    import tvm

    meta["tvm"] = tvm.__version__
    with _phase_log("extract", log):
        mod, _, _ = prepare_module(
            job.model, job.example_input, job.cfg, scales=job.scales, keep_params_as_input=opts.keep_params
        )
        fused = lower(mod, target, schedule=False)
        kinds = {
            gv.name_hint: str(f.attrs["winoq.kernel"])
            for gv, f in fused.functions.items()
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None and "winoq.kernel" in f.attrs
        }
        extracted = ms.relax_integration.extract_tasks(fused, target)
        tasks = [
            _Task(t.task_name, kinds.get(t.task_name, "op"), int(t.weight), t.dispatched[0])
            for t in extracted
            if which == "all" or (which == "winoq") == (t.task_name in kinds)
        ]
        log(f"  {len(tasks)} tasks ({sum(t.kind != 'op' for t in tasks)} Winograd kernels) -> {folder}")
    db = tl.database
    conf = meta["configs"].setdefault(cfg_key, {"options": asdict(opts), "tasks": {}})
    for task in tasks:
        task.workload = str(db.commit_workload(task.mod).as_json()[0])
        task.done = tl.records.get(task.workload, 0)
        entry = conf["tasks"].get(task.name, {})
        if entry.get("workload") == task.workload and entry.get("complete", 0) >= trials:
            task.skipped = "done"  # finished its budget before (the search may stop short of it)
        elif task.done >= trials:
            task.skipped = "done"
        conf["tasks"][task.name] = {
            "workload": task.workload,
            "kind": task.kind,
            "weight": task.weight,
            "complete": entry.get("complete", 0) if entry.get("workload") == task.workload else 0,
        }
    _write_meta(folder, meta)
    todo = [t for t in tasks if not t.skipped]
    resumed = sum(1 for t in tasks if t.done and t.skipped != "done")
    log(f"  {len(tasks) - len(todo)} tasks already done, {resumed} resumed, device: {device}")
    if todo:
        import logging

        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        if ms_logger.level == logging.NOTSET:
            ms_logger.setLevel(logging.INFO)  # console: progress tables; logs/: everything (DEBUG)
        loggers = ms.logging.get_loggers_from_work_dir(str(folder), [t.name for t in todo])
        with _phase_log("design spaces", log):
            for i, (task, logger) in enumerate(zip(todo, loggers, strict=True)):
                _make_context(task, target, trials, seed + i, logger)
                if task.dropped_rules:
                    log(f"  {task.name}: schedule rule {task.dropped_rules[0]} fails on it; tuned without")
                elif task.skipped:
                    log(f"  {task.name}: skipped ({task.skipped})")
        todo = [t for t in todo if not t.skipped]
    builder = None
    runner = None
    groups: dict[int, list[_Task]] = {}
    for task in todo:
        groups.setdefault(trials - task.done, []).append(task)
    try:
        for remaining, group in sorted(groups.items(), reverse=True):
            if builder is None:
                builder = ms.builder.LocalBuilder(
                    max_workers=max(1, (os.cpu_count() or 2) // 2),
                    timeout_sec=max(180.0, timeout),
                    f_build=_ms_build,
                    f_export=partial(
                        _ms_export, compiler=preset.cross_compiler, options=preset.cross_options
                    ),
                )
                runner = _runner(preset, rpc, tracker, key, timeout)
            per_iter = min(remaining, trials_per_iter or 16)
            log(f"[tune] {len(group)} tasks x {remaining} trials ({per_iter} per round) ...")
            ms.tune_tasks(
                tasks=[t.context for t in group],
                task_weights=[float(t.weight) for t in group],
                work_dir=str(folder),
                max_trials_global=remaining * len(group),
                max_trials_per_task=remaining,
                num_trials_per_iter=per_iter,
                builder=builder,
                runner=runner,
                database=db,
                cost_model=ms.cost_model.XGBModel(num_tuning_cores=1),
                task_scheduler="round-robin",
            )
            for task in group:
                conf["tasks"][task.name]["complete"] = trials
            _write_meta(folder, meta)
    except KeyboardInterrupt:
        kept = read_tune_log(folder, target, repair=True)
        log(
            f"winoq tune: interrupted; {kept.total_records} records kept in {folder} "
            "(run the same command again to continue)"
        )
        raise
    final = read_tune_log(folder, target, model=job.spec, config=cfg_key, repair=True)
    rows = []
    for task in tasks:
        best = None
        if final.records.get(task.workload, 0) > final.failures.get(task.workload, 0):
            top = final.database.get_top_k(final.database.commit_workload(task.mod), 1)
            if top:
                best = 1e3 * float(sum(float(s) for s in top[0].run_secs) / len(top[0].run_secs))
        status = "tuned" if task.skipped in ("", "done") else f"skipped: {task.skipped}"
        rows.append(
            {
                "name": task.name,
                "kind": task.kind,
                "weight": task.weight,
                "records": final.records.get(task.workload, 0),
                "failed": final.failures.get(task.workload, 0),
                "best_ms": best,
                "status": status,
                "dropped_rules": task.dropped_rules,
            }
        )
    result = {
        "log_dir": str(folder),
        "preset": preset.name,
        "model": job.spec,
        "config": cfg_key,
        "device": device,
        "emulated": bool(emulation["emulated"]),
        "emulation": emulation["reason"],
        "trials": trials,
        "seconds": time.time() - t0,
        "records": final.total_records,
        "tasks": rows,
    }
    log(format_tune_table(result))
    return result


def format_tune_table(result: dict[str, Any]) -> str:
    """Plain-text table of :func:`tune_job`'s result."""
    emu = result.get("emulated", False)
    lines = (
        [f"*** EMULATED device ({result['emulation']}): the times below are not performance ***"]
        if emu
        else []
    )
    best_head = "best emulated ms" if emu else "best ms"
    lines.append(
        f"{'task':40s} {'kind':6s} {'calls':>5s} {'trials':>6s} {'failed':>6s} {best_head:>16s}  status"
    )
    for r in result["tasks"]:
        best = f"{r['best_ms']:.4f}" if r["best_ms"] is not None else "-"
        lines.append(
            f"{r['name'][:40]:40s} {r['kind']:6s} {r['weight']:5d} {r['records']:6d} {r['failed']:6d} "
            f"{best:>16s}  {r['status']}"
        )
    lines.append(
        f"{result['records']} records in {result['log_dir']} ({result['seconds']:.0f} s); "
        f"`winoq compile {result['model']} --target {result['preset']}` applies them"
    )
    return "\n".join(lines)


class _phase_log:  # noqa: N801 - used like a function
    def __init__(self, name: str, log: Callable[[str], None]) -> None:
        self.name, self.log = name, log

    def __enter__(self) -> None:
        self.t0 = time.time()
        self.log(f"[{self.name}] ...")

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.log(f"[{self.name}] done in {time.time() - self.t0:.1f} s")
