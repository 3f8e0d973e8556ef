"""``winoq`` command line: parses arguments and calls plain functions (no logic here)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import WinoqError


def _cmd_table(a: argparse.Namespace) -> None:
    from .fidelity import fidelity_table, format_markdown
    from .finetune import FinetuneSettings

    res = fidelity_table(
        a.model,
        tiles=a.tiles,
        groups=a.groups,
        images=a.images,
        size=a.size,
        settings=FinetuneSettings(steps=a.steps, seed=a.seed),
        whole_model=not a.no_model,
    )
    text = format_markdown(res, per_layer=not a.summary)
    print(text)
    if a.out:
        from .io import write_outputs

        write_outputs(Path(a.out), {"table.md": text + "\n", "table.json": json.dumps(res, indent=1)})


def _cmd_finetune(a: argparse.Namespace) -> None:
    from .finetune import FinetuneSettings
    from .jobs import finetune_model

    print(
        finetune_model(
            a.model,
            tile=a.tile,
            group=a.group,
            settings=FinetuneSettings(steps=a.steps, seed=a.seed, per_layer=a.per_layer, lr=a.lr),
        )
    )


def _cmd_layers(a: argparse.Namespace) -> None:
    from .jobs import describe_layers

    print(describe_layers(a.model))


def _cmd_train_fmnist(a: argparse.Namespace) -> None:
    from .train_fmnist import train_fmnist

    res = train_fmnist(epochs=a.epochs, batch=a.batch, lr=a.lr, seed=a.seed, out=a.out)
    print(f"test top-1 {res['test_accuracy']:.2f}% in {res['seconds']:.0f} s -> {res['checkpoint']}")


def _cmd_targets(a: argparse.Namespace) -> None:
    from .jobs import describe_targets

    print(describe_targets())


def _cmd_board(a: argparse.Namespace) -> None:
    from .jobs import board_command

    print(board_command(a.action, cpu=a.cpu, port=a.port, key=a.key, tracker=a.tracker))


def _study_settings(a: argparse.Namespace):
    from .finetune import FinetuneSettings
    from .study import StudySettings

    return StudySettings(
        tiles=tuple(a.tiles),
        groups=tuple(a.groups),
        images=a.images,
        size=a.size,
        test_limit=a.limit,
        budgets_db=tuple(a.budget),
        max_loss_db=a.max_loss,
        compiled=a.compiled,
        engine=a.engine,
        finetune=FinetuneSettings(steps=a.steps, seed=a.seed),
    )


def _cmd_eval(a: argparse.Namespace) -> None:
    from .study import eval_model
    from .study_report import study_markdown, write_study

    res = eval_model(a.model, _study_settings(a))
    print(study_markdown(res))
    if a.out:
        print(f"wrote {write_study(res, Path(a.out))}")


def _cmd_report(a: argparse.Namespace) -> None:
    from .study import eval_model
    from .study_report import build_report

    s = _study_settings(a)
    path = build_report(a.models, Path(a.out), run=lambda name: eval_model(name, s), rerun=a.rerun)
    print(f"wrote {path}")


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiles", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--groups", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--budget", type=float, nargs="+", default=[20.0],
                   help="automatic tile choice: end-to-end output SQNR (dB vs FP32) to keep (one row each)")
    p.add_argument("--max-loss", type=float, default=3.0,
                   help="... or at most this many dB below int8 direct where direct is below budget + this")
    p.add_argument("--engine", choices=["reference", "compiled"], default="reference",
                   help="what computes the task metric: PyTorch integer reference or the compiled module")
    p.add_argument("--compiled", action="store_true",
                   help="also run the default (first budget) as a TVM-compiled module on the host")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)


def _compile_options(a: argparse.Namespace):
    """The CompileOptions shared by ``compile`` and ``tune``."""
    from .pipeline import CompileOptions, parse_layer_overrides

    return CompileOptions(
        model=a.model,
        target=a.target,
        tile=a.tile,
        group=a.group,
        scales=a.scales,
        steps=a.steps,
        seed=a.seed,
        input_size=a.input_size,
        keep_params=a.keep_params,
        layers=parse_layer_overrides(a.layer or []),
        fallback=getattr(a, "fallback", "measured"),
        ineligible=a.ineligible,
    )


def _cmd_compile(a: argparse.Namespace) -> None:
    from .pipeline import compile_job

    database: str | bool | None = False if a.no_tune_log else a.tune_log
    compile_job(_compile_options(a), Path(a.out), database=database)


def _cmd_run(a: argparse.Namespace) -> None:
    from .pipeline import run_job

    res = run_job(Path(a.out_dir), a.input, repeat=a.repeat, threads=a.threads)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


def _cmd_bench(a: argparse.Namespace) -> None:
    from .bench import bench_job

    bench_job(
        Path(a.out_dir),
        rpc=a.rpc,
        tracker=a.tracker,
        key=a.key,
        local=a.local,
        number=a.number,
        repeat=a.repeat,
        min_repeat_ms=a.min_repeat_ms,
        layers=not a.no_layers,
        threads=a.threads,
        timeout=a.timeout,
        json_path=Path(a.json) if a.json else None,
    )


def _cmd_tune(a: argparse.Namespace) -> None:
    from .tune import tune_job

    opts = _compile_options(a)
    res = tune_job(
        opts,
        a.trials,
        rpc=a.rpc,
        tracker=a.tracker,
        key=a.key,
        timeout=a.timeout,
        log_dir=a.log_dir,
        trials_per_iter=a.trials_per_iter,
        tasks=a.tasks,
        top=a.top,
    )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


def build_parser() -> argparse.ArgumentParser:
    """The ``winoq`` argument parser."""
    p = argparse.ArgumentParser(prog="winoq", description="Data-free group-wise int8 Winograd for TVM")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("table", help="per-layer / whole-model SQNR of every method on real inputs")
    t.add_argument("model", help="registered model name (craft, resnet18, fmnist_resnet, ...)")
    t.add_argument("--tiles", type=int, nargs="+", default=[4, 6])
    t.add_argument("--groups", type=int, nargs="+", default=[16, 32, 64])
    t.add_argument("--images", type=int, default=5)
    t.add_argument("--size", type=int, default=256)
    t.add_argument("--steps", type=int, default=600, help="finetuning steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-model", action="store_true", help="skip the whole-model column")
    t.add_argument("--summary", action="store_true", help="omit the per-layer table")
    t.add_argument("-o", "--out", help="also write table.md and table.json to this folder")
    t.set_defaults(func=_cmd_table)

    f = sub.add_parser("finetune", help="learn the Winograd scales of a model without data")
    f.add_argument("model")
    f.add_argument("--tile", type=int, default=6)
    f.add_argument("--group", type=int, default=32)
    f.add_argument("--steps", type=int, default=600)
    f.add_argument("--lr", type=float, default=0.02)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--per-layer", action="store_true")
    f.set_defaults(func=_cmd_finetune)

    ls = sub.add_parser("layers", help="list the convolutions of a model and which are eligible")
    ls.add_argument("model")
    ls.set_defaults(func=_cmd_layers)
    tr = sub.add_parser("train-fmnist", help="train the Fashion-MNIST ResNet checkpoint")
    tr.add_argument("--epochs", type=int, default=6)
    tr.add_argument("--batch", type=int, default=128)
    tr.add_argument("--lr", type=float, default=0.1)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("-o", "--out", default=None, help="checkpoint path (default: the registry's)")
    tr.set_defaults(func=_cmd_train_fmnist)
    ev = sub.add_parser("eval", help="fidelity study: per-layer SQNR and task accuracy of every method")
    ev.add_argument("model")
    _study_arguments(ev)
    ev.add_argument("-o", "--out", default=None, help="folder for study.md / study.json / plots")
    ev.set_defaults(func=_cmd_eval)
    rp = sub.add_parser("report", help="one markdown page with the fidelity studies of several models")
    rp.add_argument("models", nargs="+", help="registered model names, e.g. craft fmnist_resnet")
    _study_arguments(rp)
    rp.add_argument("-o", "--out", required=True, help="report folder (one sub-folder per model)")
    rp.add_argument("--rerun", action="store_true", help="recompute studies that already exist")
    rp.set_defaults(func=_cmd_report)

    c = sub.add_parser("compile", help="compile a model with int8 Winograd convs for a target preset")
    c.add_argument(
        "model",
        help="registered model name (craft, resnet18, ...) or a .py file defining "
        "`model` and `example_input`",
    )
    c.add_argument("--target", default="host", help="target preset (see `winoq targets`)")
    c.add_argument("--tile", type=int, default=6, help="Winograd F(m,3) output tile m: 2, 4 or 6")
    c.add_argument("--group", type=int, default=32, help="channel group size of V, U and M")
    c.add_argument("--scales", default="learned", help="standard | learned | learned-per-layer")
    c.add_argument("--steps", type=int, default=600, help="finetuning steps (cached)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--input-size", type=int, default=None, help="square input size (registered models)")
    c.add_argument("--keep-params", action="store_true", help="import weights as parameters")
    c.add_argument(
        "--layer",
        action="append",
        metavar="NAME=CHOICE",
        help="per-layer override: f2|f4|f6|direct|float (repeatable)",
    )
    c.add_argument("--ineligible", default="float",
                   help="float: convs Winograd cannot take (stride 2, 1x1, dilated, grouped) stay float; "
                   "direct: they become int8 direct too (every conv W8A8)")
    c.add_argument("--fallback", default="measured",
                   help="measured: int8 direct for the layers it runs faster, timed in the model on this "
                   "machine (two extra builds; presets this machine cannot run are not measured); none: "
                   "every eligible layer Winograd")
    ctl = c.add_mutually_exclusive_group()
    ctl.add_argument("--tune-log", default=None, help="apply this tune log (default: tune_logs/PRESET/MODEL)")
    ctl.add_argument("--no-tune-log", action="store_true", help="hand schedules only (ignore tune logs)")
    c.add_argument("-o", "--out", required=True, help="output folder")
    c.set_defaults(func=_cmd_compile)

    r = sub.add_parser("run", help="run a compiled module and compare with FP32 PyTorch")
    r.add_argument("out_dir")
    r.add_argument("--input", default=None, help="image file, .npy, or a skimage.data name (e.g. page)")
    r.add_argument("--repeat", type=int, default=10)
    r.add_argument("--threads", type=int, default=None, help="threads for both runtimes (default: all cores)")
    r.add_argument("--json", default=None, help="also write the result as JSON")
    r.set_defaults(func=_cmd_run)

    b = sub.add_parser("bench", help="time a compiled module end to end and per PrimFunc")
    b.add_argument("out_dir", help="a `winoq compile` output folder")
    bdev = b.add_mutually_exclusive_group(required=True)
    bdev.add_argument("--rpc", default=None, help="HOST:PORT of an RPC server (board, tvm.exec.rpc_server)")
    bdev.add_argument("--tracker", default=None, help="HOST:PORT of an RPC tracker (with --key)")
    bdev.add_argument("--local", action="store_true", help="run in this process")
    b.add_argument("--key", default="", help="device key at the tracker (default: the preset's rpc_key)")
    b.add_argument("--number", type=int, default=5, help="runs per measurement")
    b.add_argument("--repeat", type=int, default=5, help="measurements (median and min are reported)")
    b.add_argument("--min-repeat-ms", type=int, default=0, help="grow --number up to this")
    b.add_argument("--no-layers", action="store_true", help="end to end only (no per-PrimFunc times)")
    b.add_argument("--threads", type=int, default=None, help="device runtime threads")
    b.add_argument("--timeout", type=float, default=300.0, help="seconds before a silent device is given up")
    b.add_argument("--json", default=None, help="result file (default OUT_DIR/bench.json)")
    b.set_defaults(func=_cmd_bench)

    tu = sub.add_parser("tune", help="MetaSchedule-tune a model's PrimFuncs for a preset (resumable)")
    tu.add_argument("model", help="registered model name or a .py file (as for compile)")
    tu.add_argument("--target", default="host", help="target preset (see `winoq targets`)")
    tu.add_argument("--trials", type=int, required=True, help="measured trials per task (PrimFunc)")
    tdev = tu.add_mutually_exclusive_group()
    tdev.add_argument("--rpc", default=None, help="measure on the RPC server HOST:PORT")
    tdev.add_argument("--tracker", default=None, help="measure on a device of an RPC tracker HOST:PORT")
    tu.add_argument("--key", default="", help="device key at the tracker")
    tu.add_argument("--tile", type=int, default=6)
    tu.add_argument("--group", type=int, default=32)
    tu.add_argument("--scales", default="learned", help="standard | learned | learned-per-layer")
    tu.add_argument("--steps", type=int, default=600)
    tu.add_argument("--seed", type=int, default=0)
    tu.add_argument("--input-size", type=int, default=None)
    tu.add_argument("--keep-params", action="store_true")
    tu.add_argument("--layer", action="append", metavar="NAME=CHOICE", help="per-layer override (as compile)")
    tu.add_argument("--ineligible", default="float", help="float | direct (as compile)")
    tu.add_argument("--timeout", type=float, default=120.0, help="seconds per build / measurement")
    tu.add_argument("--trials-per-iter", type=int, default=None, help="candidates per task and round")
    tu.add_argument("--tasks", default="all", choices=["all", "winoq", "ops"], help="which PrimFuncs to tune")
    tu.add_argument("--top", type=int, default=None, help="only the N tasks with the most FLOPs per run")
    tu.add_argument("--log-dir", default=None, help="database folder (default tune_logs/<preset>/<model>/)")
    tu.add_argument("--json", default=None, help="also write the result as JSON")
    tu.set_defaults(func=_cmd_tune)

    tg = sub.add_parser("targets", help="list the target presets")
    tg.set_defaults(func=_cmd_targets)

    bd = sub.add_parser("board", help="emulated aarch64 board (qemu-user) serving TVM RPC on 127.0.0.1")
    bd.add_argument("action", choices=["start", "stop", "status"])
    bd.add_argument("--cpu", default="max", help="qemu -cpu model: max (dotprod, i8mm), cortex-a72, ...")
    bd.add_argument("--port", type=int, default=9190)
    bd.add_argument("--key", default="", help="RPC key (when registering with a tracker)")
    bd.add_argument("--tracker", default=None, help="HOST:PORT of a tracker to register with")
    bd.set_defaults(func=_cmd_board)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``winoq`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except WinoqError as exc:
        print(f"winoq: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("winoq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
