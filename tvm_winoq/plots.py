"""Figures of the fidelity study (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .config import WinoQConfig
from .finetune import ConvLayer
from .quant.plan import LayerScales, plan_layer
from .quant.reference import winograd_conv2d_int


def position_ranges(
    layer: ConvLayer, cfg: WinoQConfig, scales: LayerScales | None, x: torch.Tensor
) -> np.ndarray:
    """Max ``|M|`` per Winograd position (``n x n``, normalized to the largest) on input ``x``."""
    plan = plan_layer(layer.weight, layer.bias, layer.padding, cfg, scales)
    _, tr = winograd_conv2d_int(x, plan, return_trace=True)
    r = tr.m_f.abs().amax(dim=(1, 2)).reshape(plan.n, plan.n).double()
    return (r / r.max()).numpy()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_position_ranges(before: np.ndarray, after: np.ndarray, title: str, path: Path) -> Path:
    """Side-by-side log10 heatmaps of the Winograd-domain range per position (the "cross" pattern)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    lo = min(np.log10(before[before > 0]).min(), np.log10(after[after > 0]).min())
    for ax, data, name in ((axes[0], before, "standard scales"), (axes[1], after, "learned scales")):
        im = ax.imshow(np.log10(np.maximum(data, 1e-12)), vmin=lo, vmax=0, cmap="viridis")
        ax.set_title(f"{name}\nrange max/min = {data.max() / max(data.min(), 1e-12):.0f}x")
        ax.set_xlabel("position j")
        ax.set_ylabel("position i")
    fig.colorbar(im, ax=axes, label="log10 max|M| (relative)")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_layer_sqnr(rows: Sequence[dict], title: str, path: Path) -> Path:
    """SQNR per layer (x: layer index) for each method row of a fidelity table."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for r in rows:
        vals = list(r["layers"].values())
        ax.plot(range(len(vals)), vals, marker="o", ms=3, label=r["method"])
    ax.set_xlabel("eligible conv layer (model order)")
    ax.set_ylabel("SQNR vs FP32 (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_metric_vs_tile(points: dict[str, dict[int, float]], ylabel: str, title: str, path: Path) -> Path:
    """``{series: {tile: value}}`` as lines over the tile size m of F(m,3)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, series in points.items():
        tiles = sorted(series)
        ax.plot(tiles, [series[t] for t in tiles], marker="o", label=name)
    ax.set_xlabel("Winograd tile m of F(m,3)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
