"""Per-layer automatic choice of F(6,3) / F(4,3) / F(2,3) / int8 direct under an end-to-end budget.

The budget is end to end (:class:`Budget`): the model's output SQNR vs FP32 on a few inputs must stay
above ``min_db`` -- or, where even the all-int8-direct model is below ``min_db + max_loss_db``, at most
``max_loss_db`` below that model's (a classifier's logits keep their top-1 far below int8 direct's
SQNR; a dense-prediction model such as CRAFT has little headroom over it).  Every layer
starts at the tile with the fewest multiplies (F(6,3)); while the model misses its budget, the layer
step that buys the most accuracy per multiply given back is taken (F(6,3) -> F(4,3) -> F(2,3) ->
direct), and the model is measured again.  Accuracy per step is estimated from each layer's own SQNR
on held-out Gaussian inputs (data-free, like the scale finetuning); the budget itself is checked on
the inputs the caller passes (a few unlabeled images, or Gaussian ones).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import WinoQConfig
from .convert import QuantDirectConv2d, QuantWinogradConv2d, _set_submodule
from .errors import ConfigError
from .evaluate import model_outputs
from .finetune import ConvLayer, FinetuneSettings, gaussian_layer_sqnr
from .metrics import sqnr_db
from .quant.baselines import direct_conv2d_int8
from .quant.plan import LayerScales

MULTIPLIES_PER_OUTPUT = {"f6": 64 / 36, "f4": 36 / 16, "f2": 16 / 4, "direct": 9.0}
"""Multiplies per output pixel per (C, K) pair: ``(m+2)^2 / m^2`` for F(m,3), 9 for direct."""


@dataclass(frozen=True)
class Budget:
    """End-to-end accuracy budget of the tile choice: ``target = min(min_db, direct - max_loss_db)``.

    Parameters
    ----------
    min_db : float
        Output SQNR (dB vs FP32) that is enough.
    max_loss_db : float
        Most dB to lose against the all-int8-direct model when that is below ``min_db + max_loss_db``.
    """

    min_db: float = 20.0
    max_loss_db: float = 3.0

    def __post_init__(self) -> None:
        if self.max_loss_db < 0:
            raise ConfigError(f"Budget.max_loss_db: must be >= 0 dB, got {self.max_loss_db}")

    def target(self, direct_db: float) -> float:
        """The output SQNR (dB) the chosen model must reach, given the all-direct model's."""
        return min(self.min_db, direct_db - self.max_loss_db)

    def label(self) -> str:
        """Short text for tables: ``>= 20 dB (or direct - 3 dB)``."""
        return f">= {self.min_db:g} dB (or direct - {self.max_loss_db:g} dB)"


@dataclass(frozen=True)
class LayerDecision:
    """The choice for one layer, with the SQNR (dB, Gaussian inputs) each candidate reached."""

    name: str
    choice: str
    sqnr_db: Mapping[str, float]
    macs: int


@dataclass
class TileChoice:
    """Result of :func:`choose_tiles`: the decisions and how the end-to-end budget was met.

    ``direct_db`` / ``target_db`` / ``model_db``: end-to-end output SQNR (dB) of the all-direct model,
    the budget's target (:meth:`Budget.target`) and the chosen model; ``steps``: the layer steps taken,
    ``(layer, from, to, model_db after)``.
    """

    decisions: list[LayerDecision]
    direct_db: float
    target_db: float
    model_db: float
    steps: list[tuple[str, str, str, float]] = field(default_factory=list)

    @property
    def choices(self) -> dict[str, str]:
        """``{layer name: choice}``."""
        return {d.name: d.choice for d in self.decisions}


def layer_scores(
    layers: Sequence[ConvLayer],
    configs: Mapping[str, WinoQConfig],
    scales: Mapping[str, LayerScales | Mapping[str, LayerScales] | None],
    settings: FinetuneSettings | None = None,
) -> dict[str, dict[str, float]]:
    """Each layer's SQNR (dB) per candidate (``configs`` keys and ``"direct"``) on Gaussian inputs."""
    s = settings or FinetuneSettings()
    gen = torch.Generator().manual_seed(s.seed + 7_777)
    cfg0 = next(iter(configs.values()))
    out = {}
    for layer in layers:
        _, c, h, w = layer.input_shape
        x = torch.randn(1, c, min(h, 2 * s.spatial), min(w, 2 * s.spatial), generator=gen)
        scores = {key: gaussian_layer_sqnr(layer, cfg, _scale_of(scales.get(key), layer.name), x)
                  for key, cfg in configs.items()}
        bias = None if layer.bias is None else layer.bias.double()
        ref = F.conv2d(x.double(), layer.weight.double(), bias, padding=layer.padding)
        y = direct_conv2d_int8(x, layer.weight, layer.bias, layer.padding, cfg0.direct)
        scores["direct"] = sqnr_db(ref, y)
        out[layer.name] = scores
    return out


def choose_tiles(
    model: nn.Module,
    layers: Sequence[ConvLayer],
    configs: Mapping[str, WinoQConfig],
    scales: Mapping[str, LayerScales | Mapping[str, LayerScales] | None],
    inputs: Sequence[torch.Tensor],
    budget: Budget,
    settings: FinetuneSettings | None = None,
) -> TileChoice:
    """Choose per layer among ``configs`` (keys ``"f6"``, ``"f4"``, ``"f2"``) and ``"direct"``.

    Parameters
    ----------
    model : nn.Module
        The BN-folded float model holding ``layers`` (not modified).
    layers : sequence of ConvLayer
        Its eligible layers with their input shapes.
    configs, scales : mapping tile key -> config / learned scales (shared or per layer)
        Candidate Winograd configurations.
    inputs : sequence of Tensor
        Model inputs (one sample each) on which the end-to-end budget is checked.
    budget : Budget
        End-to-end output SQNR the chosen model must keep.
    """
    if not layers:
        raise ValueError("choose_tiles: no eligible layers")
    if not inputs:
        raise ValueError("choose_tiles: no inputs to check the end-to-end budget on")
    unknown = set(configs) - set(MULTIPLIES_PER_OUTPUT)
    if unknown:
        raise ValueError(f"choose_tiles: unknown candidates {sorted(unknown)} (use f2, f4, f6)")
    order = sorted([*configs, "direct"], key=lambda k: MULTIPLIES_PER_OUTPUT[k])  # fewest first
    scores = layer_scores(layers, configs, scales, settings)
    cfg0 = next(iter(configs.values()))
    modules = {
        layer.name: _candidates(model.get_submodule(layer.name), layer.name, configs, scales, cfg0)
        for layer in layers
    }
    qmodel = copy.deepcopy(model).eval()
    ref = model_outputs(model, inputs)

    def measure(choice: Mapping[str, str]) -> float:
        for name, key in choice.items():
            _set_submodule(qmodel, name, modules[name][key])
        return sqnr_db(ref, model_outputs(qmodel, inputs))

    direct_db = measure({layer.name: "direct" for layer in layers})
    target = budget.target(direct_db)
    choice = {layer.name: order[0] for layer in layers}
    model_db = measure(choice)
    macs = {layer.name: layer_macs(layer) for layer in layers}
    steps: list[tuple[str, str, str, float]] = []
    while model_db < target:
        step = _best_step(choice, order, scores, macs)
        if step is None:
            break
        name, nxt = step
        steps.append((name, choice[name], nxt, 0.0))
        choice[name] = nxt
        model_db = measure(choice)
        steps[-1] = (*steps[-1][:3], model_db)
    decisions = [LayerDecision(x.name, choice[x.name], scores[x.name], macs[x.name]) for x in layers]
    return TileChoice(decisions, direct_db, target, model_db, steps)


def _best_step(choice, order, scores, macs) -> tuple[str, str] | None:
    """The one-step demotion with the most noise removed per multiply given back (``None``: all direct)."""
    best, best_gain = None, -float("inf")
    for name, key in choice.items():
        i = order.index(key)
        if i + 1 == len(order):
            continue
        nxt = order[i + 1]
        removed = 10 ** (-scores[name][key] / 10) - 10 ** (-scores[name][nxt] / 10)
        cost = macs[name] * (MULTIPLIES_PER_OUTPUT[nxt] - MULTIPLIES_PER_OUTPUT[key])
        gain = removed / cost
        if gain > best_gain:
            best, best_gain = (name, nxt), gain
    return best


def _scale_of(sc, name: str):
    return sc.get(name) if isinstance(sc, Mapping) else sc


def _candidates(conv: nn.Conv2d, name: str, configs, scales, cfg0) -> dict[str, nn.Module]:
    mods: dict[str, nn.Module] = {"direct": QuantDirectConv2d(conv, cfg0)}
    for key, cfg in configs.items():
        mods[key] = QuantWinogradConv2d(conv, cfg, _scale_of(scales.get(key), name), name)
    return mods


def layer_macs(layer: ConvLayer) -> int:
    """Multiply-accumulates of the direct 3x3 convolution of ``layer`` (batch of its input shape)."""
    b, c, h, w = layer.input_shape
    oh, ow = h + 2 * layer.padding[0] - 2, w + 2 * layer.padding[1] - 2
    return b * c * layer.weight.shape[0] * 9 * oh * ow


def winograd_mac_share(decisions: Sequence[LayerDecision], tiles: Sequence[str] = ("f4", "f6")) -> float:
    """Fraction of the eligible layers' MACs that run as one of ``tiles``."""
    total = sum(d.macs for d in decisions)
    return sum(d.macs for d in decisions if d.choice in tiles) / total if total else 0.0
