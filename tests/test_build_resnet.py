"""End to end: import -> Winograd rewrite -> build -> export .so -> load and run in a fresh process."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from tvm_winoq.config import groupwise
from tvm_winoq.convert import quantize_model
from tvm_winoq.errors import ModelError
from tvm_winoq.metrics import sqnr_db
from tvm_winoq.models import get_model
from tvm_winoq.relax.build import compile_model, load
from tvm_winoq.relax.importer import import_model

pytestmark = pytest.mark.tvm

TARGET = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}


def _run_fresh_process(so, x, tmp_path):
    """Load ``so`` and run it on ``x`` in a new Python process (nothing shared with this one)."""
    np.save(tmp_path / "in.npy", x)
    subprocess.run([sys.executable, "-m", "tvm_winoq.relax.build", "run", str(so), str(tmp_path / "in.npy"),
                    str(tmp_path / "out.npy")], check=True, timeout=600)
    return np.load(tmp_path / "out.npy")


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(24)
        self.down = nn.Conv2d(24, 8, 3, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.down(y).mean(dim=(2, 3)))


def _tiny():
    torch.manual_seed(0)
    model = _Tiny().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(1, 3, 14, 13)


def test_tiny_model_export_and_fresh_process(tmp_path):
    model, x = _tiny()
    cfg = groupwise(tile=4)
    cm = compile_model(model, x, cfg, target=TARGET)
    assert [(r.name, r.rewritten) for r in cm.records] == [("conv", True), ("down", False)]
    y = _run_fresh_process(cm.export(tmp_path / "tiny.so"), x.numpy(), tmp_path)
    qmodel, _ = quantize_model(model, cfg, example_input=x)
    with torch.no_grad():
        ref = qmodel(x)
    assert y.shape == tuple(ref.shape)
    assert sqnr_db(ref, torch.from_numpy(y)) > 60
    np.testing.assert_array_equal(cm.runner()(x), y)


def test_runner_takes_aligned_input_without_copy_and_any_other_with_one():
    """64-byte aligned CPU input (PyTorch's allocations) goes in through DLPack, other input is copied
    into the runner's kept tensor: same results, the caller's arrays untouched, outputs not aliased."""
    from benchmarks.peers import aligned

    model, x = _tiny()
    run = compile_model(model, x, groupwise(tile=4), target=TARGET).runner()
    xa = aligned(x.numpy())
    buf = np.empty(xa.size + 1, np.float32)
    xu = buf[1:].reshape(xa.shape)  # 4 bytes off the 64-byte boundary
    xu[...] = xa
    assert xa.ctypes.data % 64 == 0 and xu.ctypes.data % 64 != 0
    y_torch, y_aligned = run(x).copy(), run(xa).copy()
    assert run._input is None  # no copy so far
    y_unaligned = run(xu)
    assert run._input is not None
    np.testing.assert_array_equal(y_aligned, y_torch)
    np.testing.assert_array_equal(y_unaligned, y_torch)
    np.testing.assert_array_equal(xa, x.numpy())
    np.testing.assert_array_equal(xu, x.numpy())


def test_params_as_input_gives_same_executable_result():
    model, x = _tiny()
    imp = import_model(model, x, keep_params_as_input=True)
    assert set(imp.param_targets.values()) >= {"conv.weight", "conv.bias", "down.weight", "fc.weight"}
    assert len(imp.mod["main"].params) == 1 + len(imp.params)
    cfg = groupwise(tile=2)
    a = compile_model(model, x, cfg, target=TARGET).runner()(x)
    b = compile_model(model, x, cfg, target=TARGET, keep_params_as_input=True).runner()(x)
    np.testing.assert_array_equal(a, b)


#: Runs an exported module with its params file using nothing but the TVM runtime and NumPy (``import tvm``
#: itself pulls in parts of torch when it is installed, so only ``tvm_winoq`` is checked absent).
RUNTIME_ONLY = """
import json, sys
import numpy as np
import tvm
from tvm import relax
so, inp, out = sys.argv[1:]
meta = json.loads(open(so[:-3] + ".json").read())
params = tvm.runtime.load_param_dict(open(so[:-3] + ".params", "rb").read())
vm = relax.VirtualMachine(tvm.runtime.load_module(so), tvm.cpu())
y = vm["main"](tvm.runtime.tensor(np.load(inp)), *[params[n] for n in meta["params"]["names"]])
np.save(out, y.numpy())
assert not [m for m in sys.modules if m.startswith("tvm_winoq")], "needs more than the TVM runtime"
"""


def test_keep_params_exports_params_beside_module(tmp_path):
    """Weights as separate params: the Winograd conv's weights are transformed offline (constants), the
    others stay parameters, written beside the module and loaded in a fresh process by the bare runtime."""
    model, x = _tiny()
    cfg = groupwise(tile=2)
    ref = compile_model(model, x, cfg, target=TARGET).runner()(x)
    cm = compile_model(model, x, cfg, target=TARGET, keep_params_as_input=True)
    assert list(cm.params) == ["p_down_weight", "p_down_bias", "p_fc_weight", "p_fc_bias"]
    np.testing.assert_array_equal(cm.params["p_fc_weight"], model.fc.weight.detach().numpy())
    so = cm.export(tmp_path / "tiny.so")
    assert (tmp_path / "tiny.params").is_file()
    np.save(tmp_path / "in.npy", x.numpy())
    subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(so), str(tmp_path / "in.npy"),
                    str(tmp_path / "out.npy")], check=True, timeout=600)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), ref)
    np.testing.assert_array_equal(_run_fresh_process(so, x.numpy(), tmp_path), ref)
    np.testing.assert_array_equal(load(so)(x), ref)
    direct = compile_model(model, x, cfg.with_(layers={"down": "direct"}), target=TARGET,
                           keep_params_as_input=True)
    assert [r.kind for r in direct.records] == ["winograd", "direct"]
    assert list(direct.params) == ["p_fc_weight", "p_fc_bias"]
    (tmp_path / "tiny.params").unlink()
    with pytest.raises(ModelError, match="tiny.params"):
        load(so)


def test_export_failure_is_a_model_error():
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ModelError, match="torch.export failed"):
        import_model(DataDependent(), torch.randn(1, 3, 4, 4))
    with pytest.raises(ModelError, match="float32"):
        import_model(DataDependent(), torch.randn(1, 3, 4, 4).double())


@pytest.mark.slow
def test_resnet18_build_export_load_sqnr(tmp_path):
    """ResNet-18, F(2,3) group-wise: every 3x3 stride-1 conv runs the int8 Winograd kernels; the
    executable, loaded in a fresh process, matches the PyTorch integer reference model."""
    model, x = get_model("resnet18")
    cfg = groupwise(tile=2)
    cm = compile_model(model, x, cfg, target=TARGET)
    done = [r for r in cm.records if r.rewritten]
    assert len(cm.records) == 20 and len(done) == 13
    assert all("stride 2" in r.reason or "kernel" in r.reason for r in cm.records if not r.rewritten)
    y = _run_fresh_process(cm.export(tmp_path / "resnet18.so"), x.numpy(), tmp_path)
    qmodel, _ = quantize_model(model, cfg, example_input=x)
    with torch.no_grad():
        ref = qmodel(x)
    assert sqnr_db(ref, torch.from_numpy(y)) >= 40
