"""Single 3x3 stride-1 pad-1 conv layers (batch 1): our int8 Winograd against CPU peers, timed interleaved.

An implementation is a factory ``factory(x, w, b, threads) -> call``; ``call()`` returns the float32
NCHW output as numpy and is what a user runs (float in, float out, quantize/dequantize included).  Each
output is first checked against a float64 PyTorch conv (SQNR, dB); a row below its floor is INVALID and
is not timed.  Timing is round-robin over implementations per repetition (start rotated every round),
so drift and the neighbours' load hit every implementation alike.  See ``benchmarks/README.md``.
"""

from __future__ import annotations

import math
import os
import re
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# TVM sizes its pool from this (else from a guess that halves the cores) when it first runs a kernel.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from .timing import Call, Timing, time_interleaved  # noqa: F401 - part of this module's API

Factory = Callable[[np.ndarray, np.ndarray, np.ndarray, int], Call]
DEFAULT_SHAPES = ("64@56", "128@28", "256@14", "512@7", "320@64", "640@32")
# preset: the target preset our rows are built for (run_layers --preset; default the main job's "host")
_STATE: dict[str, Any] = {"passive": False, "tvm_threads": None, "tvm": {}, "preset": "host", "choices": {}}


class Unavailable(RuntimeError):
    """Raised by a factory when its backend cannot run here (the row is reported as skipped)."""


@dataclass(frozen=True)
class Impl:
    """A registered implementation: factory, SQNR floor (dB vs FP32), one-line note."""

    name: str
    factory: Factory
    min_sqnr_db: float
    note: str = ""


_REGISTRY: dict[str, Impl] = {}


def register_impl(name: str, factory: Factory, *, min_sqnr_db: float = 25.0, note: str = "") -> None:
    """Register (or replace) an implementation.

    Parameters
    ----------
    name : str
        Row label, e.g. ``"ours-f4"``.
    factory : callable
        ``factory(x, w, b, threads)`` with float32 numpy ``x`` [1, C, H, W], ``w`` [K, C, 3, 3], ``b`` [K]
        returns a zero-argument callable producing the [1, K, H, W] float32 output.  Do the offline work
        (weight packing, compilation) in the factory; raise :class:`Unavailable` if it cannot run here.
    min_sqnr_db : float
        Output SQNR vs the float64 reference below which the row is INVALID (not timed).
    note : str
        Shown in the report.
    """
    _REGISTRY[name] = Impl(name, factory, float(min_sqnr_db), note)


def unregister_impl(name: str) -> None:
    """Remove ``name`` from the registry (no error if absent)."""
    _REGISTRY.pop(name, None)


def registered_impls() -> list[str]:
    """Registered names, in registration order."""
    return list(_REGISTRY)


def unknown_impls_message(names: Sequence[str]) -> str | None:
    """``"unknown implementation(s) [...]; registered: [...]"`` if any of ``names`` is not registered."""
    if unknown := [n for n in names if n not in _REGISTRY]:
        return f"unknown implementation(s) {unknown}; registered: {registered_impls()}"
    return None


def set_wait_policy(passive: bool) -> None:
    """Make idle worker threads sleep instead of spin (OpenMP, TVM pool, ONNX Runtime) or restore defaults.

    On a loaded machine with few cores a spinning worker steals the core its partner needs: libgomp's
    default spin made 2-thread torch/ncnn runs 50-100x slower here.  Call before ``import torch`` /
    ``ncnn`` (libgomp reads ``OMP_WAIT_POLICY`` when it loads).
    """
    for lib in ("torch", "ncnn", "tvm"):
        if lib in sys.modules and passive != _STATE["passive"]:
            warnings.warn(f"set_wait_policy after importing {lib}: it may ignore it", stacklevel=2)
    for var, val in (("OMP_WAIT_POLICY", "PASSIVE"), ("TVM_THREAD_POOL_SPIN_COUNT", "0")):
        if passive:
            os.environ[var] = val
        elif os.environ.get(var) == val:
            del os.environ[var]
    _STATE["passive"] = passive


@dataclass(frozen=True)
class Shape:
    """A 3x3 s1 p1 conv: ``c`` -> ``k`` channels on ``h`` x ``w``."""

    c: int
    k: int
    h: int
    w: int

    @property
    def label(self) -> str:
        return ("{}" if self.c == self.k else "{}x" + str(self.k)).format(self.c) + (
            f"@{self.h}" if self.h == self.w else f"@{self.h}x{self.w}")

    @property
    def ops(self) -> int:
        """``2*C*K*H*W*9`` (a multiply-add is 2 ops)."""
        return 2 * self.c * self.k * self.h * self.w * 9


def parse_shape(text: str) -> Shape:
    """Parse ``C@H``, ``C@HxW`` or ``CxK@H[xW]`` (e.g. ``64@56``)."""
    m = re.fullmatch(r"(\d+)(?:x(\d+))?@(\d+)(?:x(\d+))?", text.strip())
    if not m:
        raise ValueError(f"bad shape {text!r}: expected C@H, C@HxW or CxK@H[xW]")
    c, k, h, w = m.groups()
    return Shape(int(c), int(k or c), int(h), int(w or h))


def aligned(a: np.ndarray, alignment: int = 64) -> np.ndarray:
    """A C-contiguous copy of ``a`` whose data starts on an ``alignment``-byte boundary.

    Every implementation gets the same input array; PyTorch's and TVM's allocators align to 64 bytes,
    NumPy's only to 16, and TVM takes a tensor without a copy only when it is 64-byte aligned.
    """
    buf = np.empty(a.nbytes + alignment, np.uint8)
    off = -buf.ctypes.data % alignment
    out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def make_layer(shape: Shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded float32 ``x`` ~ N(0, 1) (64-byte aligned), He-initialised ``w``, bias ~ N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    x = aligned(rng.standard_normal((1, shape.c, shape.h, shape.w), dtype=np.float32))
    w = rng.standard_normal((shape.k, shape.c, 3, 3), dtype=np.float32) * np.float32((4.5 * shape.c) ** -0.5)
    return x, w, rng.standard_normal(shape.k, dtype=np.float32) * np.float32(0.1)


def reference_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, dtype: Any = None) -> np.ndarray:
    """The conv in PyTorch, float64 unless ``dtype`` (the reference all outputs are checked against)."""
    import torch

    t = [torch.from_numpy(a).to(dtype or torch.float64) for a in (x, w, b)]
    with torch.inference_mode():
        return torch.nn.functional.conv2d(*t, padding=1).numpy()


def sqnr_db(ref: np.ndarray, y: np.ndarray) -> float:
    """``10 log10(|ref|^2 / |ref - y|^2)`` (``inf`` if equal, ``-inf`` on shape mismatch or non-finite)."""
    ref64, y64 = np.asarray(ref, np.float64), np.asarray(y, np.float64)
    if ref64.shape != y64.shape or not np.isfinite(y64).all():
        return -math.inf
    noise = float(np.square(ref64 - y64).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(np.square(ref64).sum()) / noise)


def _uint8_qparams(a: np.ndarray) -> tuple[float, int]:
    lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)  # min/max calibration, 0 representable
    scale = max(hi - lo, 1e-8) / 255.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def _per_channel_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.maximum(np.abs(w).reshape(w.shape[0], -1).max(1), 1e-12).astype(np.float32) / np.float32(127)
    return np.clip(np.round(w / scale[:, None, None, None]), -127, 127).astype(np.int8), scale


# -------------------------------------------------------------------------------------------- peers


def _torch_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def torch_fp32(x: np.ndarray, w: np.ndarray, b: np.ndarray, threads: int) -> Call:
    """``torch.nn.functional.conv2d`` in float32 (``torch.set_num_threads``)."""
    import torch

    xt, wt, bt = (torch.from_numpy(a) for a in (x, w, b))

    def call() -> np.ndarray:
        _torch_threads(threads)
        with torch.inference_mode():
            return torch.nn.functional.conv2d(xt, wt, bt, padding=1).numpy()

    return call


def torch_int8(x: np.ndarray, w: np.ndarray, b: np.ndarray, threads: int) -> Call:
    """PyTorch quantized conv (x86, else fbgemm engine): quantize -> ``quantized::conv2d`` -> dequantize.

    ``torch.ao.nn.quantized.functional.conv2d`` with its per-call weight prepack hoisted out (as the
    ``quantized.Conv2d`` module does); per-channel int8 weights, uint8 activations, input and output
    scales calibrated (min/max) on this input and its FP32 output.
    """
    import torch

    engine = next((e for e in ("x86", "fbgemm") if e in torch.backends.quantized.supported_engines), None)
    if engine is None:
        raise Unavailable(f"no x86/fbgemm quantized engine ({torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = engine
    _, ws = _per_channel_int8(w)
    (xs, xz), (ys, yz) = _uint8_qparams(x), _uint8_qparams(reference_conv(x, w, b, torch.float32))
    xt = torch.from_numpy(x)
    with warnings.catch_warnings():  # quantized tensor constructors are deprecated (still the API)
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(torch.from_numpy(w), torch.from_numpy(ws).double(),
                                        torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.conv2d_prepack(qw, torch.from_numpy(b), [1, 1], [1, 1], [1, 1], 1)

        def call() -> np.ndarray:
            _torch_threads(threads)
            qx = torch.quantize_per_tensor(xt, xs, xz, torch.quint8)
            return torch.ops.quantized.conv2d(qx, packed, ys, yz).dequantize().numpy()

        call()  # the once-per-process deprecation warning fires here, silenced
    return call


def ort_int8(x: np.ndarray, w: np.ndarray, b: np.ndarray, threads: int) -> Call:
    """ONNX Runtime: QuantizeLinear -> QLinearConv (u8 x, per-channel s8 w, s32 bias) -> DequantizeLinear."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise Unavailable(f"onnx/onnxruntime not installed: {e}") from e
    k = w.shape[0]
    wq, ws = _per_channel_int8(w)
    (xs, xz), (ys, yz) = _uint8_qparams(x), _uint8_qparams(reference_conv(x, w, b))
    consts = {"xs": np.float32(xs), "xz": np.uint8(xz), "ys": np.float32(ys), "yz": np.uint8(yz), "wq": wq,
              "ws": ws, "wz": np.zeros(k, np.int8), "bq": np.round(b / (xs * ws)).astype(np.int32)}
    qconv = ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz", "bq"]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("QLinearConv", qconv, ["yq"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(
        nodes, "conv3x3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k, *x.shape[2:]])],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if _STATE["passive"]:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"x": x}
    return lambda: sess.run(None, feed)[0]


def ncnn_files(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[str, bytes]:
    """ncnn ``.param`` text and ``.bin`` bytes of one int8 ``Convolution`` layer (fp32 in, fp32 out).

    Params ``0=K 1=3 3=1 4=1 5=1 6=K*C*9 8=1``: num_output, kernel 3, stride 1, pad 1, bias, weight size,
    int8_scale_term.  Bin: tag ``0x000D4B38`` (int8 array) + int8 weights padded to 4 bytes, float32
    bias [K], ``weight_data_int8_scales`` [K], ``bottom_blob_int8_scales`` [1].  ncnn scales multiply
    (``q = round(v * s)``): ``127 / absmax`` per output channel, and on ``x`` for the input.
    """
    _, c, h, wd = x.shape
    k = w.shape[0]
    wq, ws = _per_channel_int8(w)
    param = (f"7767517\n2 2\nInput in0 0 1 in0 0={wd} 1={h} 2={c}\n"
             f"Convolution conv0 1 1 in0 out0 0={k} 1=3 3=1 4=1 5=1 6={k * c * 9} 8=1\n")
    scales = np.concatenate([1.0 / ws, [127.0 / max(float(np.abs(x).max()), 1e-12)]]).astype("<f4")
    raw = wq.tobytes()
    return param, b"".join([struct.pack("<I", 0x000D4B38), raw, b"\0" * (-len(raw) % 4),
                            b.astype("<f4").tobytes(), scales.tobytes()])


def ncnn_int8(winograd: str | None) -> Factory:
    """ncnn int8 ``Convolution``: ``winograd`` ``"43"``/``"23"`` forces F(4,3)/F(2,3), ``None`` disables it.

    Without Winograd ncnn runs its im2col + int8 GEMM path (``use_sgemm_convolution``, the default).
    ``num_threads`` is set before loading: ncnn fixes its int8 GEMM tiling at pipeline creation.
    """

    def factory(x: np.ndarray, w: np.ndarray, b: np.ndarray, threads: int) -> Call:
        try:
            import ncnn
        except ImportError as e:
            raise Unavailable(f"ncnn not installed: {e}") from e
        net = ncnn.Net()
        opt = net.opt
        opt.use_vulkan_compute, opt.use_int8_inference, opt.num_threads = False, True, threads
        opt.use_winograd_convolution = winograd is not None
        opt.use_winograd23_convolution = winograd == "23"
        opt.use_winograd43_convolution = winograd == "43"
        opt.use_winograd63_convolution = False  # ncnn has no int8 F(6,3)
        param, weights = ncnn_files(x, w, b)
        with tempfile.TemporaryDirectory() as tmp:  # loading from a file copies the weights
            (p := Path(tmp, "conv.param")).write_text(param)
            (m := Path(tmp, "conv.bin")).write_bytes(weights)
            if net.load_param(str(p)) or net.load_model(str(m)):
                raise RuntimeError("ncnn could not load the generated int8 conv")
        x3 = np.ascontiguousarray(x[0])

        def call() -> np.ndarray:
            ex = net.create_extractor()
            ex.input("in0", ncnn.Mat(x3))
            ret, out = ex.extract("out0")
            if ret != 0:
                raise RuntimeError(f"ncnn extract failed ({ret})")
            return np.array(out)[None]

        call.net = net  # type: ignore[attr-defined]  # the net lives as long as the callable
        return call

    return factory


def set_preset(name: str) -> None:
    """Build our rows for target preset ``name``, ``best`` = ``host_preset(best=True)`` (raises
    ``TargetError`` naming the presets if unknown)."""
    from tvm_winoq.targets import get_preset, host_preset

    _STATE["preset"] = get_preset(host_preset(best=True).name if name == "best" else name).name


register_impl("torch-fp32", torch_fp32, min_sqnr_db=60.0, note="torch.nn.functional.conv2d, float32")
register_impl("torch-int8", torch_int8, note="quantize -> quantized::conv2d (x86 engine, prepacked) -> DQ")
register_impl("ort-int8", ort_int8, note="onnxruntime QuantizeLinear -> QLinearConv (u8s8) -> DQ")
register_impl("ncnn-int8-wino43", ncnn_int8("43"), note="ncnn int8 Convolution, Winograd F(4,3) forced")
register_impl("ncnn-int8-wino23", ncnn_int8("23"), note="ncnn int8 Convolution, Winograd F(2,3) forced")
register_impl("ncnn-int8-direct", ncnn_int8(None), note="ncnn int8 Convolution, Winograd off (im2col + GEMM)")


# ---------------------------------------------------------------------------------------- benchmark


@dataclass
class Row:
    """One (shape, threads, impl) result; ``speedup[p]`` = median of ``p`` / this row's median."""

    shape: str
    threads: int
    impl: str
    status: str  # ok | invalid | skipped | error
    reason: str = ""
    sqnr_db: float | None = None
    gop: float = 0.0
    median_ms: float | None = None
    min_ms: float | None = None
    gops: float | None = None
    cpu_per_wall: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    speedup: dict[str, float] = field(default_factory=dict)


def _build_and_check(impl: Impl, x: np.ndarray, w: np.ndarray, b: np.ndarray, ref: np.ndarray,
                     row: Row) -> Call | None:
    try:
        call = impl.factory(x, w, b, row.threads)
        y = np.asarray(call())
    except Unavailable as e:
        row.status, row.reason = "skipped", str(e)
        return None
    except Exception as e:  # noqa: BLE001  (a broken peer must not take the run down)
        row.status, row.reason = "error", f"{type(e).__name__}: {e}"[:300]
        return None
    row.sqnr_db = round(max(min(sqnr_db(ref, y), 999.0), -999.0), 2)
    if row.sqnr_db < impl.min_sqnr_db:
        row.status = "invalid"
        row.reason = (f"output shape {y.shape} != {ref.shape}, " if y.shape != ref.shape else "") + (
            f"SQNR {row.sqnr_db:.1f} dB < {impl.min_sqnr_db:g} dB")
        print(f"!!! INVALID {impl.name} {row.shape} threads={row.threads}: {row.reason}", file=sys.stderr)
    return call


def run_benchmark(shapes: Iterable[Shape | str], threads: Sequence[int] = (1, 2),
                  impls: Sequence[str] | None = None, *, repeat: int = 20, budget_s: float | None = 15.0,
                  seed: int = 0, gap_s: float = 2e-3, time_invalid: bool = False,
                  verbose: bool = True) -> dict[str, Any]:
    """Check, then time interleaved, every implementation on every shape and thread count.

    Parameters
    ----------
    shapes : iterable of Shape or str
        e.g. ``["64@56", "128@28"]``.
    threads : sequence of int
    impls : sequence of str, optional
        Registered names (default: all registered).
    repeat, budget_s, gap_s
        Passed to :func:`time_interleaved` for each (shape, threads) group.
    seed : int
        Seed of :func:`make_layer`.
    time_invalid : bool
        Also time INVALID rows (they stay marked INVALID).
    verbose : bool
        One progress line per group on stderr.

    Returns
    -------
    dict
        ``{"meta": {...}, "rows": [Row as dict, ...]}``, JSON-ready; see :func:`to_markdown`.
    """
    names = list(impls or registered_impls())
    if problem := unknown_impls_message(names):
        raise KeyError(problem)
    meta = system_info() | {"repeat": repeat, "budget_s": budget_s, "seed": seed, "gap_s": gap_s,
                            "impls": {n: _REGISTRY[n].note for n in names}}
    rows: list[Row] = []
    for shape in (parse_shape(s) if isinstance(s, str) else s for s in shapes):
        x, w, b = make_layer(shape, seed)
        ref = reference_conv(x, w, b)
        for t in threads:
            group = [Row(shape.label, t, n, "ok", gop=shape.ops / 1e9) for n in names]
            calls = {r.impl: c for r in group if (c := _build_and_check(_REGISTRY[r.impl], x, w, b, ref, r))
                     and (r.status == "ok" or time_invalid)}
            timings = time_interleaved(calls, repeat, budget_s=budget_s, gap_s=gap_s) if calls else {}
            for r in group:
                if tm := timings.get(r.impl):
                    med = float(np.median(tm.samples_s))
                    r.median_ms, r.min_ms, r.gops = med * 1e3, min(tm.samples_s) * 1e3, shape.ops / med / 1e9
                    r.cpu_per_wall = round(tm.cpu_per_wall, 2)
                    r.samples_ms = [round(s * 1e3, 4) for s in tm.samples_s]
            for r in group:
                r.speedup = {p.impl: round(p.median_ms / r.median_ms, 3) for p in group
                             if r.median_ms and p.median_ms and p is not r and p.status == "ok"}
            if verbose:
                cells = [f"{r.impl}={r.median_ms:.3f}ms" if r.median_ms else f"{r.impl}={r.status}"
                         for r in group]
                print(f"{shape.label} threads={t}: " + " ".join(cells), file=sys.stderr, flush=True)
            rows += group
            del calls, timings
    meta["loadavg_after"] = list(os.getloadavg())
    meta["measured_choices"] = dict(_STATE["choices"])
    return {"meta": meta, "rows": [asdict(r) for r in rows]}


# reports live in benchmarks/report.py (re-exported here); our rows in benchmarks/ours.py, which
# registers them after the peers once this module is complete
from benchmarks import ours  # noqa: E402,F401
from benchmarks.report import save_results, system_info, to_markdown  # noqa: E402,F401
