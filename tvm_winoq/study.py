"""The fidelity study (``winoq eval MODEL``): every method's per-layer SQNR and task accuracy.

Methods: FP32, int8 direct, and for each tile size F(2,3)/F(4,3)/F(6,3): per-tensor standard scales,
group-wise standard scales, group-wise learned shared scales (the paper; for each group size) and
group-wise learned per-layer scales, plus an alternative point set for F(6,3).  Results are written as
markdown + JSON (+ PNG plots) and are reproducible from the seed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import groupwise, per_tensor
from .convert import fold_batchnorm, quantize_model
from .evaluate import Method, capture_inputs, layer_sqnr, scales_for
from .fidelity import real_inputs
from .finetune import FinetuneSettings, collect_layers


@dataclass(frozen=True)
class StudySettings:
    """What the study covers (validated by the objects it builds)."""

    tiles: tuple[int, ...] = (2, 4, 6)
    groups: tuple[int, ...] = (16, 32, 64)
    images: int = 5
    size: int = 256
    test_limit: int | None = None
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)


def study_methods(tiles: Sequence[int], groups: Sequence[int]) -> list[Method]:
    """The rows of the study table."""
    out = [Method("int8 direct", "direct", groupwise(6, 32))]
    for t in tiles:
        out.append(Method(f"F({t},3) per-tensor, standard", "winograd", per_tensor(t)))
        out.append(Method(f"F({t},3) group32, standard", "winograd", groupwise(t, 32, "standard")))
        for g in groups:
            out.append(Method(f"F({t},3) group{g}, learned shared", "winograd", groupwise(t, g)))
        out.append(
            Method(
                f"F({t},3) group32, learned per-layer",
                "winograd",
                groupwise(t, 32, "learned-per-layer"),
                "learned-per-layer",
            )
        )
        if t == 6:
            alt = groupwise(6, 32).with_(points="f6_pm3/2")
            out.append(Method("F(6,3) group32 points {0,±1,±1/2,±3/2}, learned shared", "winograd", alt))
    return _with_scale_source(out)


def _with_scale_source(methods: list[Method]) -> list[Method]:
    """A method's scale source follows its config's ``scale_mode``."""
    fixed = []
    for m in methods:
        if m.kind == "winograd" and m.scales == "standard" and m.cfg.scale_mode != "standard":
            m = Method(m.name, m.kind, m.cfg, m.cfg.scale_mode)
        fixed.append(m)
    return fixed


def task_data(model_name: str, s: StudySettings) -> dict:
    """Inputs for the task metric of a model."""
    if model_name == "fmnist_resnet":
        from .data import fashion_mnist
        from .train_fmnist import to_tensor

        x, y = fashion_mnist("test")
        n = s.test_limit or len(x)
        return {"kind": "labels", "x": to_tensor(x[:n]), "y": torch.from_numpy(y[:n])}
    if model_name in ("mobilenet_v2", "resnet18", "resnet34"):
        return {"kind": "agreement", "x": torch.cat(real_inputs(model_name, 16, 224))}
    if model_name == "craft":
        from .data import natural_image
        from .models.craft import craft_preprocess

        return {
            "kind": "craft",
            "x": real_inputs("craft", s.images, s.size),
            "page": craft_preprocess(natural_image("page", None), 384),
        }
    return {"kind": "sqnr", "x": real_inputs(model_name, s.images, s.size)}


def _task_metric(kind: str, data: dict, ref: torch.nn.Module, model: torch.nn.Module, ref_pred) -> dict:
    from .metrics import sqnr_db
    from .task_metrics import agreement, craft_metrics, top1

    if kind == "labels":
        return {"top1": top1(model, data["x"], data["y"])["top1"]}
    if kind == "agreement":
        return {"top1_agreement": agreement(top1(model, data["x"])["pred"], ref_pred)}
    if kind == "craft":
        return craft_metrics(ref, model, data["x"], data["page"])
    with torch.no_grad():
        out = torch.cat([model(x).flatten() for x in data["x"]])
        want = torch.cat([ref(x).flatten() for x in data["x"]])
    return {"output_sqnr_db": sqnr_db(want, out)}


def eval_model(
    model_name: str, s: StudySettings | None = None, methods: Sequence[Method] | None = None
) -> dict:
    """Run the study for a registered model; returns a JSON-ready dict."""
    from .models import get_model
    from .task_metrics import top1

    s = s or StudySettings()
    model, example = get_model(model_name)
    folded = fold_batchnorm(model, example)
    layers = collect_layers(folded, example)
    calib = real_inputs(model_name, min(s.images, 5), s.size if model_name == "craft" else None)
    acts = capture_inputs(folded, layers, calib)
    data = task_data(model_name, s)
    kind = data["kind"]
    ref_pred = top1(folded, data["x"])["pred"] if kind == "agreement" else None
    rows = [{"method": "FP32", **_task_metric(kind, data, folded, folded, ref_pred)}]
    for meth in methods if methods is not None else study_methods(s.tiles, s.groups):
        t0 = time.time()
        scales, ft_s = scales_for(meth, layers, s.finetune, model_name)
        per = {layer.name: layer_sqnr(meth, layer, acts[layer.name], scales) for layer in layers}
        default = "direct" if meth.kind == "direct" else f"f{meth.cfg.tile}"
        qm, _ = quantize_model(folded, meth.cfg, scales, default=default, fold_bn=False)
        row = {
            "method": meth.name,
            "layer_mean_db": sum(per.values()) / len(per),
            "layers": per,
            "finetune_s": ft_s,
            **_task_metric(kind, data, folded, qm, ref_pred),
        }
        row["seconds"] = time.time() - t0
        rows.append(row)
    return {
        "model": model_name,
        "task": kind,
        "eligible_layers": len(layers),
        "rows": rows,
        "settings": {
            "tiles": s.tiles,
            "groups": s.groups,
            "images": s.images,
            "size": s.size,
            "finetune": s.finetune.__dict__,
        },
    }


def study_markdown(res: dict) -> str:
    """The study table as markdown."""
    rows = res["rows"]
    metric_keys = [k for k in rows[0] if k not in ("method",)]
    head = ["method", "layer-mean SQNR dB", *metric_keys, "finetune s"]
    lines = [
        f"### {res['model']} ({res['eligible_layers']} eligible convs, task: {res['task']})",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for r in rows:
        vals = [r["method"], f"{r.get('layer_mean_db', float('nan')):.2f}"]
        vals += [
            f"{r.get(k, float('nan')):.2f}" if isinstance(r.get(k), float) else str(r.get(k, ""))
            for k in metric_keys
        ]
        vals.append(f"{r.get('finetune_s', 0.0):.1f}")
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_study(res: dict, out_dir: Path) -> Path:
    """Write ``study.md``, ``study.json`` and the per-layer SQNR plot atomically into ``out_dir``."""
    import tempfile

    from .io import write_outputs
    from .plots import plot_layer_sqnr

    with tempfile.TemporaryDirectory() as tmp:
        png = plot_layer_sqnr(
            [r for r in res["rows"] if "layers" in r],
            f"{res['model']}: SQNR per layer",
            Path(tmp) / "layer_sqnr.png",
        )
        files = {
            "study.md": study_markdown(res) + "\n\n![per-layer SQNR](layer_sqnr.png)\n",
            "study.json": json.dumps(res, indent=1, default=str),
            "layer_sqnr.png": png.read_bytes(),
        }
        return write_outputs(out_dir, files)
