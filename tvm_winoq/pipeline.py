"""``winoq compile`` / ``winoq run``: the end-to-end job as an ordered list of named phases.

Phases: ``load`` (model + example input), ``finetune`` (data-free scales, cached), ``measure`` (with
``fallback="measured"`` and a preset this machine runs: which Winograd layers run faster as int8
direct, timed in the model, :mod:`tvm_winoq.speed_choice`), ``build`` (import, Winograd rewrite,
lowering, TVM build for the preset), ``export`` (module + metadata, written atomically: an output
folder is either complete or absent).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import INELIGIBLE_CHOICES, config_from_dict, groupwise
from .convert import fold_batchnorm
from .errors import ConfigError, ModelError, WinoqError
from .finetune import FinetuneSettings, collect_layers

SCALE_CHOICES = ("standard", "learned", "learned-per-layer")
FALLBACK_CHOICES = ("measured", "none")


@dataclass(frozen=True)
class CompileOptions:
    """What ``winoq compile`` builds (validated)."""

    model: str
    target: str = "host"
    tile: int = 6
    group: int = 32
    scales: str = "learned"
    steps: int = 600
    seed: int = 0
    input_size: int | None = None
    keep_params: bool = False
    layers: dict[str, str] = field(default_factory=dict)
    fallback: str = "measured"
    ineligible: str = "float"

    def __post_init__(self) -> None:
        if self.scales not in SCALE_CHOICES:
            raise ConfigError(f"scales: must be one of {SCALE_CHOICES}, got {self.scales!r}")
        if self.fallback not in FALLBACK_CHOICES:
            raise ConfigError(f"fallback: must be one of {FALLBACK_CHOICES}, got {self.fallback!r}")
        if self.ineligible not in INELIGIBLE_CHOICES:
            raise ConfigError(f"ineligible: must be one of {INELIGIBLE_CHOICES}, got {self.ineligible!r}")
        if self.input_size is not None and self.input_size < 8:
            raise ConfigError(f"input_size: must be >= 8, got {self.input_size}")


def parse_layer_overrides(items: list[str]) -> dict[str, str]:
    """``["name=f4", ...]`` -> ``{"name": "f4"}`` (values are validated by :class:`WinoQConfig`)."""
    out = {}
    for item in items:
        name, sep, choice = item.partition("=")
        if not sep or not name or not choice:
            raise ConfigError(f"layers: expected NAME=CHOICE (e.g. basenet.slice1.0=f2), got {item!r}")
        out[name] = choice
    return out


def load_model(spec: str, input_size: int | None = None) -> tuple[nn.Module, torch.Tensor, str]:
    """A registered model name or a ``.py`` file -> ``(model, example input, canonical spec)``."""
    from .models import get_model, load_model_file

    if spec.endswith(".py"):
        path = Path(spec).resolve()
        model, x = load_model_file(path)
        return model, x, str(path)
    model, x = get_model(spec)
    if input_size is not None:
        x = resize_input(spec, x, input_size)
    return model, x, spec


def resize_input(model_name: str, x: torch.Tensor, size: int) -> torch.Tensor:
    """The model's example input at ``size x size`` (a real image for image models)."""
    if model_name == "craft":
        from .data import natural_image
        from .models.craft import craft_preprocess

        return craft_preprocess(natural_image("page", None), size)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _phase(name: str, log: Callable[[str], None]):
    class _P:
        def __enter__(self):
            self.t0 = time.time()
            log(f"[{name}] ...")

        def __exit__(self, *exc):
            if exc[0] is None:
                log(f"[{name}] done in {time.time() - self.t0:.1f} s")

    return _P()


@dataclass
class PreparedJob:
    """What the ``load`` and ``finetune`` phases produce (shared by ``winoq compile`` and ``winoq tune``)."""

    preset: Any
    model: nn.Module
    example_input: torch.Tensor
    spec: str
    cfg: Any
    scales: Any
    finetune: Any


def prepare_job(opts: CompileOptions, log: Callable[[str], None] = print) -> PreparedJob:
    """Run the ``load`` and ``finetune`` phases of ``opts`` (the model, its input, config and scales)."""
    from .scale_cache import finetune_cached
    from .targets import get_preset

    preset = get_preset(opts.target)
    mode = {"standard": "standard", "learned": "learned-shared", "learned-per-layer": "learned-per-layer"}
    cfg = groupwise(opts.tile, opts.group, mode[opts.scales]).with_(layers=opts.layers,
                                                                    ineligible=opts.ineligible)
    with _phase("load", log):
        model, x, spec = load_model(opts.model, opts.input_size)
        folded = fold_batchnorm(model, x)
        layers = collect_layers(folded, x)
        log(f"  {spec}: input {tuple(x.shape)}, {len(layers)} eligible 3x3 stride-1 convs")
    scales = None
    ft = None
    if opts.scales != "standard" and layers:
        with _phase("finetune", log):
            s = FinetuneSettings(
                steps=opts.steps, seed=opts.seed, per_layer=opts.scales == "learned-per-layer"
            )
            ft, cached = finetune_cached(spec, layers, cfg, s)
            scales = ft.per_layer if s.per_layer else ft.shared
            how = "cached scales" if cached else f"finetuned in {ft.seconds:.0f} s"
            log(f"  {how} (Gaussian inputs only)")
    return PreparedJob(preset, model, x, spec, cfg, scales, ft)


def compile_job(
    opts: CompileOptions,
    out_dir: Path,
    log: Callable[[str], None] = print,
    database: str | Path | bool | None = None,
) -> dict:
    """Run the compile phases and write ``out_dir`` (module.so, module.json, config.json, report.txt).

    ``database``: ``None`` applies the ``winoq tune`` log of this preset and model when one exists
    (``tune_logs/<preset>/<model>/``), a path applies that log, ``False`` uses the hand schedules only.
    A corrupt or foreign log raises :class:`~tvm_winoq.errors.TuneLogError`.
    """
    from .relax.build import compile_model
    from .tune import resolve_tune_log

    job = prepare_job(opts, log)
    preset, model, x, spec, cfg, scales, ft = (
        job.preset,
        job.model,
        job.example_input,
        job.spec,
        job.cfg,
        job.scales,
        job.finetune,
    )
    tune_log = resolve_tune_log(database, opts, spec, preset.tvm_target(), log)
    choice, compiled = _measure_phase(opts, job, tune_log, log)
    if choice is not None:
        cfg = choice.apply(cfg)
    if compiled is not None and not opts.keep_params:
        log("[build] the measured build with these choices is the module")
    else:
        with _phase("build", log):
            compiled = compile_model(
                model,
                x,
                cfg,
                target=preset.tvm_target(),
                scales=scales,
                keep_params_as_input=opts.keep_params,
                database=tune_log,
            )
    rewritten = [r for r in compiled.records if r.rewritten and r.kind != "direct"]
    direct = sum(r.kind == "direct" for r in compiled.records)
    report = [
        f"{len(rewritten)} of {len(compiled.records)} conv2d rewritten to int8 Winograd F({opts.tile},3)"
        + (f", {direct} to int8 direct" if direct else "")
    ]
    measured = {t.name: t for t in choice.timings} if choice is not None else {}
    report += [_record_line(r, measured.get(r.name)) for r in compiled.records]
    if tune_log is not None:
        report.append(
            f"{len(compiled.tuned)} PrimFuncs use tuned schedules from {tune_log.path}"
            + (": " + ", ".join(compiled.tuned) if compiled.tuned else " (none matched this configuration)")
        )
        if tune_log.kept_hand:
            report.append(f"{len(tune_log.kept_hand)} kept the hand schedule (measured faster than tuned): "
                          + ", ".join(tune_log.kept_hand))
    log("\n".join(report))
    meta = {
        "model": spec,
        "target": opts.target,
        "input_shape": list(x.shape),
        "options": asdict(opts),
        "config": cfg.to_dict(),
        "scales": None
        if scales is None
        else ({k: v.to_dict() for k, v in scales.items()} if isinstance(scales, dict) else scales.to_dict()),
        "finetune_report": ft.report if ft else [],
        "tune_log": str(tune_log.path) if tune_log is not None else None,
        "tuned": list(compiled.tuned),
        "measured_choices": [t.to_dict() for t in choice.timings] if choice is not None else None,
    }
    with _phase("export", log):
        _export_atomic(out_dir, compiled, preset, meta, "\n".join(report) + "\n")
    extra = ", module.params" if compiled.params else ""
    log(f"wrote {out_dir}/ (module.so, module.json{extra}, config.json, report.txt)")
    return meta


def _measure_phase(opts: CompileOptions, job: PreparedJob, tune_log: Any,
                   log: Callable[[str], None]) -> tuple[Any, Any]:
    """The ``measure`` phase: ``(SpeedChoice | None, the measured build with its choices | None)``."""
    preset = job.preset
    if opts.fallback != "measured":
        return None, None
    from .relax.schedules import schedules_for
    from .speed_choice import measure_layer_choices

    target, missing = preset.tvm_target(), preset.missing_features()
    family = schedules_for(target)
    why = None
    if missing:
        why = f"this machine lacks {', '.join(missing)}"
    elif preset.kind != "llvm" or preset.is_cross:
        why = "this machine cannot run it"
    elif not (hasattr(family, "tensorized_direct") and family.tensorized_direct(target)):
        why = "its schedules have no tensorized int8 direct kernel"
    if why is not None:
        log(f"[measure] skipped for {preset.name}: {why}; every eligible layer stays Winograd")
        return None, None

    with _phase("measure", log):
        choice = measure_layer_choices(job.model, job.example_input, job.cfg, target,
                                       scales=job.scales, database=tune_log, log=log)
        log(f"  {len(choice.layers)} of {len(choice.timings)} Winograd layers measured faster as int8 direct")
    return choice, choice.compiled


def _record_line(r, timing=None) -> str:
    shape = f"{r.weight_shape[1]}->{r.weight_shape[0]}" if len(r.weight_shape) == 4 else "?"
    what = {"winograd": "Winograd", "direct": "direct  "}.get(r.kind, "left    ")
    why = "" if timing is None else (
        " (measured " + ", ".join(f"{c} {v:.3f} ms" for c, v in timing.ms.items()) + ")")
    return f"  {r.name:36s} {shape:>11s}  {what}  {r.reason}{why}"


def _export_atomic(out_dir: Path, compiled, preset, meta: dict, report: str) -> None:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        lib = stage / "module.so"
        preset.export_library(compiled.executable, lib)
        compiled.write_sidecars(lib)  # module.json (+ module.params with --keep-params)
        (stage / "config.json").write_text(json.dumps(meta, indent=1))
        (stage / "report.txt").write_text(report)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        stage.rename(out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def read_compiled(out_dir: Path) -> dict:
    """The metadata of a ``winoq compile`` output folder (clear error if it is not one)."""
    out_dir = Path(out_dir)
    cfg_path = out_dir / "config.json"
    if not (out_dir / "module.so").is_file() or not cfg_path.is_file():
        raise WinoqError(f"{out_dir}: not a winoq compile output (module.so / config.json missing)")
    try:
        meta = json.loads(cfg_path.read_text())
        config_from_dict(meta["config"])
    except (ValueError, KeyError) as exc:
        raise WinoqError(f"{cfg_path}: unreadable compile metadata ({exc})") from exc
    return meta


def prepare_input(meta: dict, source: str | None) -> torch.Tensor:
    """The run input: ``None`` (the compile example), an ``.npy`` file, an image file or a skimage name."""
    shape = tuple(meta["input_shape"])
    if source is None:
        return load_model(meta["model"], shape[-1] if meta["options"].get("input_size") else None)[1]
    if source.endswith(".npy"):
        try:
            arr = np.load(source)
        except (OSError, ValueError) as exc:
            raise WinoqError(f"--input {source}: cannot read ({exc})") from exc
        if tuple(arr.shape) != shape:
            raise WinoqError(f"--input {source}: shape {arr.shape} != compiled input shape {shape}")
        return torch.from_numpy(arr.astype(np.float32))
    img = _read_image(source)
    if meta["model"] == "craft":
        from .models.craft import craft_preprocess

        return craft_preprocess(img, (shape[2], shape[3]))
    if shape[1] != 3:
        raise WinoqError(f"--input {source}: images are only supported for 3-channel models (shape {shape})")
    from .data import imagenet_preprocess

    x = imagenet_preprocess(img, shape[2])
    return x if tuple(x.shape) == shape else resize_input("", x, shape[2])


def _read_image(source: str) -> np.ndarray:
    from .data import NATURAL_IMAGE_NAMES, natural_image

    if source in NATURAL_IMAGE_NAMES:
        return natural_image(source, None)
    try:
        from skimage import io

        return io.imread(source)
    except (OSError, ValueError) as exc:
        raise WinoqError(
            f"--input {source}: not a readable image, .npy file or skimage.data name ({exc})"
        ) from exc


def run_job(
    out_dir: Path,
    source: str | None = None,
    repeat: int = 10,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run a compiled module on an input; compare with FP32 PyTorch (SQNR, top-1) and time both.

    Both runtimes use ``threads`` threads (default: every core).
    """
    import os

    import tvm

    from .metrics import sqnr_db
    from .relax.build import load

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    tvm.get_global_func("runtime.config_threadpool")(1, threads)

    meta = read_compiled(out_dir)
    x = prepare_input(meta, source)
    runner = load(Path(out_dir) / "module.so")
    y = runner(x.numpy())
    model, _, _ = load_model(meta["model"])
    model = model.eval()
    with torch.no_grad():
        ref = model(x)
    ref = ref[0] if isinstance(ref, tuple | list) else ref
    result = {
        "model": meta["model"],
        "input": source or "example",
        "sqnr_db": sqnr_db(ref, torch.from_numpy(y)),
    }
    if ref.dim() == 2:
        result["top1_agree"] = bool((ref.argmax(1) == torch.from_numpy(y).argmax(1)).all())
    if meta["model"] == "craft":
        from .models.craft import craft_postprocess
        from .task_metrics import box_f1

        ref_boxes, boxes = craft_postprocess(ref), craft_postprocess(y)
        result.update({"boxes_fp32": len(ref_boxes), "boxes": len(boxes), "box_f1": box_f1(ref_boxes, boxes)})
    t_ours = runner.time(x.numpy(), repeat=repeat)
    with torch.no_grad():
        for _ in range(2):
            model(x)
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t0)
    t_torch = float(np.median(ts))
    result.update(
        {
            "ms_ours": 1e3 * t_ours,
            "ms_torch_fp32": 1e3 * t_torch,
            "speedup_vs_torch": t_torch / t_ours,
            "torch_threads": torch.get_num_threads(),
        }
    )
    log(
        f"{meta['model']} on {result['input']}: SQNR vs FP32 PyTorch {result['sqnr_db']:.2f} dB"
        + (f", top-1 agrees: {result['top1_agree']}" if "top1_agree" in result else "")
        + (
            f", text boxes {result['boxes']} vs {result['boxes_fp32']} (F1 {result['box_f1']:.1f}%)"
            if "box_f1" in result
            else ""
        )
    )
    log(
        f"time: tvm-winoq {result['ms_ours']:.2f} ms, PyTorch fp32 {result['ms_torch_fp32']:.2f} ms "
        f"({result['speedup_vs_torch']:.2f}x), {result['torch_threads']} threads"
    )
    return result


__all__ = [
    "CompileOptions",
    "ModelError",
    "PreparedJob",
    "compile_job",
    "prepare_job",
    "read_compiled",
    "run_job",
]
