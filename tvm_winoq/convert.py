"""Find eligible convolutions in an ``nn.Module``, fold BatchNorm, and swap in quantized convolutions.

:func:`quantize_model` is the one entry point that applies a :class:`~tvm_winoq.config.WinoQConfig`
to a model (torchao style); :func:`eligible_convs` reports what is rewritten and what is skipped, and why.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import WinoQConfig
from .quant.baselines import direct_conv2d_int8
from .quant.plan import LayerScales, plan_layer
from .quant.reference import winograd_conv2d_int


@dataclass(frozen=True)
class ConvInfo:
    """One ``nn.Conv2d`` of a model and whether Winograd F(m,3) applies to it."""

    name: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    padding: tuple[int, int]
    eligible: bool
    reason: str

    @property
    def macs_per_pixel(self) -> int:
        return self.in_channels // self.groups * self.out_channels * self.kernel[0] * self.kernel[1]


def conv_info(name: str, conv: nn.Conv2d) -> ConvInfo:
    """Classify ``conv``: eligible means 3x3, stride 1, dilation 1, groups 1, zero padding."""
    k, s, d = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
    pad = conv.padding
    if isinstance(pad, str):
        pad = (1, 1) if pad == "same" else (0, 0)
    reasons = []
    if k != (3, 3):
        reasons.append(f"kernel {k[0]}x{k[1]}")
    if s != (1, 1):
        reasons.append(f"stride {s[0]}")
    if d != (1, 1):
        reasons.append(f"dilation {d[0]}")
    if conv.groups != 1:
        reasons.append("depthwise" if conv.groups == conv.in_channels else f"groups={conv.groups}")
    if conv.padding_mode != "zeros":
        reasons.append(f"padding_mode={conv.padding_mode}")
    return ConvInfo(
        name=name,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel=k,
        stride=s,
        dilation=d,
        groups=conv.groups,
        padding=(int(pad[0]), int(pad[1])),
        eligible=not reasons,
        reason="eligible" if not reasons else ", ".join(reasons),
    )


def eligible_convs(model: nn.Module) -> list[ConvInfo]:
    """Every ``nn.Conv2d`` of ``model`` in module order, with its eligibility and the reason."""
    return [conv_info(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Conv2d]


def fold_batchnorm(model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm2d that directly consumes a Conv2d output
    folded into that conv (the BN becomes ``nn.Identity``).

    With ``example_input`` the pairs are found by running the model once and matching the tensor a BN
    receives to the tensor a conv produced (works for any control flow); without it, adjacent
    ``(Conv2d, BatchNorm2d)`` pairs inside ``nn.Sequential`` containers are folded.
    """
    model = copy.deepcopy(model).eval()
    pairs: list[tuple[str, str]] = []
    if example_input is not None:
        produced: dict[int, str] = {}
        hooks = []
        for name, mod in model.named_modules():
            if type(mod) is nn.Conv2d:
                hooks.append(
                    mod.register_forward_hook(lambda m, a, out, _n=name: produced.__setitem__(id(out), _n))
                )
            elif isinstance(mod, nn.BatchNorm2d):
                hooks.append(
                    mod.register_forward_pre_hook(
                        lambda m, a, _n=name: (
                            pairs.append((produced[id(a[0])], _n)) if id(a[0]) in produced else None
                        )
                    )
                )
        run_hooked(model, [example_input], hooks)
    else:
        for pname, mod in model.named_modules():
            if isinstance(mod, nn.Sequential):
                names = list(mod._modules)
                for a, b in zip(names, names[1:], strict=False):
                    if type(mod._modules[a]) is nn.Conv2d and isinstance(mod._modules[b], nn.BatchNorm2d):
                        prefix = f"{pname}." if pname else ""
                        pairs.append((prefix + a, prefix + b))
    uses: dict[str, int] = {}
    for _, bn in pairs:
        uses[bn] = uses.get(bn, 0) + 1
    for conv_name, bn_name in dict.fromkeys(pairs):
        if uses[bn_name] != 1:
            continue  # a BN shared by several convs cannot be folded
        _fold_pair(model.get_submodule(conv_name), model.get_submodule(bn_name))
        _set_submodule(model, bn_name, nn.Identity())
    return model


def run_hooked(model: nn.Module, inputs: Sequence[torch.Tensor], hooks: Sequence[Any]) -> None:
    """Run ``model`` without gradients on each of ``inputs``, then remove ``hooks`` (even on error)."""
    try:
        with torch.no_grad():
            for x in inputs:
                model(x)
    finally:
        for h in hooks:
            h.remove()


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight.detach() * scale[:, None, None, None]
    b0 = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    b = (b0 - bn.running_mean) * scale + bn.bias.detach()
    conv.weight = nn.Parameter(w)
    conv.bias = nn.Parameter(b)


class QuantWinogradConv2d(nn.Module):
    """Drop-in replacement of a 3x3 stride-1 ``nn.Conv2d`` running the integer Winograd reference."""

    def __init__(self, conv: nn.Conv2d, cfg: WinoQConfig, scales: LayerScales | None, name: str = "") -> None:
        super().__init__()
        info = conv_info(name, conv)
        if not info.eligible:
            raise ValueError(f"{name or 'conv'}: not eligible for Winograd ({info.reason})")
        self.name = name
        self.cfg = cfg
        self.plan = plan_layer(conv.weight, conv.bias, info.padding, cfg, scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return winograd_conv2d_int(x, self.plan).to(x.dtype)

    def extra_repr(self) -> str:
        p = self.plan
        return f"{p.in_channels}, {p.out_channels}, F({p.m},3), groups(v)={p.gemm_group}"


class QuantDirectConv2d(nn.Module):
    """int8 direct convolution (per-tensor activations, per-channel weights) of any ``nn.Conv2d``."""

    def __init__(self, conv: nn.Conv2d, cfg: WinoQConfig) -> None:
        super().__init__()
        self.conv = conv
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        pad = c.padding if not isinstance(c.padding, str) else conv_info("", c).padding
        return direct_conv2d_int8(
            x, c.weight, c.bias, pad, self.cfg.direct, self.cfg.act.qmax, c.stride, c.dilation, c.groups
        ).to(x.dtype)


def layer_choice(info: ConvInfo, cfg: WinoQConfig, default: str) -> str:
    """The per-layer choice for ``info``: the config's override, else ``default`` (ineligible -> direct)."""
    choice = cfg.layers.get(info.name, default)
    if winograd_tile(choice) and not info.eligible:
        return "direct"
    return choice


def winograd_tile(choice: str) -> int | None:
    """The tile size of a ``"f<m>"`` layer choice (``None`` for ``direct`` / ``float``)."""
    return int(choice[1:]) if choice[:1] == "f" and choice[1:].isdigit() else None


def quantize_model(
    model: nn.Module,
    cfg: WinoQConfig,
    scales: LayerScales | Mapping[str, LayerScales] | None = None,
    *,
    default: str | None = None,
    quantize_ineligible: bool | None = None,
    fold_bn: bool = True,
    example_input: torch.Tensor | None = None,
) -> tuple[nn.Module, list[tuple[ConvInfo, str]]]:
    """Apply ``cfg`` to ``model``: eligible convs become quantized Winograd (or per-layer choice).

    Parameters
    ----------
    model : nn.Module
        The float model (left unchanged; a folded copy is returned).
    cfg : WinoQConfig
        Tile size, quantization specs and per-layer overrides (``cfg.layers``).
    scales : LayerScales or mapping name -> LayerScales, optional
        Shared or per-layer learned scales; ``None`` uses standard scales.
    default : str, optional
        Choice for layers without an override: ``f{cfg.tile}`` by default; ``direct`` and ``float`` too.
    quantize_ineligible : bool, optional
        Also quantize ineligible convolutions as int8 direct convolutions (else they stay float);
        default: ``cfg.ineligible == "direct"``.
    example_input : torch.Tensor, optional
        Used to find Conv -> BatchNorm pairs for folding (see :func:`fold_batchnorm`).

    Returns
    -------
    (model, report) : the quantized copy and ``[(ConvInfo, choice)]`` per conv.
    """
    default = default or f"f{cfg.tile}"
    if quantize_ineligible is None:
        quantize_ineligible = cfg.ineligible == "direct"
    qmodel = fold_batchnorm(model, example_input) if fold_bn else copy.deepcopy(model).eval()
    report: list[tuple[ConvInfo, str]] = []
    for info in eligible_convs(qmodel):
        choice = layer_choice(
            info, cfg, default if info.eligible else ("direct" if quantize_ineligible else "float")
        )
        conv = qmodel.get_submodule(info.name)
        tile = winograd_tile(choice)
        if tile:
            lcfg = cfg if tile == cfg.tile else cfg.with_(tile=tile, points=None)
            sc = scales.get(info.name) if isinstance(scales, Mapping) else scales
            if sc is not None and sc.s_b.numel() != lcfg.tile + 2:
                sc = None
            new: nn.Module = QuantWinogradConv2d(conv, lcfg, sc, info.name)
        elif choice == "direct":
            new = QuantDirectConv2d(conv, cfg)
        else:
            new = conv
        _set_submodule(qmodel, info.name, new)
        report.append((info, choice))
    return qmodel, report


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
