"""CUDA family: generated source of one Winograd layer (never needs a GPU).

* the GEMM kernel's CUDA source uses ``__dp4a`` (the input/output kernels do not), every float32
  division is ``__fdiv_rn`` (TVM compiles CUDA with ``--use_fast_math``, whose ``a / b`` is approximate)
  and the fma chain ``__fmaf_rn``;
* ``nvcc --ptx -arch=sm_80`` compiles it (skipped without nvcc): ``dp4a.s32.s32`` in the GEMM entries,
  no approximate division even with ``--use_fast_math``;
* a small model (two Winograd convs + BatchNorm/ReLU/pool/linear through dlight) builds for
  ``cuda-sm80``;
* the CUDA-scheduled TIR, serialized (thread loops -> serial loops, ``__dp4a``/``__fdiv_rn``/``__fmaf_rn``
  -> plain TIR), runs on the CPU bit-exactly against the PyTorch reference trace: this checks the
  schedules' data partitioning (regions, compute-at, packed ``U``, accumulators) without a GPU.  It
  cannot see races; the schedules are written so that no thread reads what another thread of the
  same launch wrote (stages communicate through global memory across launches).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")
import tvm_ffi  # noqa: E402
from tvm import tirx  # noqa: E402

from tvm_winoq.config import groupwise  # noqa: E402
from tvm_winoq.quant import plan_layer, winograd_conv2d_int  # noqa: E402
from tvm_winoq.quant.plan import WinogradLayerPlan  # noqa: E402
from tvm_winoq.relax.build import LayerExecutable  # noqa: E402
from tvm_winoq.relax.kernels import KernelSpec, gemm_func, input_func, layer_constants, output_func  # noqa: E402
from tvm_winoq.relax.schedules import family_for, load_family  # noqa: E402
from tvm_winoq.targets import get_preset  # noqa: E402

pytestmark = pytest.mark.tvm

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
C = K = 64
HW = 14
CPU = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}


# ------------------------------------------------------------------------------------------- helpers
def _plan(tile: int, c: int = C, k: int = K, hw: int = HW, pad: int = 1, batch: int = 1, group: int = 32,
          seed: int = 0) -> tuple[WinogradLayerPlan, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, hw, hw, generator=g)
    w = torch.randn(k, c, 3, 3, generator=g) * 0.1
    b = torch.randn(k, generator=g) * 0.1
    return plan_layer(w, b, (pad, pad), groupwise(tile=tile, group=group)), x


def scheduled_layer(plan: WinogradLayerPlan, x_shape: tuple[int, ...], debug: bool) -> tvm.IRModule:
    """The three kernels of one layer with the CUDA family's schedules."""
    target = get_preset("cuda-sm80").tvm_target()
    assert family_for(target) == "cuda"
    spec = KernelSpec.from_plan(plan, x_shape)
    funcs = {"winoq_input": input_func(spec, debug), "winoq_gemm": gemm_func(spec, debug),
             "winoq_output": output_func(spec, debug)}
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n).with_attr("winoq.kernel", n[6:])
                        for n, f in funcs.items()})
    return load_family("cuda").schedule_winoq_kernels(mod, target)


def _modules(mod: tvm.runtime.Module) -> Iterator[tvm.runtime.Module]:
    yield mod
    for sub in mod.imports:
        yield from _modules(sub)


def cuda_source(executable: object) -> str:
    """CUDA C source of a built executable (TVM compiles it with NVRTC/nvcc only when loaded)."""
    return next(m for m in _modules(executable.mod) if m.kind == "cuda").inspect_source()  # type: ignore[attr-defined]


def kernel_bodies(src: str) -> dict[str, str]:
    """``{kernel name: source}`` of every ``__global__`` definition."""
    heads = list(re.finditer(r'^extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(.*\) \{$',
                             src, re.M))
    return {m.group(1): src[m.start():(heads[i + 1].start() if i + 1 < len(heads) else len(src))]
            for i, m in enumerate(heads)}


def ptx_entries(ptx: str) -> dict[str, str]:
    """``{entry name: PTX}`` of every ``.entry``."""
    heads = list(re.finditer(r"^\.visible \.entry (\w+)\(", ptx, re.M))
    return {m.group(1): ptx[m.start():(heads[i + 1].start() if i + 1 < len(heads) else len(ptx))]
            for i, m in enumerate(heads)}


@pytest.fixture(scope="module")
def layers() -> dict[tuple[int, bool], str]:
    """CUDA source of F(4,3) and F(6,3) layers, production and debug kernels."""
    out = {}
    target = get_preset("cuda-sm80").tvm_target()
    for tile in (4, 6):
        plan, x = _plan(tile)
        for debug in (False, True):
            mod = scheduled_layer(plan, tuple(x.shape), debug)
            out[tile, debug] = cuda_source(tvm.compile(mod, target=target))
    return out


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("tile", [4, 6])
def test_gemm_kernel_uses_dp4a(layers: dict, tile: int, debug: bool) -> None:
    kernels = kernel_bodies(layers[tile, debug])
    gemm = {n: b for n, b in kernels.items() if n.startswith("winoq_gemm")}
    assert gemm and any("__dp4a(" in b for b in gemm.values()), "no __dp4a in the GEMM kernels"
    assert not any("__dp4a(" in b for n, b in kernels.items() if n not in gemm)
    assert any("__fmaf_rn(" in b for b in gemm.values())  # the dequantization fma chain
    # every float division of the quantizers is IEEE (input: x, V; output: M)
    for stage in ("winoq_input", "winoq_output"):
        assert any("__fdiv_rn(" in b for n, b in kernels.items() if n.startswith(stage))


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("tile", [4, 6])
def test_nvcc_compiles_to_ptx(layers: dict, tile: int, tmp_path: Path) -> None:
    for debug in (False, True):
        cu = tmp_path / f"winoq_f{tile}_{int(debug)}.cu"
        cu.write_text(layers[tile, debug])
        for flags in ([], ["--use_fast_math"]):  # plain, and the way TVM compiles CUDA
            ptx = tmp_path / "out.ptx"
            res = subprocess.run([NVCC, "--ptx", "-arch=sm_80", *flags, str(cu), "-o", str(ptx)],
                                 capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-2000:]
            entries = ptx_entries(ptx.read_text())
            gemm = [b for n, b in entries.items() if n.startswith("winoq_gemm")]
            assert any("dp4a.s32.s32" in b for b in gemm), "no dp4a in the GEMM's PTX"
            text = ptx.read_text()
            assert "div.rn" in text and not re.search(r"div\.(approx|full)\.", text), flags


@pytest.mark.slow
def test_model_builds_for_cuda() -> None:
    """Relax flow: Winograd convs on our CUDA kernels, the other operators through dlight."""
    from torch import nn

    from tvm_winoq.relax.build import compile_model

    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10)).eval()
    cm = compile_model(model, torch.randn(1, 32, 16, 16), groupwise(tile=4),
                       target=get_preset("cuda-sm80").tvm_target())
    assert sum(r.rewritten for r in cm.records) == 2
    kernels = kernel_bodies(cuda_source(cm.executable))
    assert sum("__dp4a(" in b for n, b in kernels.items() if n.startswith("winoq_gemm")) == 2
    assert any(not n.startswith("winoq_") for n in kernels)  # dlight-scheduled operators


# ------------------------------------------------------------------------ serialized run on the CPU
def _sext8(word: tirx.PrimExpr, i: int) -> tirx.PrimExpr:
    """Byte ``i`` of an int32, sign-extended."""
    return tirx.shift_right(tirx.shift_left(word, tirx.const(24 - 8 * i, "int32")), tirx.const(24, "int32"))


def serialize(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The CUDA-scheduled ``func`` as a sequential CPU program: thread-bound loops become serial loops
    and the CUDA intrinsics plain TIR (``__dp4a`` byte products, ``a / b``, ``fma``).

    ``tirx.noalias`` is dropped: LLVM miscompiles the serialized debug GEMM with it (the emulated
    ``__dp4a`` reinterprets int8x4 loads; half of the accumulators come out wrong, bit exact without
    it). The CUDA kernels keep the attribute; nvcc never sees this CPU program."""
    extern = tvm.ir.Op.get("tirx.call_pure_extern")

    def _for(f: tirx.For) -> tirx.For:
        if f.kind != tirx.ForKind.THREAD_BINDING:
            return f
        return tirx.For(f.loop_var, f.min, f.extent, tirx.ForKind.SERIAL, f.body, None, f.annotations)

    def _call(e: tvm.ir.Call) -> tirx.PrimExpr:
        if not e.op.same_as(extern):
            return e
        name, *args = e.args
        if name.value == "__fdiv_rn":
            return args[0] / args[1]
        if name.value == "__fmaf_rn":
            return tirx.call_intrin("float32", "tirx.fma", *args)
        if name.value == "__dp4a":
            a, b = (tirx.call_intrin("int32", "tirx.reinterpret", v) for v in args[:2])
            out = args[2]
            for i in range(4):
                out = out + _sext8(a, i) * _sext8(b, i)
            return out
        return e

    serial = tvm_ffi.structural_map(func, [(tirx.For, _for), (tvm.ir.Call, _call)])
    return serial.without_attr("tirx.noalias")


SERIAL_CASES = [  # tile, C, K, H = W, pad, batch, group
    (4, 64, 64, 14, 1, 1, 32),
    (6, 64, 64, 14, 1, 1, 32),
    (2, 32, 40, 9, 1, 2, 8),
    (6, 96, 200, 11, 0, 1, 16),  # K > 128 threads: two channel blocks
    (4, 48, 64, 14, 1, 1, 32),  # partial last group: no dp4a, one thread per tile in ``input``
]


@pytest.mark.slow
@pytest.mark.parametrize("debug", [True, False])
@pytest.mark.parametrize(("tile", "c", "k", "hw", "pad", "batch", "group"), SERIAL_CASES)
def test_cuda_schedules_serialized_are_bit_exact_on_cpu(tile: int, c: int, k: int, hw: int, pad: int,
                                                       batch: int, group: int, debug: bool) -> None:
    """Debug kernels: every integer intermediate; production kernels: ``m_f`` and ``y``."""
    plan, x = _plan(tile, c, k, hw, pad, batch, group)
    y, trace = winograd_conv2d_int(x, plan, return_trace=True)
    mod = scheduled_layer(plan, tuple(x.shape), debug=debug)
    text = mod.script()
    assert "threadIdx.x" in text and ("__dp4a" in text) == (c % group == 0)
    mod = tvm.IRModule({gv: serialize(f) for gv, f in mod.functions.items()})
    lib = tvm.compile(mod, target=tvm.target.Target(CPU)).jit()
    spec = KernelSpec.from_plan(plan, tuple(x.shape))
    out = LayerExecutable(spec, lib, layer_constants(plan), debug)(x)
    for name in ("v_q", "s_x", "s_v", "m_f") + (("acc", "m_q", "s_m") if debug else ()):
        ref = getattr(trace, name).numpy()
        got = out[name].reshape(ref.shape)
        what = f"F({tile},3) C={c} {name}"
        assert np.array_equal(got, ref), f"{what}: {np.sum(got != ref)} of {ref.size} differ"
    err = np.abs(out["y"] - y.numpy()).max() / np.abs(y.numpy()).max()
    assert err < 1e-5, f"y: max relative error {err}"
