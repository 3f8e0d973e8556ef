"""Data-free finetuning of the Winograd diagonal scales ``S_B`` and ``S_G`` (Pan et al., CVPR 2025).

No data is used: every step draws standard-Gaussian inputs shaped like the inputs of ``K`` randomly
chosen layers, runs the FP convolution and the fake-quantized Winograd convolution, and maximizes their
mean SQNR with SGD on ``log S``.  One scale set is shared by the model (the paper) or, optionally, each
layer learns its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import WinoQConfig
from .convert import ConvInfo, eligible_convs, run_hooked
from .metrics import sqnr_db, sqnr_db_t
from .quant.fakequant import winograd_conv2d_fakequant
from .quant.plan import LayerScales, plan_layer, transforms_for
from .quant.reference import winograd_conv2d_int


@dataclass(frozen=True)
class ConvLayer:
    """A (BN-folded) eligible convolution and the shape of its input."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    padding: tuple[int, int]
    input_shape: tuple[int, int, int, int]


@dataclass(frozen=True)
class FinetuneSettings:
    """Hyper-parameters of the data-free finetuning (validated).

    ``spatial`` caps the height/width of the Gaussian inputs (keeps a step cheap on 2 cores).
    """

    steps: int = 600
    lr: float = 0.02
    momentum: float = 0.9
    layers_per_step: int = 2
    batch: int = 1
    spatial: int = 24
    seed: int = 0
    per_layer: bool = False

    def __post_init__(self) -> None:
        from .errors import ConfigError

        for name in ("steps", "layers_per_step", "batch", "spatial"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be a positive int, got {v!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: must be in [0, 1), got {self.momentum!r}")


@dataclass
class FinetuneResult:
    """Learned scales and the per-layer report (SQNR on held-out Gaussian inputs, before/after)."""

    shared: LayerScales | None
    per_layer: dict[str, LayerScales]
    report: list[dict[str, float | str]] = field(default_factory=list)
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def scales_for(self, name: str) -> LayerScales | None:
        return self.per_layer.get(name, self.shared)


def collect_layers(model: nn.Module, example_input: torch.Tensor) -> list[ConvLayer]:
    """Eligible convolutions of a BN-folded ``model`` with the input shape each sees on ``example_input``."""
    infos: dict[str, ConvInfo] = {i.name: i for i in eligible_convs(model) if i.eligible}
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name in infos:
        mod = model.get_submodule(name)
        hooks.append(mod.register_forward_pre_hook(lambda m, a, _n=name: _record(shapes, _n, a[0])))
    run_hooked(model, [example_input], hooks)
    out = []
    for name, info in infos.items():
        if name not in shapes:
            continue
        conv = model.get_submodule(name)
        out.append(
            ConvLayer(
                name,
                conv.weight.detach().float(),
                None if conv.bias is None else conv.bias.detach().float(),
                info.padding,
                shapes[name],
            )
        )  # type: ignore[arg-type]
    return out


def _record(shapes: dict[str, tuple[int, ...]], name: str, x: torch.Tensor) -> None:
    shapes.setdefault(name, tuple(x.shape))  # a pre-hook must return None


def _gauss_input(layer: ConvLayer, s: FinetuneSettings, gen: torch.Generator) -> torch.Tensor:
    _, c, h, w = layer.input_shape
    return torch.randn(s.batch, c, min(h, s.spatial), min(w, s.spatial), generator=gen)


def gaussian_layer_sqnr(
    layer: ConvLayer, cfg: WinoQConfig, scales: LayerScales | None, x: torch.Tensor
) -> float:
    """SQNR (dB) of the integer Winograd reference vs the FP convolution of ``layer`` on ``x``."""
    ref = F.conv2d(
        x.double(),
        layer.weight.double(),
        None if layer.bias is None else layer.bias.double(),
        padding=layer.padding,
    )
    y = winograd_conv2d_int(x, plan_layer(layer.weight, layer.bias, layer.padding, cfg, scales))
    return sqnr_db(ref, y)


def finetune_scales(
    layers: Sequence[ConvLayer],
    cfg: WinoQConfig,
    settings: FinetuneSettings | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Learn ``S_B``/``S_G`` without data (see module docstring).

    Returns
    -------
    FinetuneResult
        Shared scales (or per-layer scales with ``settings.per_layer``) and a per-layer report of the
        SQNR before and after on held-out Gaussian inputs (a seed never used in training).
    """
    s = settings or FinetuneSettings()
    if not layers:
        raise ValueError("finetune_scales: the model has no eligible 3x3 stride-1 convolution")
    mats = transforms_for(cfg)
    n = mats.n
    gen = torch.Generator().manual_seed(s.seed)
    groups = [layer.name for layer in layers] if s.per_layer else ["shared"]
    params = {g: (torch.zeros(n, requires_grad=True), torch.zeros(n, requires_grad=True)) for g in groups}
    opt = torch.optim.SGD([p for pair in params.values() for p in pair], lr=s.lr, momentum=s.momentum)
    t0 = time.time()
    losses: list[float] = []
    caches: dict[str, dict[str, torch.Tensor]] = {layer.name: {} for layer in layers}
    bar = _progress(s.steps, progress)
    for step in range(s.steps):
        idx = torch.randperm(len(layers), generator=gen)[: s.layers_per_step].tolist()
        opt.zero_grad()
        loss = torch.zeros(())
        for i in idx:
            layer = layers[i]
            lb, lg = params[layer.name if s.per_layer else "shared"]
            x = _gauss_input(layer, s, gen)
            with torch.no_grad():
                ref = F.conv2d(x, layer.weight, layer.bias, padding=layer.padding)
            y = winograd_conv2d_fakequant(
                x, layer.weight, layer.bias, layer.padding, cfg, mats, lb.exp(), lg.exp(), caches[layer.name]
            )
            loss = loss - sqnr_db_t(ref, y) / len(idx)
        if not torch.isfinite(loss):
            continue
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
        bar(step, losses[-1])
    bar(s.steps, None)
    learned = {
        g: LayerScales(lb.detach().exp().double(), lg.detach().exp().double())
        for g, (lb, lg) in params.items()
    }
    result = FinetuneResult(
        shared=learned.get("shared"),
        per_layer={} if not s.per_layer else learned,
        seconds=time.time() - t0,
        losses=losses,
    )
    held = torch.Generator().manual_seed(s.seed + 1_000_003)
    for layer in layers:
        x = _gauss_input(layer, s, held)
        result.report.append(
            {
                "layer": layer.name,
                "sqnr_before_db": gaussian_layer_sqnr(layer, cfg, None, x),
                "sqnr_after_db": gaussian_layer_sqnr(layer, cfg, result.scales_for(layer.name), x),
            }
        )
    return result


def _progress(total: int, enabled: bool) -> Callable[[int, float | None], None]:
    if not enabled:
        return lambda step, loss: None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return lambda step, loss: None
    bar = tqdm(total=total, desc="finetune scales", unit="step", leave=False)

    def update(step: int, loss: float | None) -> None:
        if loss is None:
            bar.close()
            return
        bar.update(1)
        if step % 10 == 0 and math.isfinite(loss):
            bar.set_postfix(sqnr=f"{-loss:.2f} dB")

    return update
