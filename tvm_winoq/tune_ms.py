"""MetaSchedule plumbing of ``winoq tune``: tasks, design spaces, builder, runners, Ctrl-C handling.

The worker functions (:func:`ms_build`, :func:`ms_export`, :func:`ms_create_session`) run in
MetaSchedule's builder and runner processes; they import TVM only inside their bodies.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

__all__ = [
    "Interrupt",
    "Task",
    "make_builder",
    "make_context",
    "make_runner",
    "measure_hand_schedules",
    "verify_against_hand",
    "ms_build",
    "ms_create_session",
    "ms_export",
    "stop_callback",
]


# --------------------------------------------------------------------------------------------------------
# MetaSchedule worker functions (run in builder / runner processes)


def ms_build(mod: Any, target: Any, params: Any, alarm_s: int = 0) -> Any:
    """Builder: like MetaSchedule's default build, without importing every tensor intrinsic (~1 min).

    ``alarm_s``: the worker process ends itself (SIGALRM) when one build takes longer -- TVM's pool
    cannot kill a worker stuck in LLVM without ``psutil``, which would leave it running forever.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    del params
    if alarm_s > 0:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(alarm_s))
    try:
        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)
    finally:
        if alarm_s > 0:
            signal.alarm(0)


def ms_export(mod: Any, compiler: str | None = None, options: Sequence[str] = ()) -> str:
    """Builder: export a shared library (cross-compiled for boards, so they need no compiler)."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="winoq-ms-"), "tune_mod.so")
    if compiler:
        from tvm.support import cc

        mod.export_library(path, fcompile=cc.cross_compiler(compiler, options=list(options) or None))
    else:
        mod.export_library(path)
    return path


def ms_create_session(
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
# tasks and design spaces


@dataclass
class Task:
    """One tuning task: a PrimFunc of the fused model and its state in this run.

    Attributes
    ----------
    name : str
        PrimFunc (task) name.
    kind : str
        ``input`` / ``gemm`` / ``output`` for our Winograd kernels, ``op`` for the other operators.
    weight : int
        Call sites of the PrimFunc in the model.
    mod : IRModule
        The task's module (MetaSchedule's dispatched form).
    workload : str
        Structural hash in the database.
    done : int
        Records the database already had for it.
    skipped : str
        Why it is not tuned in this run (``done`` = finished its budget before; empty: tuned).
    dropped_rules : list of str
        Schedule rules left out because they fail on this PrimFunc.
    context : TuneContext or None
        Set by :func:`make_context`.
    """

    name: str
    kind: str
    weight: int
    mod: Any
    workload: str = ""
    done: int = 0
    skipped: str = ""
    dropped_rules: list[str] = field(default_factory=list)
    context: Any = None


def _space(rules: list[Any]) -> Any:
    from tvm.s_tir import meta_schedule as ms

    # No RewriteLayout: a rewritten weight layout would not match the constants of the Relax program.
    post = [p for p in ms.Postproc.create("llvm") if type(p).__name__ != "RewriteLayout"]
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=post, mutator_probs="llvm")


def make_context(task: Task, target: Any, trials: int, seed: int, logger: Any) -> None:
    """Set ``task.context`` to a TuneContext with the generic CPU rules and an evolutionary search.

    When a schedule rule fails on the PrimFunc (which would abort the whole run), the rules are left out
    one at a time until the design space generates (``task.dropped_rules``); when none works the task
    is marked skipped (``task.skipped``).

    Parameters
    ----------
    task : Task
    target : tvm.target.Target
    trials : int
        Trial budget (sizes the search population).
    seed : int
        Search seed.
    logger : logging.Logger
        The task's MetaSchedule logger.
    """
    from tvm.s_tir import meta_schedule as ms

    rules = list(ms.ScheduleRule.create("llvm"))  # generic CPU rules: auto-tensorized spaces do not build
    if task.kind != "op":
        # Our kernels already unroll their transforms; an extra explicit unroll of 512 steps over a whole
        # tile loop makes LLVM take minutes (a build timeout), so cap it at 64.
        rules = [
            ms.schedule_rule.ParallelizeVectorizeUnroll(
                max_jobs_per_core=16,
                max_vectorize_extent=64,
                unroll_max_steps=[0, 16, 64],
                unroll_explicit=True,
            )
            if type(r).__name__ == "ParallelizeVectorizeUnroll"
            else r
            for r in rules
        ]
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


class Interrupt:
    """Context manager for Ctrl-C during tuning (SIGINT handler of the main thread).

    The first SIGINT sets :attr:`flag`: :func:`stop_callback` stops the task scheduler after the current
    batch, whose records are committed; a second SIGINT raises ``KeyboardInterrupt`` at once.  (A
    ``KeyboardInterrupt`` raised while TVM's C++ task scheduler runs Python code would otherwise be
    converted to a TVM error or swallowed as a failed trial.)
    """

    def __init__(self) -> None:
        self.flag = threading.Event()
        self._old: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.flag.is_set():
            raise KeyboardInterrupt
        self.flag.set()
        print("winoq tune: stopping after the current batch (Ctrl-C again to stop now)", flush=True)

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def stop_callback(flag: threading.Event) -> Any:
    """A MeasureCallback (run after each batch is committed) that aborts tuning once ``flag`` is set."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class StopOnInterrupt(PyMeasureCallback):
        def apply(
            self,
            task_scheduler: Any,
            task_id: int,
            measure_candidates: Any,
            builder_results: Any,
            runner_results: Any,
        ) -> None:
            if flag.is_set():
                raise RuntimeError("winoq tune: interrupted")

    return StopOnInterrupt()


def make_builder(preset: Any, timeout: float) -> Any:
    """MetaSchedule ``LocalBuilder`` for ``preset``: our build function, cross-compiled export.

    Parameters
    ----------
    preset : Preset
        Target preset (its cross compiler links the artifacts for a board).
    timeout : float
        Seconds per measurement; a build gets at least 180 s (LLVM on big unrolled kernels).
    """
    from tvm.s_tir import meta_schedule as ms

    build_timeout = max(180.0, timeout)
    return ms.builder.LocalBuilder(
        max_workers=max(1, (os.cpu_count() or 2) // 2),
        timeout_sec=build_timeout,
        f_build=partial(ms_build, alarm_s=int(build_timeout) - 10),
        f_export=partial(ms_export, compiler=preset.cross_compiler, options=preset.cross_options),
    )


def make_runner(preset: Any, rpc: str | None, tracker: str | None, key: str, timeout: float) -> Any:
    """MetaSchedule runner: ``LocalRunner`` on this host, else ``RPCRunner`` on ``rpc`` or ``tracker``.

    Parameters
    ----------
    preset : Preset
        Target preset (its ``rpc_key`` is the default tracker key).
    rpc, tracker : str or None
        ``HOST:PORT`` of an RPC server, or of a tracker (with ``key``).
    key : str
        Device key at the tracker.
    timeout : float
        Seconds per measurement (also the RPC session timeout); a lost device fails the trial.
    """
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
            ms_create_session, rpc=rpc, tracker=tracker, key=key, timeout=min(30.0, timeout)
        ),
        max_workers=1,
    )



def _hand_module(task: Task, target: Any, family: Any) -> Any:
    """The task's PrimFunc with the hand schedule of its family (``schedules/<family>.py``)."""
    import tvm

    mod = tvm.IRModule({"main": task.mod["main"]})
    if task.kind == "op":
        return family.schedule_other_ops(mod, target)
    return family.schedule_winoq_kernels(mod, target)


def _tuned_module(task: Task, database: Any) -> Any:
    """The task's PrimFunc with the best schedule of ``database`` (``None`` without a valid record)."""
    import tvm

    top = database.get_top_k(database.commit_workload(task.mod), 1)
    if not top:
        return None
    sch = tvm.s_tir.Schedule(task.mod)
    top[0].trace.apply_to_schedule(sch, remove_postproc=False)
    return tvm.IRModule({"main": sch.mod["main"].with_attr("tirx.is_scheduled", True)})


def _median_times(
    mods: Sequence[Any], target: Any, builder: Any, runner: Any, repeat: int
) -> list[float | None]:
    """Build ``mods`` and time each ``repeat`` times, interleaved (``m0 m1 .. m0 m1 ..``); median ms each."""
    from tvm.s_tir import meta_schedule as ms

    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    built = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
    ok = [i for i, r in enumerate(built) if r.error_msg is None and r.artifact_path]
    inputs = {
        i: ms.runner.RunnerInput(
            built[i].artifact_path, device, ms.arg_info.ArgInfo.from_prim_func(mods[i]["main"])
        )
        for i in ok
    }
    order = [i for _ in range(repeat) for i in ok]
    futures = runner.run([inputs[i] for i in order])
    times: dict[int, list[float]] = {i: [] for i in ok}
    for i, fut in zip(order, futures, strict=True):
        res = fut.result()
        if res.error_msg is None and res.run_secs:
            times[i].append(1e3 * sum(float(s) for s in res.run_secs) / len(res.run_secs))
    for i in ok:
        shutil.rmtree(os.path.dirname(built[i].artifact_path), ignore_errors=True)
    return [float(sorted(times[i])[len(times[i]) // 2]) if times.get(i) else None for i in range(len(mods))]


def measure_hand_schedules(
    tasks: Sequence[Task], target: Any, builder: Any, runner: Any, repeat: int = 3
) -> dict[str, float | None]:
    """Time the hand schedule of every task with the tuning builder and runner (median of ``repeat``).

    Returns
    -------
    dict
        Workload hash -> milliseconds, ``None`` where the hand schedule failed to build or run (or the
        target has no schedule family).
    """
    from .relax.schedules import schedules_for

    family = schedules_for(target)
    if family is None or not tasks:
        return {t.workload: None for t in tasks}
    times = _median_times([_hand_module(t, target, family) for t in tasks], target, builder, runner, repeat)
    return {t.workload: ms for t, ms in zip(tasks, times, strict=True)}


def verify_against_hand(
    tasks: Sequence[Task], database: Any, target: Any, builder: Any, runner: Any, repeat: int = 5
) -> dict[str, tuple[float | None, float | None]]:
    """Time the best tuned schedule of every task against its hand schedule, interleaved.

    The best record's own time is the minimum over noisy trials measured at different moments; this
    measures both schedules again, alternately, under the same conditions (median of ``repeat``), which
    is what decides whether ``winoq compile`` applies the tuned one.

    Returns
    -------
    dict
        Workload hash -> ``(hand_ms, tuned_ms)`` (``None`` where one could not be built or run).
    """
    from .relax.schedules import schedules_for

    family = schedules_for(target)
    out: dict[str, tuple[float | None, float | None]] = {}
    pairs = [(t, _tuned_module(t, database)) for t in tasks]
    pairs = [(t, m) for t, m in pairs if m is not None]
    if family is None or not pairs:
        return out
    mods = [m for t, tuned in pairs for m in (_hand_module(t, target, family), tuned)]
    times = _median_times(mods, target, builder, runner, repeat)
    for k, (task, _) in enumerate(pairs):
        out[task.workload] = (times[2 * k], times[2 * k + 1])
    return out
