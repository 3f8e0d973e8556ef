"""Tune logs: where ``winoq tune`` keeps its MetaSchedule database, reading and validating it, applying it.

A tune log is the folder ``tune_logs/<preset>/<model>/`` (:func:`tune_log_dir`; the model is its
registered name or the ``.py`` file stem) holding

* ``database_workload.json`` / ``database_tuning_record.json`` -- MetaSchedule's ``JSONDatabase``
  (one JSON document per line, appended as each measurement finishes);
* ``tune_meta.json`` -- what was tuned: preset, target, model, and per configuration
  (:func:`config_key`: tile, group, scales, ...) the tasks with their workload hash and trial budget;
* ``logs/`` -- MetaSchedule's per-task logs (not needed to apply the log).

``winoq compile`` applies the log of its preset and model when it exists (:func:`resolve_tune_log`,
then :func:`apply_database` inside :func:`tvm_winoq.relax.build.lower`): tuned PrimFuncs win over the
hand schedules.  Nothing is applied silently from a bad log: a line that is not JSON or not a
MetaSchedule record, a truncated last line, records measured for another target (kind, triple, CPU or
features), metadata for another preset or model, or a log claiming this configuration whose workloads
match none of the model's PrimFuncs raise :class:`~tvm_winoq.errors.TuneLogError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TuneLogError

__all__ = [
    "META_FILE",
    "META_FORMAT",
    "RECORD_FILE",
    "WORKLOAD_FILE",
    "TuneLog",
    "apply_database",
    "config_key",
    "find_tune_log",
    "model_key",
    "read_tune_log",
    "resolve_tune_log",
    "target_key",
    "tune_log_dir",
]

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "tune_meta.json"
META_FORMAT = "tvm-winoq tune log 1"
FAILED_RUN_SECS = 1e9  # MetaSchedule stores failed builds/runs with run_secs = 1e10

_TUNED_ATTR = "winoq.tuned"
_SCHEDULED_ATTR = "tirx.is_scheduled"


# --------------------------------------------------------------------------------------------------------
# naming


def model_key(spec: str) -> str:
    """Folder name of model ``spec`` under ``tune_logs/<preset>/``: a registered name (``craft``) itself, the
    stem of a ``.py`` model file (``path/net.py`` -> ``net``)."""
    return Path(spec).stem if spec.endswith(".py") else spec


def config_key(opts: Any) -> str:
    """Stable short id of everything in :class:`~tvm_winoq.pipeline.CompileOptions` that changes kernels.

    The preset and model are not part of it (they name the folder); the finetuning settings are left
    out for standard scales.

    Parameters
    ----------
    opts : CompileOptions

    Returns
    -------
    str
        ``f<tile>-g<group>-<scales>-<8 hex digits>``, e.g. ``f4-g32-learned-1a2b3c4d``.
    """
    keep = {
        k: getattr(opts, k) for k in ("tile", "group", "scales", "steps", "seed", "input_size", "keep_params")
    }
    keep["layers"] = dict(sorted(dict(opts.layers).items()))
    if opts.ineligible != "float":  # only then: keys of earlier logs stay valid
        keep["ineligible"] = opts.ineligible
    if keep["scales"] == "standard":  # finetuning settings do not matter then
        keep.pop("steps"), keep.pop("seed")
    text = json.dumps(keep, sort_keys=True)
    return f"f{opts.tile}-g{opts.group}-{opts.scales}-" + hashlib.sha1(text.encode()).hexdigest()[:8]


def tune_log_dir(preset: str, spec: str, writable: bool = False) -> Path:
    """``<tune_logs>/<preset>/<model>/`` (see :func:`tvm_winoq.paths.tune_logs_dir`).

    Parameters
    ----------
    preset : str
        Canonical preset name (``host-avx2``).
    spec : str
        Model spec (see :func:`model_key`).
    writable : bool
        The first writable ``tune_logs`` location (for tuning) instead of the first existing one.
        ``WINOQ_TUNE_LOGS_DIR`` is created when it is set and missing.

    Raises
    ------
    FileNotFoundError
        Without ``writable``, when no ``tune_logs`` folder exists.
    """
    from .paths import tune_logs_dir

    env = os.environ.get("WINOQ_TUNE_LOGS_DIR")
    if writable and env:  # an explicitly chosen location: create it rather than fall back elsewhere
        Path(env).mkdir(parents=True, exist_ok=True)
    return tune_logs_dir(writable=writable) / preset / model_key(spec)


def find_tune_log(preset: str, spec: str) -> Path | None:
    """The tune log folder (holding a tuning-record file) of ``preset`` and model ``spec``, or ``None``.

    The writable location (where ``winoq tune`` writes) is looked at first, then the shipped one
    (``tune_logs/`` of the checkout, or of the installed package).
    """
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


def target_key(target: Any) -> dict[str, Any]:
    """What must agree between a log and a build: kind, triple, CPU and features (not the core count).

    Parameters
    ----------
    target : tvm.target.Target or dict
        A target, or its exported form (as stored in a tuning record).

    Returns
    -------
    dict
        ``kind``, ``mtriple``, ``mcpu``, sorted ``mattr`` (and ``arch`` for GPU targets).
    """
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
    kept_hand : list of str
        Set by :func:`apply_database`: PrimFuncs with records that kept their hand schedule because it
        measured faster than the best tuned record.
    """

    path: Path
    database: Any
    workloads: list[str]
    records: dict[str, int]
    failures: dict[str, int]
    meta: dict[str, Any] | None
    expect_match: bool = True
    kept_hand: list[str] = field(default_factory=list)

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
    want = target_key(target)
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
        have = target_key(rec_target)
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
    ``winoq.kernel`` attribute kept); the others are returned unchanged.  When the log's metadata has
    the measured time of the hand schedule of a workload (``baselines``, written by ``winoq tune``) and
    the best tuned schedule is not faster (``verified``: both re-timed alternately at the end of the
    tuning; else the best record's time), the PrimFunc is left to the hand schedule; their names are
    in :attr:`TuneLog.kept_hand`.

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
    meta = (database.meta or {}) if isinstance(database, TuneLog) else {}
    baselines, verified = meta.get("baselines", {}), meta.get("verified", {})
    before = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    with target, db, tvm.transform.PassContext(opt_level=3):
        out = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    tuned, kept = [], []
    for gv, func in list(out.functions.items()):
        old = before.get(gv.name_hint)
        if not isinstance(func, tirx.PrimFunc) or old is None or func.same_as(old):
            continue
        if func.attrs is None or _SCHEDULED_ATTR not in func.attrs:
            continue
        workload = _workload_of(db, old) if baselines else None
        hand = baselines.get(workload or "")
        best = verified.get(workload or "") or (_best_ms(db, old) if hand is not None else None)
        if hand is not None and best is not None and best >= hand:
            out[gv] = old  # the hand schedule measured faster: the family schedules it later
            kept.append(gv.name_hint)
            continue
        func = func.with_attr(_TUNED_ATTR, True)
        if old.attrs is not None and "winoq.kernel" in old.attrs:
            func = func.with_attr("winoq.kernel", old.attrs["winoq.kernel"])
        out[gv] = func
        tuned.append(gv.name_hint)
    if isinstance(database, TuneLog):
        database.kept_hand = kept
    matched = tuned or kept
    if isinstance(database, TuneLog) and database.expect_match and database.valid_records and not matched:
        where = database.path / (META_FILE if database.meta is not None else WORKLOAD_FILE)
        raise TuneLogError(
            f"{where}: foreign or stale tune log: none of its {len(database.workloads)} workloads is a "
            "PrimFunc of this model and configuration (tuned with another tvm-winoq/TVM version or model?); "
            "re-run `winoq tune` or delete the log"
        )
    return out

def _workload_of(db: Any, func: Any) -> str | None:
    """The workload hash of PrimFunc ``func`` in ``db`` (as in the workload file), if it is there."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    mod = _normalize_mod(func)
    return str(db.commit_workload(mod).as_json()[0]) if db.has_workload(mod) else None


def _best_ms(db: Any, func: Any) -> float | None:
    """Mean time (ms) of the best valid record of PrimFunc ``func`` in ``db``."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    mod = _normalize_mod(func)
    if not db.has_workload(mod):
        return None
    top = db.get_top_k(db.commit_workload(mod), 1)
    if not top or not top[0].run_secs:
        return None
    secs = [float(s) for s in top[0].run_secs]
    return 1e3 * sum(secs) / len(secs) if min(secs) < FAILED_RUN_SECS else None
