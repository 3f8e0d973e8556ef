"""The fidelity table: per-layer and whole-model SQNR of every method on real inputs.

``winoq table MODEL`` prints it; :func:`fidelity_table` is the plain function behind it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .evaluate import Method, evaluate_layers_and_model, standard_methods
from .finetune import FinetuneSettings


def real_inputs(model_name: str, n: int, size: int | None) -> list[torch.Tensor]:
    """Real inputs for a registered model: natural images (``skimage.data``) or Fashion-MNIST digits."""
    from .data import fashion_mnist, imagenet_preprocess, natural_images

    if model_name == "craft":
        from .models.craft import craft_preprocess

        return [craft_preprocess(img, size or 256) for img in natural_images(n, size or 256)]
    if model_name in ("resnet18", "resnet34", "mobilenet_v2"):
        return [imagenet_preprocess(img, size or 224) for img in natural_images(n, 256)]
    if model_name == "fmnist_resnet":
        from .train_fmnist import to_tensor

        images, _ = fashion_mnist("test")
        x = to_tensor(images[:n])
        return [x[i : i + 1] for i in range(n)]
    from .models import get_model

    return [get_model(model_name, seed=i)[1] for i in range(n)]


def fidelity_table(
    model_name: str,
    tiles: Sequence[int] = (4, 6),
    groups: Sequence[int] = (16, 32, 64),
    images: int = 5,
    size: int | None = 256,
    settings: FinetuneSettings | None = None,
    whole_model: bool = True,
    methods: Sequence[Method] | None = None,
) -> dict:
    """Compute the table for a registered model; returns ``{"model", "rows", "layers", "seconds", ...}``."""
    from .models import get_model

    model, _ = get_model(model_name)
    inputs = real_inputs(model_name, images, size)
    t0 = time.time()
    meths = list(methods) if methods is not None else standard_methods(tiles, groups)
    rows = evaluate_layers_and_model(model, inputs, meths, settings, whole_model, model_name=model_name)
    return {
        "model": model_name,
        "inputs": f"{len(inputs)} real inputs of shape {tuple(inputs[0].shape)}",
        "rows": rows,
        "seconds": time.time() - t0,
    }


def format_markdown(result: dict, per_layer: bool = True) -> str:
    """Markdown rendering: a summary table, then (optionally) a per-layer table."""
    rows = result["rows"]
    lines = [
        f"### {result['model']}: SQNR vs FP32 (dB), {result['inputs']}",
        "",
        "| method | layer-mean | layer-min | whole model | finetune s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        vals = list(r["layers"].values())
        lines.append(
            f"| {r['method']} | {r['layer_mean_db']:.2f} | {min(vals):.2f} | "
            f"{r.get('model_db', float('nan')):.2f} | {r.get('finetune_s', 0.0):.1f} |"
        )
    if per_layer and rows:
        names = list(rows[0]["layers"])
        lines += [
            "",
            "| layer | " + " | ".join(r["method"] for r in rows) + " |",
            "|---|" + "---:|" * len(rows),
        ]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(f"{r['layers'][name]:.1f}" for r in rows) + " |")
    return "\n".join(lines)
