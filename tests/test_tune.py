"""``winoq tune``: MetaSchedule tuning, resuming, applying the database in ``winoq compile``, bad logs.

The fast tests build tiny synthetic databases (no tuning).  The ``slow`` tests tune a one-conv model
(4 tasks: the three Winograd kernels and a ReLU) for 2-3 trials per task on the host; importing TVM's
tensor intrinsics (which MetaSchedule's TuneContext does) alone takes 30-70 s on a busy 2-core machine.
The ``board`` test tunes on the emulated aarch64 board over RPC.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from rpc_servers import emulated_board, free_port, wait_for  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from tvm_winoq import tune as tune_mod  # noqa: E402
from tvm_winoq.errors import TuneLogError  # noqa: E402
from tvm_winoq.pipeline import CompileOptions, compile_job  # noqa: E402
from tvm_winoq.targets import get_preset  # noqa: E402
from tvm_winoq.tune import (  # noqa: E402
    RECORD_FILE,
    WORKLOAD_FILE,
    apply_database,
    config_key,
    read_tune_log,
    tune_job,
)

slow = pytest.mark.slow
board = pytest.mark.board

ONE_CONV = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()).eval()
example_input = torch.randn(1, 8, 16, 16)
"""


# ---------------------------------------------------------------------------------------------------------
# synthetic databases (fast)


@T.prim_func(s_tir=True)
def add_one(a: T.Buffer((16,), "float32"), b: T.Buffer((16,), "float32")):
    T.func_attr({"global_symbol": "main", "tir.noalias": True})
    for i in range(16):
        with T.sblock("b"):
            vi = T.axis.spatial(16, i)
            b[vi] = a[vi] + T.float32(1)


def _mul_two() -> tvm.tirx.PrimFunc:
    """Another PrimFunc (not in any test database)."""
    a = tvm.te.placeholder((16,), "float32", name="a")
    return tvm.te.create_prim_func([a, tvm.te.compute((16,), lambda i: a[i] * 2.0, name="b")])


def _make_db(folder: Path, target: tvm.target.Target, func=add_one, run_secs: float = 1e-5) -> Path:
    """A one-record JSONDatabase in ``folder`` (what ``winoq tune`` writes, without the metadata)."""
    folder.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(folder))
    mod = _normalize_mod(func)  # what task extraction and MetaScheduleApplyDatabase key workloads on
    workload = db.commit_workload(mod)
    sch = tvm.s_tir.Schedule(mod)
    sch.parallel(sch.get_loops(sch.get_sblock("b"))[0])
    rec = ms.database.TuningRecord(
        sch.trace, workload, [run_secs], target, ms.arg_info.ArgInfo.from_prim_func(func)
    )
    db.commit_tuning_record(rec)
    return folder


@pytest.fixture()
def host_target() -> tvm.target.Target:
    return get_preset("host").tvm_target()


def test_read_valid_log(tmp_path: Path, host_target) -> None:
    tl = read_tune_log(_make_db(tmp_path / "db", host_target), host_target)
    assert tl.total_records == tl.valid_records == 1 and len(tl.workloads) == 1 and tl.meta is None
    assert tl.expect_match  # no metadata: it must match the model it is applied to


def test_core_count_does_not_make_a_log_foreign(tmp_path: Path, host_target) -> None:
    other = tvm.target.Target({**dict(host_target.export()), "num-cores": 64})
    read_tune_log(_make_db(tmp_path / "db", other), host_target)


def test_corrupt_json_line(tmp_path: Path, host_target) -> None:
    folder = _make_db(tmp_path / "db", host_target)
    with open(folder / RECORD_FILE, "a") as fh:
        fh.write('[0, [[], {"not": "closed"\n')
    with pytest.raises(TuneLogError, match=rf"{RECORD_FILE}:2: corrupt tune log line"):
        read_tune_log(folder, host_target)


def test_not_a_record(tmp_path: Path, host_target) -> None:
    folder = _make_db(tmp_path / "db", host_target)
    (folder / WORKLOAD_FILE).write_text('{"a": 1}\n')
    with pytest.raises(TuneLogError, match=rf"{WORKLOAD_FILE}:1: corrupt"):
        read_tune_log(folder, host_target)


def test_record_of_missing_workload(tmp_path: Path, host_target) -> None:
    folder = _make_db(tmp_path / "db", host_target)
    line = json.loads((folder / RECORD_FILE).read_text())
    line[0] = 5
    with open(folder / RECORD_FILE, "a") as fh:
        fh.write(json.dumps(line) + "\n")
    with pytest.raises(TuneLogError, match="workload #5"):
        read_tune_log(folder, host_target)


def test_truncated_last_line_is_an_error_or_repaired(tmp_path: Path, host_target) -> None:
    folder = _make_db(tmp_path / "db", host_target)
    good = (folder / RECORD_FILE).read_bytes()
    (folder / RECORD_FILE).write_bytes(good + good[:40])  # a write cut short by a killed process
    with pytest.raises(TuneLogError, match=rf"{RECORD_FILE}: last line 2 is truncated"):
        read_tune_log(folder, host_target)
    assert read_tune_log(folder, host_target, repair=True).total_records == 1
    assert (folder / RECORD_FILE).read_bytes() == good


def test_foreign_target_records(tmp_path: Path, host_target) -> None:
    folder = _make_db(tmp_path / "db", get_preset("rpi5").tvm_target())
    with pytest.raises(TuneLogError, match=rf"{RECORD_FILE}:1: foreign tune log.*cortex-a76"):
        read_tune_log(folder, host_target)


def test_foreign_metadata(tmp_path: Path, host_target) -> None:
    folder = _make_db(tmp_path / "db", host_target)
    meta = {
        "format": tune_mod.META_FORMAT,
        "preset": "rpi5",
        "target_key": tune_mod._target_key(get_preset("rpi5").tvm_target()),
        "model": "craft",
        "model_key": "craft",
        "configs": {},
    }
    (folder / tune_mod.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(TuneLogError, match=rf"{tune_mod.META_FILE}: foreign tune log: tuned for target"):
        read_tune_log(folder, host_target)
    meta["target_key"] = tune_mod._target_key(host_target)
    (folder / tune_mod.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(TuneLogError, match="tuned for model 'craft', not 'resnet18'"):
        read_tune_log(folder, host_target, model="resnet18")
    assert not read_tune_log(folder, host_target, model="craft", config="x").expect_match  # config not tuned
    (folder / tune_mod.META_FILE).write_text("{broken")
    with pytest.raises(TuneLogError, match="corrupt tune log metadata"):
        read_tune_log(folder, host_target)


def test_missing_files(tmp_path: Path, host_target) -> None:
    with pytest.raises(TuneLogError, match=WORKLOAD_FILE):
        read_tune_log(tmp_path, host_target)


def test_apply_database(tmp_path: Path, host_target) -> None:
    """A matching record replaces the PrimFunc (marked tuned); a log matching nothing is foreign."""
    func = add_one.with_attr("global_symbol", "add_one").with_attr("winoq.kernel", "input")
    tl = read_tune_log(_make_db(tmp_path / "db", host_target, func), host_target)
    out = apply_database(tvm.IRModule({"add_one": func}), host_target, tl)
    func = out["add_one"]
    assert "winoq.tuned" in func.attrs and func.attrs["winoq.kernel"] == "input"
    other = tvm.IRModule({"mul_two": _mul_two().with_attr("global_symbol", "mul_two")})
    with pytest.raises(TuneLogError, match="foreign or stale tune log"):
        apply_database(other, host_target, tl)
    tl.expect_match = False  # e.g. the log's metadata says this configuration was never tuned
    assert "winoq.tuned" not in (apply_database(other, host_target, tl)["mul_two"].attrs or {})


def test_config_key_tracks_kernel_options() -> None:
    a = CompileOptions(model="m", tile=4)
    assert config_key(a) == config_key(CompileOptions(model="m", tile=4, target="rpi5"))
    assert config_key(a) != config_key(CompileOptions(model="m", tile=6))
    assert config_key(a) != config_key(CompileOptions(model="m", tile=4, layers={"0": "f2"}))
    assert config_key(a) != config_key(CompileOptions(model="m", tile=4, ineligible="direct"))
    assert config_key(a) == config_key(CompileOptions(model="m", tile=4, fallback="none"))  # not keyed
    std = CompileOptions(model="m", scales="standard")
    assert config_key(std) == config_key(CompileOptions(model="m", scales="standard", steps=5))


def test_tune_rejects_bad_options(tmp_path: Path) -> None:
    from tvm_winoq.errors import ConfigError, TargetError

    with pytest.raises(ConfigError, match="trials"):
        tune_job(CompileOptions(model="x.py"), 0)
    with pytest.raises(TargetError, match="does not run on this host"):
        tune_job(CompileOptions(model="x.py", target="rpi5"), 2)
    with pytest.raises(ConfigError, match="--key"):
        tune_job(CompileOptions(model="x.py"), 2, tracker="127.0.0.1:9")
    with pytest.raises(ConfigError, match="--top"):
        tune_job(CompileOptions(model="x.py"), 2, top=0)
    with pytest.raises(ConfigError, match="--tasks"):
        tune_job(CompileOptions(model="x.py"), 2, tasks="some")


def test_tune_unreachable_device_fails_fast(tmp_path: Path) -> None:
    from tvm_winoq.errors import DeviceError

    with pytest.raises(DeviceError, match="connection refused"):
        tune_job(CompileOptions(model="x.py", target="rpi5"), 2, rpc=f"127.0.0.1:{free_port()}", timeout=5)


def test_shipped_craft_log_is_valid() -> None:
    """The committed host log of the README's main job: not corrupt, not foreign, claims its configuration."""
    from tvm_winoq.paths import REPO_DIR

    folder = REPO_DIR / "tune_logs" / "host-avx2" / "craft"
    if not (folder / RECORD_FILE).is_file():
        pytest.skip("no shipped tune log in this checkout")
    main_job = CompileOptions(model="craft", tile=4, input_size=384)  # winoq compile craft --tile 4 ...
    tl = read_tune_log(folder, get_preset("host").tvm_target(), model="craft", config=config_key(main_job))
    assert tl.expect_match and tl.valid_records > 0 and tl.meta["preset"] == "host-avx2"
    tuned = {t["workload"] for t in tl.meta["configs"][config_key(main_job)]["tasks"].values()}
    assert tuned <= set(tl.workloads) and all(tl.meta["baselines"].get(w) for w in tuned)


# ---------------------------------------------------------------------------------------------------------
# real tuning (slow)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    """Model file, empty tune_logs and scale cache folders (the repository's tune_logs stay untouched)."""
    root = tmp_path_factory.mktemp("tune")
    (root / "net1.py").write_text(ONE_CONV)
    (root / "tune_logs").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WINOQ_TUNE_LOGS_DIR", str(root / "tune_logs"))
        mp.setenv("WINOQ_CACHE", str(root / "cache"))
        yield root


def _opts(env: Path, **kw) -> CompileOptions:
    return CompileOptions(model=str(env / "net1.py"), tile=4, scales="standard",
                          **({"fallback": "none"} | kw))


@pytest.fixture(scope="module")
def tuned(env: Path) -> dict:
    lines: list[str] = []
    res = tune_job(_opts(env), 2, log=lines.append)
    return {"result": res, "log": lines, "dir": Path(res["log_dir"])}


@slow
def test_tune_writes_records(env: Path, tuned: dict) -> None:
    res, folder = tuned["result"], tuned["dir"]
    assert folder == env / "tune_logs" / "host-avx2" / "net1"
    assert {p.name for p in folder.iterdir()} >= {WORKLOAD_FILE, RECORD_FILE, "tune_meta.json", "logs"}
    kinds = {r["kind"] for r in res["tasks"]}
    assert kinds == {"input", "gemm", "output", "op"}  # our kernels and the rest
    for row in res["tasks"]:
        assert 1 <= row["records"] <= 2 and row["failed"] == 0 and row["best_ms"] > 0, row
    meta = json.loads((folder / "tune_meta.json").read_text())
    assert meta["preset"] == "host-avx2" and meta["model_key"] == "net1"
    assert config_key(_opts(env)) in meta["configs"]


@slow
def test_rerun_skips_then_resumes_without_losing_records(env: Path, tuned: dict) -> None:
    folder = tuned["dir"]
    before = (folder / RECORD_FILE).read_bytes()
    lines: list[str] = []
    again = tune_job(_opts(env), 2, log=lines.append)
    assert any("4 tasks already done" in ln for ln in lines), lines
    assert (folder / RECORD_FILE).read_bytes() == before and again["records"] == tuned["result"]["records"]
    more = tune_job(_opts(env), 3, log=lines.append)
    after = (folder / RECORD_FILE).read_bytes()
    assert after.startswith(before) and more["records"] > tuned["result"]["records"]


@slow
def test_compile_applies_the_database(env: Path, tuned: dict, tmp_path: Path) -> None:
    from tvm_winoq.relax.build import load

    lines: list[str] = []
    meta = compile_job(_opts(env), tmp_path / "tuned", log=lines.append)
    assert meta["tune_log"] == str(tuned["dir"])
    report = (tmp_path / "tuned" / "report.txt").read_text()
    assert "PrimFuncs use tuned schedules from" in report and all(n in report for n in meta["tuned"])
    # every task is either tuned or kept its (measured faster) hand schedule, exactly once; which one is
    # decided by the log's current timings (later tests re-tune and re-time the same folder, and a 5 us
    # relu can flip), so the kept list comes from this compile's report
    line = next((ln for ln in report.splitlines() if "kept the hand schedule" in ln), "")
    kept = [n.strip() for n in line.partition(": ")[2].split(",") if n.strip()]
    assert not line or line.startswith(f"{len(kept)} kept the hand schedule")
    assert sorted(meta["tuned"] + kept) == sorted(r["name"] for r in tuned["result"]["tasks"])
    hand = compile_job(_opts(env), tmp_path / "hand", log=lines.append, database=False)
    assert hand["tuned"] == [] and hand["tune_log"] is None
    x = np.random.default_rng(0).standard_normal((1, 8, 16, 16)).astype(np.float32)
    y_tuned, y_hand = load(tmp_path / "tuned" / "module.so")(x), load(tmp_path / "hand" / "module.so")(x)
    np.testing.assert_allclose(y_tuned, y_hand, rtol=1e-4, atol=1e-4)


def _with_baselines(src: Path, dst: Path, hand_ms: float) -> Path:
    """A copy of the log whose hand-schedule baseline of every workload is ``hand_ms``."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / tune_mod.META_FILE).read_text())
    workloads = {t["workload"] for c in meta["configs"].values() for t in c["tasks"].values()}
    assert set(meta["baselines"]) == workloads
    meta["baselines"] = dict.fromkeys(meta["baselines"], hand_ms)
    (dst / tune_mod.META_FILE).write_text(json.dumps(meta))
    return dst


@slow
def test_tuned_schedules_apply_only_where_faster_than_hand(env: Path, tuned: dict, tmp_path: Path) -> None:
    """`winoq tune` times each hand schedule; compile keeps it where no tuned record beats it."""
    rows = tuned["result"]["tasks"]
    assert all(r["hand_ms"] is not None and r["hand_ms"] > 0 for r in rows), rows
    lines: list[str] = []
    fast = _with_baselines(tuned["dir"], tmp_path / "fast", 1e-9)  # no tuned record beats this
    meta = compile_job(_opts(env), tmp_path / "o1", log=lines.append, database=fast)
    assert meta["tuned"] == [] and "4 kept the hand schedule" in (tmp_path / "o1" / "report.txt").read_text()
    slow_ = _with_baselines(tuned["dir"], tmp_path / "slow", 1e9)  # every tuned record beats this
    assert len(compile_job(_opts(env), tmp_path / "o2", log=lines.append, database=slow_)["tuned"]) == 4


@slow
def test_compile_rejects_corrupt_and_foreign_logs(env: Path, tuned: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tuned["dir"], bad)
    with open(bad / RECORD_FILE, "a") as fh:
        fh.write("garbage\n")
    with pytest.raises(TuneLogError, match=rf"{bad / RECORD_FILE}:\d+: corrupt"):
        compile_job(_opts(env), tmp_path / "o1", log=lambda s: None, database=bad)
    assert not (tmp_path / "o1").exists()
    # the host log applied to another x86 preset: different mcpu / features
    with pytest.raises(TuneLogError, match="foreign tune log: tuned for target"):
        compile_job(
            _opts(env, target="x86-avx512-vnni"), tmp_path / "o2", log=lambda s: None, database=tuned["dir"]
        )
    # the same log found automatically for a model of the same name whose every PrimFunc differs (other
    # channels and input size): stale workloads.  (A model sharing some PrimFuncs gets those applied.)
    other = tmp_path / "other" / "net1.py"
    other.parent.mkdir()
    other.write_text(ONE_CONV.replace("Conv2d(8, 16", "Conv2d(4, 24").replace("8, 16, 16)", "4, 20, 20)"))
    opts = CompileOptions(model=str(other), tile=4, scales="standard")
    with pytest.raises(TuneLogError, match="foreign or stale tune log"):
        compile_job(opts, tmp_path / "o3", log=lambda s: None)


@slow
def test_lost_device_records_failures_and_continues(env: Path, tmp_path: Path, monkeypatch) -> None:
    """The RPC runner's device disappears after the connection check: every trial fails, tuning goes on."""
    monkeypatch.setattr(tune_mod, "_check_device", lambda *a: "RPC (gone)")
    dead = f"127.0.0.1:{free_port()}"
    res = tune_job(
        _opts(env), 1, rpc=dead, timeout=20, log_dir=tmp_path / "db", tasks="winoq", log=lambda s: None
    )
    assert len(res["tasks"]) == 3 and all(r["failed"] == r["records"] == 1 for r in res["tasks"]), res[
        "tasks"
    ]
    assert all(r["best_ms"] is None for r in res["tasks"])
    # an all-failures log applies nothing, and is not mistaken for a foreign one
    tl = read_tune_log(tmp_path / "db", get_preset("host").tvm_target())
    assert tl.valid_records == 0 and tl.total_records == 3


@slow
def test_top_tunes_only_the_heaviest_task(env: Path, tmp_path: Path) -> None:
    """--top 1 of all 4 tasks: only the GEMM (by far the most FLOPs), and `compile` applies just that."""
    lines: list[str] = []
    res = tune_job(_opts(env), 1, top=1, log_dir=tmp_path / "db", log=lines.append)
    assert [r["kind"] for r in res["tasks"]] == ["gemm"] and res["tasks"][0]["records"] == 1
    assert any("the 1 of 4 tasks with the most FLOPs" in ln for ln in lines), lines
    assert f"--tune-log {tmp_path / 'db'}" in lines[-1]  # not the default folder: say how to apply it
    meta = compile_job(_opts(env), tmp_path / "out", log=lines.append, database=tmp_path / "db")
    kept = [r["name"] for r in res["tasks"] if "kept" in r["status"]]  # the hand schedule was faster
    assert len(meta["tuned"] + kept) == 1 and (meta["tuned"] + kept)[0].startswith("winoq_gemm_")


@slow
def test_interrupt_keeps_records_and_resumes(env: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) in `winoq tune`: exit 130, finished records kept; the next run continues."""
    import os
    import signal
    import subprocess
    import sys

    folder = tmp_path / "db"
    cmd = [
        sys.executable,
        "-m",
        "tvm_winoq.cli",
        "tune",
        str(env / "net1.py"),
        "--trials",
        "4",
        "--tile",
        "4",
        "--scales",
        "standard",
        "--trials-per-iter",
        "1",
        "--log-dir",
        str(folder),
    ]
    out_file = tmp_path / "tune.out"  # a file, not a pipe: a full pipe would block the child
    with open(out_file, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(
            lambda: (folder / RECORD_FILE).is_file() and (folder / RECORD_FILE).read_text().count("\n") >= 1,
            "the first tuning record",
            proc,
            within=600,
        )
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    out = out_file.read_text()
    assert proc.returncode == 130, out[-2000:]
    assert "interrupted" in out and "run the same command again to continue" in out
    kept = (folder / RECORD_FILE).read_bytes()
    assert kept.count(b"\n") >= 1
    lines: list[str] = []
    res = tune_job(_opts(env), 4, trials_per_iter=1, log_dir=folder, log=lines.append)
    assert (folder / RECORD_FILE).read_bytes().startswith(kept)
    assert any("resumed" in ln for ln in lines) and res["records"] > kept.count(b"\n")


@board
@slow
def test_tune_on_emulated_board(env: Path, tmp_path: Path) -> None:
    """Tune our kernels for rpi5 on the emulated board over RPC; compile applies them; bench runs it."""
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("no aarch64 cross gcc")
    from tvm_winoq.bench import bench_job

    with emulated_board(cpu="max") as info:
        lines: list[str] = []
        res = tune_job(
            _opts(env, target="rpi5"),
            1,
            rpc=info["rpc"],
            timeout=120,
            tasks="winoq",
            log_dir=tmp_path / "db",
            log=lines.append,
        )
        assert res["emulated"] and any("EMULATED" in ln for ln in lines)
        assert all(r["records"] == 1 and r["failed"] == 0 for r in res["tasks"]), res["tasks"]
        meta = compile_job(
            _opts(env, target="rpi5"), tmp_path / "out", log=lines.append, database=tmp_path / "db"
        )
        kept = [r["name"] for r in res["tasks"] if "kept" in r["status"]]  # the hand schedule was faster
        assert all(r["hand_ms"] for r in res["tasks"]) and len(meta["tuned"] + kept) == 3
        out = bench_job(tmp_path / "out", rpc=info["rpc"], number=1, repeat=2, log=lines.append)
        assert out["emulated"] and sum(r["tuned"] for r in out["layers"]) == len(meta["tuned"])
