"""Accuracy evaluation: per-layer SQNR on real activations and whole-model output SQNR.

Methods are data (:class:`Method`): int8 direct convolution, or quantized Winograd with a config and a
scale source (standard, learned shared, learned per layer).  Real activations are captured once from the
FP32 (BN-folded) model; the learned scales never see them (finetuning uses Gaussian inputs only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import PerChannel, QuantSpec, WinoQConfig, groupwise, per_tensor
from .convert import quantize_model, run_hooked
from .finetune import ConvLayer, FinetuneResult, FinetuneSettings, collect_layers, finetune_scales
from .metrics import sqnr_db
from .quant.baselines import direct_conv2d_int8
from .quant.plan import LayerScales, plan_layer
from .quant.reference import winograd_conv2d_int

if TYPE_CHECKING:
    from .tile_choice import Budget


@dataclass(frozen=True)
class Method:
    """One quantization method of the comparison table."""

    name: str
    kind: str  # "direct" | "winograd" | "auto" (per-layer tile choice)
    cfg: WinoQConfig
    scales: str = "standard"  # "standard" | "learned-shared" | "learned-per-layer"
    budget: Budget | None = None  # kind "auto": end-to-end budget of the tile choice


def standard_methods(tiles: Sequence[int] = (4, 6), groups: Sequence[int] = (16, 32, 64)) -> list[Method]:
    """The issue's table: int8 direct, per-tensor standard, group-wise standard vs learned."""
    out = [Method("int8 direct", "direct", groupwise(6, 32))]
    for t in tiles:
        out.append(Method(f"F({t},3) per-tensor, standard", "winograd", per_tensor(t), "standard"))
        for g in groups:
            cfg = groupwise(t, g)
            out.append(Method(f"F({t},3) group{g}, standard", "winograd", cfg, "standard"))
            out.append(Method(f"F({t},3) group{g}, learned shared", "winograd", cfg, "learned-shared"))
        cfg = groupwise(t, 32)
        out.append(Method(f"F({t},3) group32, learned per-layer", "winograd", cfg, "learned-per-layer"))
        mch = cfg.with_(m=QuantSpec(PerChannel(), per_position=False, per_row=True))
        out.append(
            Method(f"F({t},3) group32 + M per-channel, learned shared", "winograd", mch, "learned-shared")
        )
    return out


def capture_inputs(model: nn.Module, layers: Sequence[ConvLayer], inputs: Sequence[torch.Tensor]) -> dict:
    """Real input activations of each layer: ``{name: [tensor per input]}`` (model must be BN-folded)."""
    got: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    hooks = [
        model.get_submodule(layer.name).register_forward_pre_hook(
            lambda m, a, _n=layer.name: got[_n].append(a[0].detach().clone()) and None
        )
        for layer in layers
    ]
    run_hooked(model, inputs, hooks)
    return got


def learn(
    layers: Sequence[ConvLayer],
    cfg: WinoQConfig,
    mode: str,
    settings: FinetuneSettings | None = None,
    model_name: str | None = None,
) -> FinetuneResult:
    """Finetune scales for ``cfg``; with ``model_name`` the result is cached on disk."""
    s = settings or FinetuneSettings()
    s = FinetuneSettings(**{**s.__dict__, "per_layer": mode == "learned-per-layer"})
    if model_name is None:
        return finetune_scales(layers, cfg, s, progress=False)
    from .scale_cache import finetune_cached

    return finetune_cached(model_name, list(layers), cfg, s, progress=False)[0]


def scales_for(
    method: Method, layers, settings, model_name: str | None = None
) -> tuple[LayerScales | Mapping[str, LayerScales] | None, float]:
    """The scales a method uses (``None`` = standard) and the seconds their finetuning took."""
    if method.kind != "winograd" or method.scales == "standard":
        return None, 0.0
    res = learn(layers, method.cfg, method.scales, settings, model_name)
    return (res.per_layer if method.scales == "learned-per-layer" else res.shared), res.seconds


def layer_sqnr(method: Method, layer: ConvLayer, xs: Sequence[torch.Tensor], scales) -> float:
    """SQNR (dB) of ``method`` on ``layer`` over the real inputs ``xs`` (pooled over inputs)."""
    refs, outs = [], []
    sc = scales.get(layer.name) if isinstance(scales, Mapping) else scales
    plan = (
        plan_layer(layer.weight, layer.bias, layer.padding, method.cfg, sc)
        if method.kind == "winograd"
        else None
    )
    for x in xs:
        b = None if layer.bias is None else layer.bias.double()
        refs.append(F.conv2d(x.double(), layer.weight.double(), b, padding=layer.padding))
        if plan is None:
            outs.append(direct_conv2d_int8(x, layer.weight, layer.bias, layer.padding, method.cfg.direct))
        else:
            outs.append(winograd_conv2d_int(x, plan))
    return sqnr_db(torch.cat([r.flatten() for r in refs]), torch.cat([o.flatten() for o in outs]))


def model_outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenated flattened first outputs of ``model`` over ``inputs``."""
    outs = []
    with torch.no_grad():
        for x in inputs:
            y = model(x)
            outs.append((y[0] if isinstance(y, tuple | list) else y).flatten())
    return torch.cat(outs)


def evaluate_layers_and_model(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    methods: Sequence[Method],
    settings: FinetuneSettings | None = None,
    whole_model: bool = True,
    model_name: str | None = None,
) -> list[dict]:
    """Per-layer and whole-model SQNR of each method on real ``inputs`` (one row per method)."""
    from .convert import fold_batchnorm

    folded = fold_batchnorm(model, inputs[0])
    layers = collect_layers(folded, inputs[0])
    acts = capture_inputs(folded, layers, inputs)
    ref_out = model_outputs(folded, inputs)
    rows = []
    for meth in methods:
        scales, ft_s = scales_for(meth, layers, settings, model_name)
        per = {layer.name: layer_sqnr(meth, layer, acts[layer.name], scales) for layer in layers}
        row = {
            "method": meth.name,
            "layers": per,
            "layer_mean_db": sum(per.values()) / len(per),
            "finetune_s": ft_s,
        }
        if whole_model:
            default = "direct" if meth.kind == "direct" else f"f{meth.cfg.tile}"
            qm, _ = quantize_model(folded, meth.cfg, scales, default=default, fold_bn=False)
            row["model_db"] = sqnr_db(ref_out, model_outputs(qm, inputs))
        rows.append(row)
    return rows
