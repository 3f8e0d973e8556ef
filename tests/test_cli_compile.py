"""``winoq compile`` / ``winoq run`` end to end on a user model file, and their bad-input paths."""

import json
import textwrap

import pytest

from tvm_winoq.cli import main

MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 16, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()
    example_input = torch.randn(1, 8, 20, 20)
    """
)


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    return path


def test_compile_and_run_user_model(tmp_path, model_file, monkeypatch, capsys):
    monkeypatch.setenv("WINOQ_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["compile", str(model_file), "--tile", "4", "--steps", "20", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 of 3 conv2d rewritten" in text and "stride 2" in text
    # host = host-avx2: its direct kernel is not tensorized, nothing to measure
    assert "[measure] skipped for host-avx2: its schedules have no tensorized int8 direct kernel" in text
    assert {p.name for p in out.iterdir()} == {"module.so", "module.json", "config.json", "report.txt"}
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["tile"] == 4 and meta["scales"] is not None and meta["measured_choices"] is None
    res_path = tmp_path / "res.json"
    assert main(["run", str(out), "--repeat", "2", "--threads", "1", "--json", str(res_path)]) == 0
    res = json.loads(res_path.read_text())
    assert res["sqnr_db"] > 15 and res["top1_agree"] is True and res["ms_ours"] > 0


def test_compile_keep_params_and_direct_layer(tmp_path, model_file, monkeypatch, capsys):
    """``--keep-params`` writes module.params beside module.so and ``winoq run`` uses it; a
    ``--layer NAME=direct`` conv becomes the int8 direct kernel."""
    monkeypatch.setenv("WINOQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WINOQ_TUNE_LOGS_DIR", str(tmp_path / "tune_logs"))
    out = tmp_path / "out"
    args = ["compile", str(model_file), "--tile", "2", "--scales", "standard", "--keep-params",
            "--layer", "5=direct", "--fallback", "none", "-o", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2 of 3 conv2d rewritten to int8 Winograd F(2,3), 1 to int8 direct" in text
    assert "module.params" in text
    assert {p.name for p in out.iterdir()} == {"module.so", "module.json", "module.params", "config.json",
                                               "report.txt"}
    sidecar = json.loads((out / "module.json").read_text())
    assert sidecar["params"]["names"] == ["p_8_weight", "p_8_bias"]  # only the Linear stays a parameter
    assert [r["kind"] for r in sidecar["records"]] == ["winograd", "winograd", "direct"]
    res_path = tmp_path / "res.json"
    assert main(["run", str(out), "--repeat", "2", "--threads", "1", "--json", str(res_path)]) == 0
    res = json.loads(res_path.read_text())
    assert res["sqnr_db"] > 15 and res["top1_agree"] is True


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--target", "rpi9"], "unknown target preset"),
        (["--scales", "magic"], "scales"),
        (["--layer", "0=f5"], "layers"),
        (["--layer", "nochoice"], "name=choice"),
        (["--tile", "1"], "tile"),
        (["--fallback", "fastest"], "fallback"),
        (["--ineligible", "int4"], "ineligible"),
    ],
)
def test_compile_bad_input_is_one_line_and_writes_nothing(tmp_path, model_file, capsys, args, needle):
    out = tmp_path / "out"
    assert main(["compile", str(model_file), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0].lower()
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_compile_missing_model_file(tmp_path, capsys):
    assert main(["compile", str(tmp_path / "nope.py"), "-o", str(tmp_path / "o")]) == 2
    assert "nope.py" in capsys.readouterr().err


def test_run_rejects_non_output_folder(tmp_path, capsys):
    assert main(["run", str(tmp_path)]) == 2
    assert "not a winoq compile output" in capsys.readouterr().err
