"""The ``winoq`` CLI: commands run, bad input gives one clear line and writes nothing."""

import json

import pytest

from tvm_winoq.cli import main


def test_layers_lists_eligibility(capsys):
    assert main(["layers", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "stride 2" in out and "13 of 20 convolutions are eligible" in out


def test_unknown_model_is_one_clear_line(capsys):
    assert main(["layers", "resnet19"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'resnet19'" in err[0] and "resnet18" in err[0]


def test_table_writes_markdown_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WINOQ_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "tab"
    args = [
        "table",
        "fmnist_resnet",
        "--tiles",
        "4",
        "--groups",
        "32",
        "--images",
        "1",
        "--steps",
        "5",
        "--no-model",
        "--summary",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "int8 direct" in text and "F(4,3) group32, learned shared" in text
    data = json.loads((out / "table.json").read_text())
    assert {r["method"] for r in data["rows"]} >= {"int8 direct", "F(4,3) group32, standard"}
    assert (out / "table.md").read_text().startswith("### fmnist_resnet")
    # the second run reuses the cached scales
    assert main(args) == 0


def test_bad_finetune_setting_is_reported(capsys):
    assert main(["finetune", "resnet18", "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err


def test_argparse_rejects_missing_model():
    with pytest.raises(SystemExit):
        main(["table"])


@pytest.mark.slow
def test_eval_study_writes_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WINOQ_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fmnist_resnet"
    args = ["eval", "fmnist_resnet", "--tiles", "4", "--groups", "32", "--images", "2", "--limit", "64",
            "--steps", "5", "-o", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| FP32 |" in text and "F(4,3) group32, learned per-layer" in text and "top1" in text
    data = json.loads((out / "study.json").read_text())
    names = [r["method"] for r in data["rows"]]
    assert names[0] == "FP32" and len(names) == 8 and names[-1].startswith("default: auto"), names
    for png in ("layer_sqnr.png", "position_ranges.png"):
        assert (out / png).stat().st_size > 1000
    # the report page reuses the study (no recomputation) and links its table and plots
    capsys.readouterr()
    assert main(["report", "fmnist_resnet", "-o", str(tmp_path)]) == 0
    assert "fmnist_resnet: using" in capsys.readouterr().out
    page = (tmp_path / "report.md").read_text()
    assert "F(4,3) group 32: learned shared scales" in page and "Shipped default" in page
    assert "(fmnist_resnet/position_ranges.png)" in page


def test_report_without_study_is_an_error(tmp_path, capsys):
    (tmp_path / "craft").mkdir()
    (tmp_path / "craft" / "study.json").write_text("{not json")
    assert main(["report", "craft", "-o", str(tmp_path)]) == 2
    assert "not a study JSON" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


@pytest.mark.slow
@pytest.mark.weights
def test_eval_model_with_nothing_to_rewrite(tmp_path, monkeypatch, capsys):
    """MobileNetV2 (its only dense 3x3 has stride 2): FP32 and the compiled module agree on real images."""
    monkeypatch.setenv("WINOQ_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mobilenet_v2"
    assert main(["eval", "mobilenet_v2", "--images", "2", "--compiled", "-o", str(out)]) == 0
    assert "no eligible 3x3 stride-1 convolution" in capsys.readouterr().out
    rows = json.loads((out / "study.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["FP32", "compiled (TVM host): nothing rewritten"]
    assert rows[1]["top1_agreement"] == 100.0


@pytest.mark.slow
def test_eval_engine_compiled_matches_per_image_reference(tmp_path, monkeypatch):
    """`--engine compiled`: each row's top-1 comes from the TVM module, one image per call, as deployed;
    it agrees with the integer reference run one image per call (dynamic scales are per image)."""
    import torch

    from tvm_winoq.config import default_config
    from tvm_winoq.convert import fold_batchnorm, quantize_model
    from tvm_winoq.evaluate import Method
    from tvm_winoq.finetune import FinetuneSettings
    from tvm_winoq.models import get_model
    from tvm_winoq.study import StudySettings, eval_model, task_data

    monkeypatch.setenv("WINOQ_CACHE", str(tmp_path / "cache"))
    s = StudySettings(tiles=(4,), groups=(32,), images=2, test_limit=24, engine="compiled",
                      finetune=FinetuneSettings(steps=5))
    methods = [Method("int8 direct", "direct", default_config(4)),
               Method("F(4,3) standard", "winograd", default_config(4), "standard")]
    res = eval_model("fmnist_resnet", s, methods, log=lambda _: None)
    assert res["settings"]["engine"] == "compiled"
    model, example = get_model("fmnist_resnet")
    folded = fold_batchnorm(model, example)
    data = task_data("fmnist_resnet", s)
    for row, default in zip(res["rows"][1:], ("direct", "f4"), strict=True):
        assert row["build_s"] > 0
        qm, _ = quantize_model(folded, default_config(4), None, default=default, fold_bn=False)
        with torch.no_grad():
            pred = torch.cat([qm(x[None]).argmax(1) for x in data["x"]])
        assert row["top1"] == pytest.approx(100.0 * float((pred == data["y"]).float().mean()))
