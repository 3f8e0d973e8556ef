"""Static estimate for Arm boards: cycles per output tile of our int8 Winograd GEMM against our int8
direct convolution, both on SDOT/SMMLA, from ``llvm-mca``: ``python -m benchmarks.arm_mca --help``.

For each preset (``rpi5``: Cortex-A76, ``+dotprod``; ``graviton3``: Neoverse-V1, ``+i8mm``) and layer
shape (3x3, stride 1, pad 1, C = K), three kernels are cross-compiled exactly as ``winoq compile``
builds them: the GEMM of F(4,3) and of F(6,3) (group-wise, groups of 32) and the packed int8 direct
kernel.  The innermost loop around the dot-product instruction of each is disassembled and handed to
``llvm-mca`` for cycles per iteration; with the int8 MACs per iteration that gives MAC/cycle, and

* Winograd F(m,3): ``(m + 2)^2 * C * K`` MACs per ``m x m`` output tile (all K channels);
* direct: ``9 * m^2 * C * K`` MACs for the same pixels,

so ``direct / F(m,3)`` is the GEMM's static speedup over direct for the multiplies.  Only the micro-
kernel loops are estimated: Winograd's input and output transforms (on x86 ~40-60% of a layer's time,
``speed-*.md``) and either kernel's loop overheads and stores are not, so the layer-level gain is
smaller.  LLVM 14 models these cores with its Cortex-A57 scheduling model: compare rows, not cores.

Example::

    python -m benchmarks.arm_mca --shapes 64@56 256@14 --markdown out.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tvm

from tvm_winoq.config import groupwise
from tvm_winoq.quant import plan_layer
from tvm_winoq.relax.direct import DirectSpec, direct_constants, direct_layer_module
from tvm_winoq.relax.kernels import KernelSpec, gemm_func
from tvm_winoq.relax.schedules import schedules_for
from tvm_winoq.targets import get_preset

from .aarch64_asm import count, disassemble, inner_loop, mca_cycles
from .peers import parse_shape

__all__ = ["CORES", "LoopEstimate", "estimate_layer", "main", "markdown"]

CORES = {"rpi5": "cortex-a76", "graviton3": "neoverse-v1"}  # preset -> llvm-mca -mcpu
MACS = {"sdot": 16, "smmla": 32}  # int8 multiply-adds per instruction


@dataclass(frozen=True)
class LoopEstimate:
    """One kernel's micro-kernel loop under ``llvm-mca`` and what it means per output tile."""

    preset: str
    cpu: str
    shape: str
    kernel: str  # "f4", "f6" or "direct"
    instruction: str
    instructions: int
    dots: int
    cycles: float  # per loop iteration
    macs_per_cycle: float
    tile_cycles: dict[int, float]  # m -> cycles per m x m output tile (all K), multiplies only


def _kernel_lib(preset: str, c: int, k: int, h: int, w: int, kernel: str, out: Path) -> Path:
    """Cross-compile one kernel (``f4``/``f6``: the GEMM; ``direct``) of the layer for ``preset``."""
    p = get_preset(preset)
    target = p.tvm_target()
    g = torch.Generator().manual_seed(0)
    x_shape = (1, c, h, w)
    wt = torch.randn(k, c, 3, 3, generator=g) * 0.1
    b = torch.randn(k, generator=g) * 0.1
    if kernel == "direct":
        spec = DirectSpec.of(x_shape, wt.shape, padding=(1, 1))
        mod, _ = direct_layer_module(spec, direct_constants(wt, b, groupwise(tile=4).direct), target)
    else:
        plan = plan_layer(wt, b, (1, 1), groupwise(tile=int(kernel[1:]), group=32))
        func = gemm_func(KernelSpec.from_plan(plan, x_shape)).with_attr("winoq.kernel", "gemm")
        family = schedules_for(target)
        mod = family.schedule_winoq_kernels(tvm.IRModule({"winoq_gemm": func.with_attr(
            "global_symbol", "winoq_gemm")}), target)
    return p.export_library(tvm.compile(mod, target=target), out / f"{preset}_{c}x{k}_{h}x{w}_{kernel}.so")


def estimate_layer(preset: str, shape: str, kernels: tuple[str, ...] = ("f4", "f6", "direct"),
                   workdir: Path | None = None) -> list[LoopEstimate]:
    """:class:`LoopEstimate` of each of ``kernels`` for one layer ``shape`` (``C@H``, ``CxK@HxW``).

    Raises
    ------
    ValueError
        For a preset without a core model here (:data:`CORES`) or a kernel without a dot-product loop.
    """
    if preset not in CORES:
        raise ValueError(f"no llvm-mca core for preset {preset!r}; known: {', '.join(CORES)}")
    sh = parse_shape(shape)
    c, k, h, w = sh.c, sh.k, sh.h, sh.w
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = workdir or Path(tmp)
        for kernel in kernels:
            code = disassemble(_kernel_lib(preset, c, k, h, w, kernel, out))
            # the i8mm GEMM falls back to sdot for odd tile counts (schedules/arm.py)
            ins = "smmla" if count([i for _, i in code], "smmla") else "sdot"
            loop = inner_loop(code, ins)
            if not loop:
                raise ValueError(f"{preset} {shape} {kernel}: no loop around {ins}")
            cyc = mca_cycles(loop, CORES[preset])
            dots = count(loop, ins)
            mpc = MACS[ins] * dots / cyc
            per_tile = {m: ((m + 2) ** 2 if kernel != "direct" else 9 * m * m) * c * k / mpc
                        for m in ((int(kernel[1:]),) if kernel != "direct" else (4, 6))}
            rows.append(LoopEstimate(preset, CORES[preset], shape, kernel, ins, len(loop), dots, cyc, mpc,
                                     per_tile))
    return rows


def markdown(rows: list[LoopEstimate]) -> str:
    """The estimates as a Markdown table, with ``direct / F(m,3)`` per Winograd row."""
    direct = {(r.preset, r.shape): r for r in rows if r.kernel == "direct"}
    lines = ["| preset (core) | shape | kernel | loop: instructions / dot | cycles / iteration "
             "| int8 MAC / cycle | cycles per output tile | direct / Winograd |", "|---" * 8 + "|"]
    for r in rows:
        d = direct.get((r.preset, r.shape))
        tiles = ", ".join(f"{m}x{m}: {v:.0f}" for m, v in r.tile_cycles.items())
        ratio = "" if r.kernel == "direct" or d is None else (
            f"{d.tile_cycles[int(r.kernel[1:])] / r.tile_cycles[int(r.kernel[1:])]:.2f}x")
        lines.append(f"| {r.preset} ({r.cpu}) | {r.shape} | {r.kernel} | {r.instructions} / {r.dots} "
                     f"{r.instruction} | {r.cycles:.1f} | {r.macs_per_cycle:.1f} | {tiles} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run :func:`estimate_layer` per preset and shape, print/write the table."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.arm_mca", description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(CORES), choices=list(CORES))
    ap.add_argument("--shapes", nargs="+", default=["64@56", "128@28", "256@14", "512@7"])
    ap.add_argument("--markdown", type=Path, help="write the table here")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    for shape in args.shapes:
        try:
            parse_shape(shape)
        except ValueError as e:
            ap.error(str(e))
    try:
        rows = [r for p in args.presets for s in args.shapes for r in estimate_layer(p, s)]
    except (RuntimeError, ValueError, subprocess.CalledProcessError) as e:  # no llvm-mca / binutils, no loop
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        import json

        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
