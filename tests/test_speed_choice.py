"""Per-layer fallback to int8 direct by speed measured in the model (``tvm_winoq.speed_choice``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tvm_winoq.cli import main
from tvm_winoq.config import default_config
from tvm_winoq.errors import ConfigError
from tvm_winoq.pipeline import CompileOptions
from tvm_winoq.relax.build import compile_model
from tvm_winoq.speed_choice import LayerTiming, kernel_ms, measure_layer_choices
from tvm_winoq.targets import host_features, host_preset

pytestmark = pytest.mark.tvm

TARGET = host_preset(best=True).tvm_target()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, stride=2, padding=1),
    ).eval()


def test_layer_timing_prefers_winograd_on_a_tie() -> None:
    t = LayerTiming("a", 8, 8, (4, 4), {"f4": 1.0, "direct": 1.0})
    assert t.chosen == "f4"
    assert LayerTiming("a", 8, 8, (4, 4), {"f4": 1.0, "direct": 0.5}).chosen == "direct"
    assert t.to_dict()["conv"] == "8->8" and t.to_dict()["chosen"] == "f4"


def test_kernel_ms_times_every_kernel_of_the_model() -> None:
    m, x = _model(), torch.randn(1, 16, 12, 12)
    cm = compile_model(m, x, default_config(4), target=TARGET)
    (times,) = kernel_ms([cm.runner()], x.numpy(), repeat=3)
    wino = [r for r in cm.records if r.kind == "winograd"]
    assert len(wino) == 3 and all(len(r.kernels) == 3 for r in wino)  # input, GEMM, output
    kernels = {k for r in wino for k in r.kernels}
    for k in kernels:  # the GEMM may run as its prepacked variant
        assert any(s in (k, k + "_prepacked") for s in times), (k, sorted(times))
    assert all(v > 0 for v in times.values())


def test_measure_times_each_unnamed_winograd_layer_both_ways() -> None:
    m, x = _model(), torch.randn(1, 16, 12, 12)
    cfg = default_config(4).with_(layers={"2": "f2"})  # named: keeps its choice, not measured
    seen: list[str] = []
    choice = measure_layer_choices(m, x, cfg, TARGET, repeat=3, log=seen.append)
    assert [t.name for t in choice.timings] == ["0", "4"]  # "6" (stride 2) is not Winograd
    for t in choice.timings:
        assert set(t.ms) == {"f4", "direct"} and all(0 < v < math.inf for v in t.ms.values())
    assert choice.layers == {t.name: "direct" for t in choice.timings if t.chosen == "direct"}
    assert dict(choice.apply(cfg).layers) == {"2": "f2"} | choice.layers
    assert len(seen) == 2
    if choice.compiled is not None:  # the measured build with exactly these choices is handed back
        direct = {r.name for r in choice.compiled.records if r.kind == "direct"}
        assert direct == set(choice.layers)
        assert any(r.name == "2" and r.reason.startswith("F(2,3)") for r in choice.compiled.records)


def test_measure_without_candidates_builds_once() -> None:
    m, x = _model(), torch.randn(1, 16, 12, 12)
    cfg = default_config(4).with_(layers={"0": "f4", "2": "f4", "4": "direct"})
    choice = measure_layer_choices(m, x, cfg, TARGET, repeat=1, log=lambda s: None)
    assert choice.timings == [] and choice.layers == {} and choice.compiled is not None


def test_bad_fallback_and_repeat() -> None:
    with pytest.raises(ConfigError, match="fallback"):
        CompileOptions("resnet18", fallback="fastest")
    with pytest.raises(ValueError, match="repeat"):
        measure_layer_choices(_model(), torch.randn(1, 16, 12, 12), default_config(4), TARGET, repeat=0)


@pytest.mark.skipif("vnni" not in host_features(), reason="this CPU cannot run AVX-512 VNNI code")
def test_compile_measures_on_vnni_and_records_the_choices(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WINOQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WINOQ_TUNE_LOGS_DIR", str(tmp_path / "tune_logs"))
    model_file = tmp_path / "net.py"
    model_file.write_text(
        "import torch\nfrom torch import nn\ntorch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),\n"
        "                      nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1)).eval()\n"
        "example_input = torch.randn(1, 16, 14, 14)\n")
    out = tmp_path / "out"
    args = ["compile", str(model_file), "--target", "x86-avx512-vnni", "--tile", "4", "--scales", "standard"]
    assert main([*args, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[measure] done" in text
    meta = json.loads((out / "config.json").read_text())
    measured = meta["measured_choices"]  # the two Winograd candidates, timed both ways in the model
    assert [m["layer"] for m in measured] == ["0", "2"] and all(m["chosen"] in m["ms"] for m in measured)
    direct = [m["layer"] for m in measured if m["chosen"] == "direct"]
    assert meta["config"]["layers"] == dict.fromkeys(direct, "direct")
    assert f"{2 - len(direct)} of 3 conv2d rewritten to int8 Winograd F(4,3)" in text
    assert (out / "report.txt").read_text().count("(measured f4 ") == 2
    assert main(["run", str(out), "--repeat", "2", "--threads", "1", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["sqnr_db"] > 15
