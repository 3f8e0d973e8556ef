"""Arm family: the int8 direct conv on weights packed at compile time, reduced on SDOT.

* the ``arm`` family's ``prepack_direct`` hook packs dense convs for ``+dotprod`` targets with a signed
  ``int8`` input (``sdot`` is signed x signed: no offset, ``w_c = 0``) and declines without it;
* the cross-compiled kernel (rpi5, graviton3) has ``sdot`` in its code, rpi4's none;
* on the emulated board (qemu ``-cpu max``) the kernel's output equals the PyTorch integer reference
  to well under one accumulator step (the same int32 sums) for 3x3, stride 2, 1x1 and the 3-channel
  7x7 stem; a Relax model with ``ineligible="direct"`` runs there like the host build;
* ``benchmarks/arm_mca.py``'s static estimate (``llvm-mca``) of the direct and Winograd loops.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from rpc_servers import emulated_board  # noqa: E402
from test_direct_vnni import _case  # noqa: E402  (the same layers and inputs)

from benchmarks.aarch64_asm import OBJDUMP, count, function_code, mca, tool  # noqa: E402
from tvm_winoq.config import default_config, groupwise  # noqa: E402
from tvm_winoq.quant.baselines import direct_conv2d_int8  # noqa: E402
from tvm_winoq.relax.direct import (  # noqa: E402
    DirectPacking,
    DirectSpec,
    direct_constants,
    direct_func,
    direct_layer_module,
)
from tvm_winoq.relax.schedules import load_family  # noqa: E402
from tvm_winoq.rpc import connect  # noqa: E402
from tvm_winoq.targets import get_preset  # noqa: E402

pytestmark = [
    pytest.mark.tvm,
    pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="no aarch64 cross gcc "
                       "(apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)"),
]
needs_objdump = pytest.mark.skipif(OBJDUMP is None,
                                   reason="no aarch64-linux-gnu-objdump (binutils-aarch64-linux-gnu)")

RPI5 = get_preset("rpi5").tvm_target()
CASES = [  # C, K, H, W, kernel, stride, pad
    (64, 64, 14, 14, 3, 1, 1),
    (32, 48, 9, 11, 3, 2, 1),  # stride 2, K = 48, 5 x 6 outputs
    (16, 36, 8, 8, 1, 1, 0),  # 1x1, K = 36: blocks of 4
    (3, 64, 20, 20, 7, 2, 3),  # ResNet's stem: 3 input channels, padded to a quad
]
IDS = [f"c{c}k{k}_{h}x{w}_{ks}x{ks}s{s}" for c, k, h, w, ks, s, _ in CASES]


def _build(case: tuple, preset: str, out: Path) -> tuple[Path, dict[str, np.ndarray], DirectSpec]:
    """Cross-compile the layer's direct kernel for ``preset``: (library, its constants, spec)."""
    _, wt, b, spec = _case(*case)
    p = get_preset(preset)
    mod, consts = direct_layer_module(spec, direct_constants(wt, b, default_config(4).direct), p.tvm_target())
    name = f"direct_{preset}_{'_'.join(map(str, case))}.so"
    return p.export_library(tvm.compile(mod, target=p.tvm_target()), out / name), consts, spec


@pytest.fixture(scope="module")
def libdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arm_direct")


@pytest.fixture(scope="module")
def remote() -> Iterator[object]:
    """One RPC session on an emulated board for every board test of this module (the stock server
    serves one session at a time; a session a test left open, e.g. in a reference cycle, would block
    the next test's connect)."""
    with emulated_board(cpu="max") as b:
        session = connect(rpc=b["rpc"], timeout=60, session_timeout=1200)
        yield session
        del session


# --------------------------------------------------------------------------------------------- tests
def test_sdot_hook_packs_a_signed_input() -> None:
    fam = load_family("arm")
    plain = direct_func(_case(*CASES[0])[3]).with_attr("winoq.kernel", "direct")
    kernel, packing = fam.prepack_direct(plain, RPI5)  # 14 columns: 7 x 8 channels, not 2 x 16
    assert packing == DirectPacking(8, x_offset=0) and packing.x_dtype == "int8"
    assert [p.name for p in kernel.params] == ["x", "wq", "sw", "bias", "wc", "y"]
    assert kernel.attrs["winoq.kernel"] == "direct" and "uint8" not in kernel.script()
    w = np.random.default_rng(0).integers(-127, 128, (3, 3, 64, 64), dtype=np.int8)
    assert not packing.extras(w)[0].any()  # no offset: nothing to subtract
    assert fam.prepack_direct(plain, get_preset("graviton3").tvm_target())[1] == packing
    assert fam.prepack_direct(plain, get_preset("rpi4").tvm_target()) is None  # no dot product
    assert fam.tensorized_direct(RPI5) and not fam.tensorized_direct(get_preset("rpi4").tvm_target())
    wide = direct_func(DirectSpec.of((1, 64, 12, 12), (64, 64, 3, 3), padding=(1, 1)))
    assert fam.prepack_direct(wide.with_attr("winoq.kernel", "direct"), RPI5)[1].kb == 16  # 6 x 16
    odd_k = direct_func(DirectSpec.of((1, 8, 8, 8), (30, 8, 3, 3))).with_attr("winoq.kernel", "direct")
    assert fam.prepack_direct(odd_k, RPI5) is None  # K = 30: no whole 4-channel sdot block


def test_offsets_the_packing_admits() -> None:
    assert DirectPacking(16, x_offset=128).x_dtype == "uint8"
    for bad in (1, 64, 126, 129, -1):
        with pytest.raises(ValueError, match="bad packing"):
            DirectPacking(16, x_offset=bad)


@needs_objdump
@pytest.mark.parametrize("preset", ["rpi5", "graviton3"])
def test_direct_kernel_uses_sdot(preset: str, libdir: Path) -> None:
    lib, consts, _ = _build(CASES[0], preset, libdir)
    assert "w_c" in consts  # packed by the family
    code, rest = function_code(lib, "__tvm_ffi_winoq_direct")
    # a register block of 7 columns x 8 channels: at least 14 sdot in the unrolled quad loop
    assert count(code, "sdot") >= 14 and count(rest, "sdot") == 0
    rpi4, consts4, _ = _build(CASES[0], "rpi4", libdir)
    assert "w_c" not in consts4 and count(function_code(rpi4, "__tvm_ffi_winoq_direct")[0], "sdot") == 0


@pytest.mark.board
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_direct_kernel_on_board_matches_reference(case: tuple, libdir: Path, remote: object) -> None:
    """Every output within a quarter of its accumulator step of the reference: the int32 sums are the
    reference's (one step off would be 4x the bound), the rest float rounding."""
    lib, consts, spec = _build(case, "rpi5", libdir)
    x, wt, b, _ = _case(*case)
    cfg = default_config(4)
    ref, trace = direct_conv2d_int8(x, wt, b, spec.padding[:2], cfg.direct, cfg.act.qmax, spec.stride,
                                    return_trace=True)
    remote.upload(str(lib), target=lib.name)
    dev = remote.cpu(0)
    fn = remote.load_module(lib.name)["winoq_direct"]
    args = [tvm.runtime.tensor(np.ascontiguousarray(x.numpy()), dev)]
    args += [tvm.runtime.tensor(consts[n], dev) for n in ("w_q", "s_w", "bias", "w_c")]
    y = tvm.runtime.tensor(np.zeros(spec.out_shape, np.float32), dev)
    fn(*args, y)
    got, ref = y.numpy(), ref.numpy()
    step = (trace.s_w * trace.s_x).numpy().reshape(1, -1, 1, 1)
    err = np.abs(got - ref)
    assert np.all(err <= 0.25 * step), f"max error {err.max()}, smallest step {step.min()}"


@pytest.mark.board
@pytest.mark.slow
def test_ineligible_direct_model_on_board(libdir: Path, remote: object) -> None:
    """``ineligible="direct"`` for rpi5: the stride-2 conv becomes the packed sdot kernel in the Relax
    flow; the board's output is the host build's."""
    from tvm_winoq.relax.build import compile_model
    from tvm_winoq.rpc import bench_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 64, 3, stride=2, padding=1)).eval()
    x = torch.randn(1, 32, 12, 12)
    cfg = groupwise(tile=4).with_(ineligible="direct")
    rpi5 = get_preset("rpi5")
    cm = compile_model(model, x, cfg, target=rpi5.tvm_target())
    assert [r.kind for r in cm.records] == ["winograd", "direct"]
    lib = rpi5.export_library(cm.executable, libdir / "model_direct_rpi5.so")
    if OBJDUMP:
        prefix = "__tvm_ffi_" + cm.records[1].kernels[0]  # the prepacked kernel: a suffix is added
        (symbol,) = {w for w in tool("readelf", "-sW", str(lib)).split() if w.startswith(prefix)}
        assert count(function_code(lib, symbol)[0], "sdot") > 0
    got = bench_module(remote, lib, [x.numpy()], number=1, repeat=1)["outputs"][0]
    host = compile_model(model, x, cfg, target={"kind": "llvm", "num-cores": 2}).runner()(x)
    assert np.abs(got - host).max() <= 1e-5 * np.abs(host).max()


@needs_objdump
@pytest.mark.slow
@pytest.mark.skipif(mca() is None, reason="no llvm-mca")
def test_static_estimate_direct_against_winograd(tmp_path: Path) -> None:
    """``benchmarks/arm_mca.py`` on one layer: both loops found and estimated; the table names them."""
    from benchmarks.arm_mca import estimate_layer, markdown

    rows = estimate_layer("rpi5", "64@14", ("f4", "direct"), workdir=tmp_path)
    assert [(r.kernel, r.instruction) for r in rows] == [("f4", "sdot"), ("direct", "sdot")]
    assert all(r.dots > 0 and r.cycles > 0 and 0 < r.macs_per_cycle <= 64 for r in rows)
    table = markdown(rows)
    print("\n" + table)
    assert "| rpi5 (cortex-a76) | 64@14 | f4 |" in table and "x |" in table


def test_static_estimate_rejects_bad_arguments(capsys: pytest.CaptureFixture) -> None:
    from benchmarks.arm_mca import estimate_layer, main

    with pytest.raises(SystemExit):
        main(["--shapes", "64@x", "--markdown", "never.md"])
    assert "bad shape '64@x'" in capsys.readouterr().err and not Path("never.md").exists()
    with pytest.raises(ValueError, match="no llvm-mca core for preset 'rpi4'"):
        estimate_layer("rpi4", "64@14")
