"""x86 family: the GEMM's int8 reduction on ``vpmaddwd`` (AVX2) / ``vpdpwssd`` (AVX-512 VNNI).

The instructions are checked in the exported library of each x86 preset (any x86-64 host can compile
for both); the kernels run, bit exact against the PyTorch integer reference, on the presets this host
can execute (AVX2 everywhere in CI; the AVX-512 preset where the CPU has it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm

from tvm_winoq.config import groupwise
from tvm_winoq.quant import plan_layer, winograd_conv2d_int
from tvm_winoq.relax.build import compile_layer
from tvm_winoq.relax.gemm import GemmShape, gemm_kernel
from tvm_winoq.relax.kernels import KernelSpec, gemm_func
from tvm_winoq.relax.schedules import family_for, schedules_for
from tvm_winoq.targets import get_preset

pytestmark = [pytest.mark.tvm,
              pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump (binutils)")]

# AVX-512 VNNI: LLVM fuses vpmaddwd + vpaddd into vpdpwssd unless it reassociates the adds (group 16)
INSTR = {"host-avx2": ("vpmaddwd",), "x86-avx512-vnni": ("vpdpwssd", "vpmaddwd")}
SHAPES = [  # tile, C, K, H = W, pad, batch, group
    (4, 64, 64, 14, 1, 1, 32),
    (2, 32, 40, 9, 1, 2, 8),  # K = 40: not a multiple of 16 lanes (AVX-512: the cpu GEMM)
    (6, 96, 32, 11, 0, 1, 16),
    (4, 48, 24, 10, 1, 1, 32),  # partial last group: the cpu GEMM everywhere
]


def _host_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


RUNNABLE = {"host-avx2": {"avx2", "fma"}, "x86-avx512-vnni": {"avx512bw", "avx512_vnni"}}


def _plan(tile: int, c: int, k: int, hw: int, pad: int, batch: int, group: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c, hw, hw, generator=g)
    w = torch.randn(k, c, 3, 3, generator=g) * 0.1
    b = torch.randn(k, generator=g) * 0.1
    return plan_layer(w, b, (pad, pad), groupwise(tile=tile, group=group)), x


def _mnemonics(lib: Path) -> list[str]:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    return [m.group(1) for m in re.finditer(r"^\s+[0-9a-f]+:\s+(\S+)", out, re.M)]


def test_x86_presets_use_the_x86_family() -> None:
    for name in INSTR:
        assert family_for(get_preset(name).tvm_target()) == "x86"
    assert family_for(get_preset("rpi4").tvm_target()) == "cpu"


@pytest.mark.parametrize("preset", list(INSTR))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "f{}_c{}_k{}".format(*s[:3]))
def test_gemm_instructions(preset: str, shape: tuple, tmp_path: Path) -> None:
    """The micro-kernel's instruction where the shape allows it, never the cpu GEMM's ``vpmulld``."""
    plan, x = _plan(*shape)
    target = get_preset(preset).tvm_target()
    lanes = schedules_for(target).gemm_lanes(target)
    spec = KernelSpec.from_plan(plan, tuple(x.shape))
    mod = tvm.IRModule({"winoq_gemm": gemm_func(spec).with_attr("global_symbol", "winoq_gemm")
                        .with_attr("winoq.kernel", "gemm")})
    mod = schedules_for(target).schedule_winoq_kernels(mod, target)
    lib = tmp_path / "gemm.so"
    tvm.compile(mod, target=target).export_library(str(lib))
    ins = _mnemonics(lib)
    _, c, k, _, _, _, group = shape
    tensorized = c % group == 0 and k % lanes == 0
    assert any(i in ins for i in INSTR[preset]) == tensorized, (preset, shape, lanes)
    if tensorized and preset == "x86-avx512-vnni" and shape[0] == 4:
        assert "vpdpwssd" in ins
    assert ("vpmulld" in ins) == (not tensorized)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(INSTR))
def test_kernels_bit_exact_on_this_host(preset: str) -> None:
    """Debug kernels (every integer intermediate) and production kernels against the reference."""
    if not RUNNABLE[preset] <= _host_flags():
        pytest.skip(f"this CPU cannot run {preset} code")
    target = get_preset(preset).tvm_target()
    for shape in SHAPES:
        plan, x = _plan(*shape)
        y, trace = winograd_conv2d_int(x, plan, return_trace=True)
        for debug in (True, False):
            out = compile_layer(plan, tuple(x.shape), target, debug=debug)(x)
            for name in ("v_q", "s_v", "m_f") + (("acc", "m_q", "s_m") if debug else ()):
                ref = getattr(trace, name).numpy()
                got = out[name].reshape(ref.shape)
                assert np.array_equal(got, ref), f"{preset} {shape} {name}: {np.sum(got != ref)} differ"
            err = np.abs(out["y"] - y.numpy()).max() / np.abs(y.numpy()).max()
            assert err < 1e-5, f"{preset} {shape} y: {err}"


def test_gemm_reads_widened_operands(tmp_path: Path) -> None:
    """The tensorized GEMM works on int16 copies (``vq_wide`` per tile block, ``uq_wide`` packed once):
    each tile's channel pair is one ``vpbroadcastd`` from memory, no shuffle in the loop."""
    plan, x = _plan(*SHAPES[0])
    target = get_preset("host-avx2").tvm_target()
    spec = KernelSpec.from_plan(plan, tuple(x.shape))
    mod = tvm.IRModule({"winoq_gemm": gemm_func(spec).with_attr("global_symbol", "winoq_gemm")
                        .with_attr("winoq.kernel", "gemm")})
    fam = schedules_for(target)
    assert fam.widen_gemm(mod["winoq_gemm"]) is not None
    mod = fam.schedule_winoq_kernels(mod, target)
    script = mod["winoq_gemm"].script()
    assert 'sblock("vq_wide")' in script and 'sblock("uq_wide")' in script
    lib = tmp_path / "gemm.so"
    tvm.compile(mod, target=target).export_library(str(lib))
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    assert re.search(r"vpbroadcastd\s+(-?0x[0-9a-f]+)?\(%", asm), "no broadcast from memory"
    # a kernel that is not exactly the generator's plain gemm (here: one already widened) is refused
    shape = GemmShape(spec.positions, spec.tiles, spec.in_channels, spec.out_channels, spec.gemm_group,
                      spec.gemm_groups, spec.sv_shape[2], spec.v.group, spec.v.dtype)
    assert fam.widen_gemm(gemm_kernel(shape, widen=True).with_attr("winoq.kernel", "gemm")) is None
