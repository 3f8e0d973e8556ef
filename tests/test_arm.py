"""Arm family: the Winograd GEMM tensorized to SDOT/SMMLA, cross-compiled and run on the emulated board.

* the libraries of one layer (F(4,3) and F(6,3), C = K = 64 at 14x14, groups of 32) built for ``rpi5``
  (dotprod) and ``graviton3`` (dotprod + i8mm) contain ``sdot`` / ``smmla`` in the GEMM's code (the
  exported ``__tvm_ffi_winoq_gemm`` up to the next exported kernel: its parallel bodies are unnamed
  internal functions that LLVM places right after it) and nowhere else;
* on the emulated board (qemu ``-cpu max``) the debug kernels reproduce the PyTorch reference trace bit
  for bit (``v_q``, ``acc``, ``m_f``, ``m_q`` and the scales; ``y`` to float32 rounding), for rpi5, for
  graviton3, and for rpi4 (NEON only: the ``cpu`` family, on a ``cortex-a72`` board: no dot product);
* optionally ``llvm-mca`` estimates the cycles of the GEMM inner loop on a Cortex-A76.

Needs ``aarch64-linux-gnu-gcc`` (cross compile) and ``aarch64-linux-gnu-objdump``; the board tests need
the emulated board (:mod:`tvm_winoq.board`; skipped when its Debian packages are missing).
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from benchmarks.aarch64_asm import (  # noqa: E402
    OBJDUMP,
    count,
    disassemble,
    function_code,
    inner_loop,
    mca,
    mca_cycles,
)
from tvm_winoq.config import groupwise  # noqa: E402
from tvm_winoq.errors import DeviceError  # noqa: E402
from tvm_winoq.quant import plan_layer, winograd_conv2d_int  # noqa: E402
from tvm_winoq.quant.plan import WinogradLayerPlan  # noqa: E402
from tvm_winoq.relax.kernels import KernelSpec, gemm_func, input_func, layer_constants, output_func  # noqa: E402
from tvm_winoq.relax.schedules import family_for, schedules_for  # noqa: E402
from tvm_winoq.rpc import connect  # noqa: E402
from tvm_winoq.targets import TargetPreset, get_preset  # noqa: E402

pytestmark = [
    pytest.mark.tvm,
    pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="no aarch64 cross gcc "
                       "(apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)"),
]
needs_objdump = pytest.mark.skipif(OBJDUMP is None,
                                   reason="no aarch64-linux-gnu-objdump (binutils-aarch64-linux-gnu)")

C = K = 64
HW = 14
GROUP = 32
INTEGER = ("v_q", "acc", "m_q")
FLOATS = ("s_x", "s_v", "m_f", "s_m")  # bit-exact as well (same float ops, explicit fma)


# ------------------------------------------------------------------------------------------- helpers
@dataclass
class Layer:
    """One cross-compiled Winograd layer and its PyTorch reference."""

    tile: int
    preset: str
    debug: bool
    path: Path
    spec: KernelSpec
    consts: dict[str, np.ndarray]
    x: np.ndarray
    y: np.ndarray
    trace: object


@dataclass(frozen=True)
class Shape:
    """A layer instance: ``F(tile, 3)``, channels, square input, padding, batch, channel group."""

    tile: int
    c: int = C
    k: int = K
    hw: int = HW
    pad: int = 1
    batch: int = 1
    group: int = GROUP

    @property
    def name(self) -> str:
        return f"f{self.tile}_c{self.c}_k{self.k}_{self.hw}_p{self.pad}_n{self.batch}_g{self.group}"


def _plan(shape: Shape, seed: int = 0) -> tuple[WinogradLayerPlan, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.batch, shape.c, shape.hw, shape.hw, generator=g)
    w = torch.randn(shape.k, shape.c, 3, 3, generator=g) * 0.1
    b = torch.randn(shape.k, generator=g) * 0.1
    return plan_layer(w, b, (shape.pad, shape.pad), groupwise(tile=shape.tile, group=shape.group)), x


def build_layer(tile: int | Shape, preset_name: str, out: Path, debug: bool = False) -> Layer:
    """Schedule the three kernels of one layer (``F(tile, 3)`` at the default shape, or a :class:`Shape`)
    with ``preset``'s family and export an aarch64 library."""
    shape = tile if isinstance(tile, Shape) else Shape(tile)
    preset: TargetPreset = get_preset(preset_name)
    target = preset.tvm_target()
    plan, x = _plan(shape)
    spec = KernelSpec.from_plan(plan, tuple(x.shape))
    funcs = {"winoq_input": input_func(spec, debug), "winoq_gemm": gemm_func(spec, debug),
             "winoq_output": output_func(spec, debug)}
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n).with_attr("winoq.kernel", n[6:])
                        for n, f in funcs.items()})
    family = schedules_for(target)
    assert family is not None
    mod = family.schedule_winoq_kernels(mod, target)
    path = preset.export_library(tvm.compile(mod, target=target),
                                 out / f"winoq_{shape.name}_{preset_name}{'_debug' if debug else ''}.so")
    y, trace = winograd_conv2d_int(x, plan, return_trace=True)
    return Layer(shape.tile, preset_name, debug, path, spec, layer_constants(plan), x.numpy(), y.numpy(),
                 trace)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_board(remote: object, layer: Layer) -> dict[str, np.ndarray]:
    """Upload ``layer`` and run its three (debug) kernels on the board; every produced tensor by name."""
    s = layer.spec
    p, t, c, k = s.positions, s.tiles, s.in_channels, s.out_channels
    shapes = {"v_q": ((p, t, c), s.v.dtype), "s_v": (s.sv_shape, "float32"), "s_x": ((1,), "float32"),
              "acc": ((p, t, k, s.gemm_groups), "int32"), "m_f": ((p, t, k), "float32"),
              "m_q": ((p, t, k), s.m_quant.dtype), "s_m": (s.sm_shape, "float32"),
              "y": (s.out_shape, "float32")}
    remote.upload(str(layer.path), target=layer.path.name)  # type: ignore[attr-defined]
    lib = remote.load_module(layer.path.name)  # type: ignore[attr-defined]
    dev = remote.cpu(0)  # type: ignore[attr-defined]
    b = {n: tvm.runtime.tensor(np.zeros(sh, dt), dev) for n, (sh, dt) in shapes.items()}
    b["x"] = tvm.runtime.tensor(np.ascontiguousarray(layer.x, np.float32), dev)
    b |= {n: tvm.runtime.tensor(v, dev) for n, v in layer.consts.items()}
    lib["winoq_input"](b["x"], b["v_q"], b["s_v"], b["s_x"])
    lib["winoq_gemm"](b["v_q"], b["s_v"], b["u_q"], b["s_u"], b["acc"], b["m_f"])
    lib["winoq_output"](b["m_f"], b["s_x"], b["bias"], b["m_q"], b["s_m"], b["y"])
    return {n: b[n].numpy() for n in shapes}


def check_trace(out: dict[str, np.ndarray], layer: Layer) -> None:
    """Integer tensors and scales bit for bit, ``y`` to float32 rounding."""
    for name in INTEGER + FLOATS:
        ref = getattr(layer.trace, name).numpy()
        got = out[name].reshape(ref.shape)
        assert got.dtype == ref.dtype or name in ("s_x", "s_v", "s_m"), f"{name}: {got.dtype} vs {ref.dtype}"
        what = f"{layer.preset} F({layer.tile},3) {name}"
        assert np.array_equal(got, ref), f"{what}: {np.sum(got != ref)} of {ref.size} differ"
    err = np.abs(out["y"] - layer.y).max() / np.abs(layer.y).max()
    assert err < 1e-5, f"y: max relative error {err}"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def libdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arm")


@pytest.fixture(scope="module")
def layers(libdir: Path) -> Callable[[int, str], Layer]:
    """Production libraries, built on first use."""
    cache: dict[tuple[int, str], Layer] = {}

    def get(tile: int, preset: str) -> Layer:
        if (tile, preset) not in cache:
            cache[tile, preset] = build_layer(tile, preset, libdir)
        return cache[tile, preset]

    return get


@pytest.fixture(scope="module")
def debug_layers(libdir: Path) -> dict[tuple[int, str], Layer]:
    """Debug libraries (integer intermediates as outputs) for the board runs."""
    return {(tile, name): build_layer(tile, name, libdir, debug=True)
            for tile in (4, 6) for name in ("rpi5", "graviton3", "rpi4")}


def _start_board(cpu: str, port: int) -> dict:
    from tvm_winoq.board import board_start

    try:
        return board_start(cpu=cpu, port=port)
    except DeviceError as exc:
        if "sudo apt-get" in str(exc):  # not root and the Debian packages are missing
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module")
def board_max() -> Iterator[dict]:
    from tvm_winoq.board import board_stop

    port = _free_port()
    try:
        yield _start_board("max", port)
    finally:
        board_stop(port)


@pytest.fixture(scope="module")
def board_a72() -> Iterator[dict]:
    from tvm_winoq.board import board_stop

    port = _free_port()
    try:
        yield _start_board("cortex-a72", port)
    finally:
        board_stop(port)


# --------------------------------------------------------------------------------------------- tests
def test_family_selection() -> None:
    assert family_for(get_preset("rpi5").tvm_target()) == "arm"
    assert family_for(get_preset("graviton3").tvm_target()) == "arm"
    assert family_for(get_preset("rpi4").tvm_target()) == "cpu"


@needs_objdump
@pytest.mark.slow
@pytest.mark.parametrize("tile", [4, 6])
@pytest.mark.parametrize("preset", ["rpi5", "graviton3"])
def test_gemm_uses_dot_product_instructions(tile: int, preset: str, layers: Callable) -> None:
    """Production kernels: sdot (rpi5) / smmla (graviton3) in the GEMM's code and nowhere else."""
    layer = layers(tile, preset)
    gemm, rest = function_code(layer.path, "__tvm_ffi_winoq_gemm")
    spec = layer.spec
    smmla = preset == "graviton3" and spec.tiles % 2 == 0  # the i8mm kernel pairs tiles (else sdot)
    ins = "smmla" if smmla else "sdot"
    # one instruction per (4 channels x 4 output channels) or (8 channels x 2 x 2): at least the
    # whole group reduction of one register block is unrolled into the loop body
    assert count(gemm, ins) >= (GROUP // 8 if smmla else GROUP // 4), f"no {ins} in the GEMM"
    assert count(rest, "sdot") == count(rest, "smmla") == 0, "dot products outside the GEMM"
    if preset == "rpi5":
        assert count(gemm, "smmla") == 0  # rpi5 (Cortex-A76) has no i8mm


@needs_objdump
@pytest.mark.slow
def test_rpi4_gets_the_cpu_family_without_dot_products(debug_layers: dict) -> None:
    for tile in (4, 6):
        code = [ins for _, ins in disassemble(debug_layers[tile, "rpi4"].path)]
        assert code and count(code, "sdot") == count(code, "smmla") == 0


@pytest.mark.board
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["rpi5", "graviton3"])
def test_debug_kernels_bit_exact_on_board(preset: str, debug_layers: dict, board_max: dict) -> None:
    """rpi5 (sdot) and graviton3 (smmla where the tiles pair up) on qemu ``-cpu max``."""
    remote = connect(rpc=board_max["rpc"], timeout=60, session_timeout=600)
    for tile in (4, 6):
        layer = debug_layers[tile, preset]
        if OBJDUMP:
            gemm, _ = function_code(layer.path, "__tvm_ffi_winoq_gemm")
            assert count(gemm, "sdot") + count(gemm, "smmla") > 0
        check_trace(run_on_board(remote, layer), layer)


# (shape, GEMM micro-kernel on rpi5, on graviton3)
MORE_SHAPES = [
    (Shape(2, c=32, k=40, hw=9, batch=2, group=8), "sdot", "smmla"),  # 4x4 sdot, K = 40: 8-wide blocks
    (Shape(6, c=96, k=32, hw=11, pad=0, group=16), "sdot", "smmla"),  # 4x16 sdot, 4 tiles
    (Shape(4, c=48, k=24, hw=10, group=32), None, None),  # partial last group: the cpu GEMM
]


@pytest.mark.board
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["rpi5", "graviton3"])
def test_more_shapes_bit_exact_on_board(preset: str, libdir: Path, board_max: dict) -> None:
    """Other micro-kernel variants and the fallback: groups of 8/16, batch 2, K not a multiple of 16."""
    remote = connect(rpc=board_max["rpc"], timeout=60, session_timeout=600)
    for shape, rpi5_ins, graviton_ins in MORE_SHAPES:
        layer = build_layer(shape, preset, libdir, debug=True)
        if OBJDUMP:
            gemm, rest = function_code(layer.path, "__tvm_ffi_winoq_gemm")
            ins = rpi5_ins if preset == "rpi5" else graviton_ins
            for mnemonic in ("sdot", "smmla"):
                assert (count(gemm, mnemonic) > 0) == (mnemonic == ins), (shape, mnemonic)
                assert count(rest, mnemonic) == 0
        check_trace(run_on_board(remote, layer), layer)


@pytest.mark.board
@pytest.mark.slow
def test_rpi4_kernels_bit_exact_on_cortex_a72_board(debug_layers: dict, board_a72: dict) -> None:
    """NEON-only code (the ``cpu`` family) on a core without dot product: bit exact as well."""
    remote = connect(rpc=board_a72["rpc"], timeout=60, session_timeout=600)
    for tile in (4, 6):
        layer = debug_layers[tile, "rpi4"]
        check_trace(run_on_board(remote, layer), layer)


@pytest.mark.board
@pytest.mark.slow
def test_relax_model_on_board(board_max: dict, libdir: Path) -> None:
    """The Relax flow for rpi5 (conv -> our sdot kernels, ReLU -> the cpu family) in the board's VM,
    against the same model built for this host (integer stages equal; floats to rounding)."""
    from torch import nn

    from tvm_winoq.relax.build import compile_model
    from tvm_winoq.rpc import remote_bench

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, K, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 32, 16, 16)
    rpi5 = get_preset("rpi5")
    cm = compile_model(model, x, groupwise(tile=4), target=rpi5.tvm_target())
    assert [r.rewritten for r in cm.records] == [True]
    lib = rpi5.export_library(cm.executable, libdir / "model_rpi5.so")
    if OBJDUMP:
        assert count([ins for _, ins in disassemble(lib)], "sdot") > 0
    res = remote_bench(lib, [x.numpy()], rpc=board_max["rpc"], timeout=60, number=1, repeat=1)
    host = compile_model(model, x, groupwise(tile=4), target={"kind": "llvm", "num-cores": 2}).runner()(x)
    got = res["outputs"][0]
    assert got.shape == host.shape
    assert np.abs(got - host).max() <= 1e-5 * np.abs(host).max()


@needs_objdump
@pytest.mark.slow
@pytest.mark.skipif(mca() is None, reason="no llvm-mca")
@pytest.mark.parametrize(("preset", "ins", "cpu", "macs"),
                         [("rpi5", "sdot", "cortex-a76", 16), ("graviton3", "smmla", "neoverse-v1", 32)])
def test_llvm_mca_estimate_of_the_gemm_loop(layers: Callable, preset: str, ins: str, cpu: str,
                                            macs: int) -> None:
    """Cycles per iteration of the GEMM's innermost sdot/smmla loop (llvm-mca; LLVM 14 models these
    cores with its Cortex-A57 scheduling model, so take the numbers as rough)."""
    loop = inner_loop(disassemble(layers(4, preset).path), ins)
    assert loop, f"no loop around the {ins} micro-kernel"
    cyc = mca_cycles(loop, cpu)
    n = count(loop, ins)
    print(f"\nllvm-mca {cpu}: {len(loop)} instructions, {n} {ins}, {cyc:.1f} cycles/iteration, "
          f"{macs * n / cyc:.1f} int8 MAC/cycle")
    assert n > 0 and cyc > 0
