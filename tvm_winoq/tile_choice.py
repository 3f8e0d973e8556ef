"""Per-layer automatic choice of F(6,3) / F(4,3) / F(2,3) / int8 direct under an accuracy budget.

Data-free, like the scale finetuning: each layer is scored on held-out Gaussian inputs shaped like its
input.  A layer gets the largest tile (fewest multiplies) whose SQNR stays above ``min_sqnr_db``;
if no Winograd tile qualifies it falls back to int8 direct convolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import WinoQConfig
from .finetune import ConvLayer, FinetuneSettings, gaussian_layer_sqnr
from .metrics import sqnr_db
from .quant.baselines import direct_conv2d_int8
from .quant.plan import LayerScales

MULTIPLIES_PER_OUTPUT = {"f6": 64 / 36, "f4": 36 / 16, "f2": 16 / 4, "direct": 9.0}
"""Multiplies per output pixel per (C, K) pair: ``(m+2)^2 / m^2`` for F(m,3), 9 for direct."""


@dataclass(frozen=True)
class LayerDecision:
    """The choice for one layer, with the SQNR (dB) each candidate reached."""

    name: str
    choice: str
    sqnr_db: Mapping[str, float]
    macs: int


def choose_tiles(
    layers: Sequence[ConvLayer],
    configs: Mapping[str, WinoQConfig],
    scales: Mapping[str, LayerScales | Mapping[str, LayerScales] | None],
    min_sqnr_db: float,
    settings: FinetuneSettings | None = None,
) -> list[LayerDecision]:
    """Choose per layer among ``configs`` (keys ``"f6"``, ``"f4"``, ``"f2"``) and ``"direct"``.

    Parameters
    ----------
    layers : sequence of ConvLayer
        BN-folded eligible layers with their input shapes.
    configs, scales : mapping tile key -> config / learned scales (shared or per layer)
        Candidate Winograd configurations, tried from the fewest multiplies to the most.
    min_sqnr_db : float
        Per-layer budget on held-out Gaussian inputs.
    """
    s = settings or FinetuneSettings()
    gen = torch.Generator().manual_seed(s.seed + 7_777)
    order = sorted(configs, key=lambda k: MULTIPLIES_PER_OUTPUT[k])
    out = []
    for layer in layers:
        _, c, h, w = layer.input_shape
        x = torch.randn(1, c, min(h, 2 * s.spatial), min(w, 2 * s.spatial), generator=gen)
        scores: dict[str, float] = {}
        choice = "direct"
        for key in order:
            sc = scales.get(key)
            sc = sc.get(layer.name) if isinstance(sc, Mapping) else sc
            scores[key] = gaussian_layer_sqnr(layer, configs[key], sc, x)
            if scores[key] >= min_sqnr_db:
                choice = key
                break
        ref = F.conv2d(
            x.double(),
            layer.weight.double(),
            None if layer.bias is None else layer.bias.double(),
            padding=layer.padding,
        )
        cfg0 = next(iter(configs.values()))
        scores["direct"] = sqnr_db(
            ref, direct_conv2d_int8(x, layer.weight, layer.bias, layer.padding, cfg0.direct)
        )
        out.append(LayerDecision(layer.name, choice, scores, layer_macs(layer)))
    return out


def layer_macs(layer: ConvLayer) -> int:
    """Multiply-accumulates of the direct 3x3 convolution of ``layer`` (batch of its input shape)."""
    b, c, h, w = layer.input_shape
    oh, ow = h + 2 * layer.padding[0] - 2, w + 2 * layer.padding[1] - 2
    return b * c * layer.weight.shape[0] * 9 * oh * ow


def winograd_mac_share(decisions: Sequence[LayerDecision], tiles: Sequence[str] = ("f4", "f6")) -> float:
    """Fraction of the eligible layers' MACs that run as one of ``tiles``."""
    total = sum(d.macs for d in decisions)
    return sum(d.macs for d in decisions if d.choice in tiles) / total if total else 0.0
