"""End-to-end models: our compiled int8 Winograd module vs PyTorch fp32 and ONNX Runtime int8, one run.

    python -m benchmarks.run_models          # resnet18 + diffusion_unet, 1 and 2 threads
    python -m benchmarks.run_models --models resnet18 --threads 1 --tile 4 --markdown out.md --json out.json

Per model (batch 1, the registered example input): ``ours-f<tile>`` is ``compile_model`` with the shipped
default config (F(``tile``,3), group-wise, M per output channel, scales learned data-free) for the
``--preset`` target, every other operator scheduled by the ``cpu``/``x86`` family; ``ort-int8`` is the
model exported to ONNX (TorchScript exporter) and statically quantized by ONNX Runtime (QDQ, int8
per-channel weights, uint8 activations calibrated on ``--calib`` Gaussian inputs);
``torch-fp32`` is eager PyTorch.  Every output is compared with PyTorch fp32 (SQNR, and top-1 agreement
for classifiers) before timing; the calls are timed interleaved (:func:`benchmarks.timing.time_interleaved`).
Weights are random for ``resnet18``/``diffusion_unet`` (speed is what is measured here; accuracy on
trained models is the fidelity study's job).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import peers
from benchmarks.timing import time_interleaved

Call = Callable[[], np.ndarray]


def _ours(model: Any, x: np.ndarray, tile: int, threads: int, steps: int, measured: bool = False,
          chosen: dict[str, str] | None = None, ineligible: str = "float") -> Call:
    """Ours; with ``measured``, the layers ``winoq compile``'s ``measure`` phase finds faster as int8
    direct are direct (written to ``chosen``); ``ineligible="direct"``: every other conv int8 direct."""
    import torch
    import tvm

    from tvm_winoq.config import default_config
    from tvm_winoq.convert import fold_batchnorm
    from tvm_winoq.finetune import FinetuneSettings, collect_layers, finetune_scales
    from tvm_winoq.relax.build import compile_model
    from tvm_winoq.targets import get_preset

    cfg = default_config(tile=tile).with_(ineligible=ineligible)
    xt = torch.from_numpy(x)
    layers = collect_layers(fold_batchnorm(model, xt), xt)
    scales = finetune_scales(layers, cfg, FinetuneSettings(steps=steps), progress=False).shared
    target = get_preset(peers._STATE["preset"]).tvm_target()
    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if measured:
            from tvm_winoq.speed_choice import measure_layer_choices

            choice = measure_layer_choices(model, xt, cfg, target, scales=scales, log=lambda s: None)
            (chosen if chosen is not None else {}).update(choice.layers)
            cm = choice.compiled or compile_model(model, xt, choice.apply(cfg), target=target, scales=scales)
        else:
            cm = compile_model(model, xt, cfg, target=target, scales=scales)
    runner = cm.runner()
    return lambda: runner(x)


def _ort_int8(model: Any, x: np.ndarray, threads: int, calib: int) -> Call:
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.data = iter([{"x": rng.standard_normal(x.shape).astype(np.float32)} for _ in range(calib)]
                             + [{"x": x}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.data, None)

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.from_numpy(x),), buf, dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["y"])
        fp32.write_bytes(buf.getvalue())
        quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        if peers._STATE["passive"]:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(int8), so, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"x": x})[0]


def _torch_fp32(model: Any, x: np.ndarray, threads: int) -> Call:
    import torch

    xt = torch.from_numpy(x)

    def call() -> np.ndarray:
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = model(xt)
        return (out[0] if isinstance(out, tuple) else out).numpy()

    return call


def _first(out: Any) -> np.ndarray:
    return np.asarray(out[0] if isinstance(out, list | tuple) else out)


def run(models: list[str], threads: list[int], tile: int, repeat: int, budget_s: float, steps: int,
        calib: int, w8a8: bool = True) -> dict[str, Any]:
    """Build, check and time every implementation per (model, threads); the result as plain data."""
    import torch

    from tvm_winoq.models import get_model

    rows = []
    info = peers.system_info()
    for name in models:
        model, xt = get_model(name)
        x = np.ascontiguousarray(xt.numpy(), dtype=np.float32)
        with torch.no_grad():
            out = model(xt)
        ref = (out[0] if isinstance(out, tuple) else out).numpy()
        for n in threads:
            chosen: dict[str, dict[str, str]] = {"ours-auto": {}, "ours-auto-w8a8": {}}
            calls = {"torch-fp32": _torch_fp32(model, x, n), "ort-int8": _ort_int8(model, x, n, calib),
                     f"ours-f{tile}": _ours(model, x, tile, n, steps),
                     "ours-auto": _ours(model, x, tile, n, steps, measured=True, chosen=chosen["ours-auto"])}
            if w8a8:
                calls["ours-auto-w8a8"] = _ours(model, x, tile, n, steps, measured=True,
                                                chosen=chosen["ours-auto-w8a8"], ineligible="direct")
            checks = {}
            for impl, call in calls.items():
                y = _first(call()).reshape(ref.shape)
                checks[impl] = {"sqnr_db": peers.sqnr_db(ref, y)}
                if ref.ndim == 2:
                    checks[impl]["top1_agree"] = bool(np.argmax(ref, 1)[0] == np.argmax(y, 1)[0])
            timing = time_interleaved(calls, repeat, budget_s=budget_s, gap_s=2e-3)
            med = {k: float(np.median(t.samples_s)) for k, t in timing.items()}
            for impl, t in timing.items():
                rows.append({"model": name, "threads": n, "impl": impl, **checks[impl],
                             "median_ms": 1e3 * med[impl], "min_ms": 1e3 * min(t.samples_s),
                             "cpu_per_wall": t.cpu_per_wall,
                             "speedup": {o: med[o] / med[impl] for o in med if o != impl},
                             **({"direct_layers": sorted(chosen[impl])} if impl in chosen else {})})
            print(f"{name} threads={n}: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in med.items()),
                  file=sys.stderr, flush=True)
    info["loadavg_after"] = list(os.getloadavg())
    return {"system": info, "tile": tile, "preset": peers._STATE["preset"], "rows": rows}


def to_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown page (system line, one table)."""
    s = result["system"]
    lines = [f"# End-to-end models, batch 1 ({s['date'][:10]})", "",
             f"- CPU: {s['cpu']}, {s['cores']} cores; ISA: {' '.join(s['isa'])}; load average before/after: "
             f"{s['loadavg_before'][0]:.2f} / {s['loadavg_after'][0]:.2f}",
             f"- ours: default config F({result['tile']},3), preset `{result['preset']}`; "
             "SQNR vs PyTorch fp32", "",
             "| model | threads | impl | SQNR dB | top-1 agrees | median ms | min ms | cpu/wall "
             "| speed-ups |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        sp = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup"].items())
        top = {True: "yes", False: "no"}.get(r.get("top1_agree"), "")
        lines.append(f"| {r['model']} | {r['threads']} | {r['impl']} | {r['sqnr_db']:.1f} | {top} | "
                     f"{r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['cpu_per_wall']:.2f} | {sp} |")
    lines += ["", "`ours-auto`: as `ours-f*`, with the Winograd layers `winoq compile`'s `measure` phase "
              "times faster as int8 direct (in the model, at the row's threads) made direct; "
              "`ours-auto-w8a8`: also every conv Winograd cannot take int8 direct (`--ineligible direct`). "
              "Measured direct:", ""]
    lines += [f"- {r['model']} threads={r['threads']} {r['impl']}: {', '.join(r['direct_layers']) or 'none'}"
              for r in result["rows"] if "direct_layers" in r]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run :func:`run`, print/write the report."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_models", description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "diffusion_unet"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--tile", type=int, choices=(2, 4, 6), default=4)
    ap.add_argument("--preset", default="host", help="host (= host-avx2) or best (for this CPU)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds per model x threads")
    ap.add_argument("--steps", type=int, default=200, help="finetuning steps of our scales")
    ap.add_argument("--calib", type=int, default=8, help="ONNX Runtime calibration inputs")
    ap.add_argument("--no-w8a8", action="store_true", help="skip the ours-auto-w8a8 row")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    peers.set_wait_policy(passive=True)
    from tvm_winoq.errors import TargetError

    try:
        peers.set_preset(args.preset)
    except TargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(args.models, args.threads, args.tile, args.repeat, args.budget, args.steps, args.calib,
                 w8a8=not args.no_w8a8)
    from tvm_winoq.io import write_file_atomic

    md = to_markdown(result)
    for path, text in ((args.json, json.dumps(result, indent=1)), (args.markdown, md)):
        if path:
            write_file_atomic(Path(path), text)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
