"""Task-level accuracy of a (quantized) model: what a user of each model cares about.

* classifiers: top-1 accuracy on labels (Fashion-MNIST test set) or top-1 agreement with FP32;
* CRAFT: heatmap SQNR / PSNR vs FP32 and agreement of the detected text boxes (F1 at IoU 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

Box = tuple[int, int, int, int]


def top1(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None, batch: int = 500
) -> dict:
    """Top-1 predictions of ``model`` over ``images`` (``[N, ...]``); accuracy when ``labels`` are given."""
    preds = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            preds.append(model(images[i : i + batch]).argmax(1))
    p = torch.cat(preds)
    out: dict = {"pred": p}
    if labels is not None:
        out["top1"] = 100.0 * float((p == labels).float().mean())
    return out


def agreement(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """Percent of samples whose top-1 prediction equals the reference's."""
    return 100.0 * float((pred == ref).float().mean())


def psnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Peak SNR with the reference's peak: ``10 log10(max|ref|^2 / mse)``."""
    ref = reference.double()
    mse = float((ref - test.double()).pow(2).mean())
    peak = float(ref.abs().max()) ** 2
    return math.inf if mse == 0 else 10 * math.log10(peak / mse)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (exclusive ends)."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_f1(reference: Sequence[Box], test: Sequence[Box], threshold: float = 0.5) -> float:
    """F1 (%) of greedy one-to-one matching of ``test`` boxes to ``reference`` boxes at IoU >= threshold."""
    if not reference and not test:
        return 100.0
    unmatched = list(test)
    hits = 0
    for r in reference:
        best = max(unmatched, key=lambda t: iou(r, t), default=None)
        if best is not None and iou(r, best) >= threshold:
            hits += 1
            unmatched.remove(best)
    prec = hits / len(test) if test else 0.0
    rec = hits / len(reference) if reference else 0.0
    return 0.0 if prec + rec == 0 else 100.0 * 2 * prec * rec / (prec + rec)


def craft_metrics(
    ref_model: nn.Module, model: nn.Module, images: Sequence[torch.Tensor], page: torch.Tensor
) -> dict:
    """Heatmap SQNR/PSNR over ``images`` and box F1 on the ``page`` image, vs the FP32 model."""
    from .metrics import sqnr_db
    from .models.craft import craft_postprocess

    with torch.no_grad():
        ref = torch.cat([ref_model(x)[0].flatten() for x in images])
        out = torch.cat([model(x)[0].flatten() for x in images])
        ref_page, out_page = ref_model(page)[0], model(page)[0]
    ref_boxes = craft_postprocess(ref_page)
    boxes = craft_postprocess(out_page)
    return {
        "heatmap_sqnr_db": sqnr_db(ref, out),
        "heatmap_psnr_db": psnr_db(ref, out),
        "page_sqnr_db": sqnr_db(ref_page, out_page),
        "boxes_ref": len(ref_boxes),
        "boxes": len(boxes),
        "box_f1": box_f1(ref_boxes, boxes),
    }


def numpy_boxes(boxes: Sequence[Box]) -> np.ndarray:
    """Boxes as an ``[N, 4]`` int array (for JSON / plotting)."""
    return np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
