"""Per-layer fallback by measured speed: int8 direct where it beats Winograd, measured in the model.

Winograd only pays where its transforms cost less than the multiplies it saves.  On a small feature map
with many channels (ResNet's 512 @ 7x7) the GEMM has 4 tiles per position and the transformed weights
``U`` (36 x C x K bytes for F(4,3), four times the direct weights) stream from memory on every call:
the int8 direct kernel (``vpdpbusd`` on AVX-512 VNNI) can be faster there.  Which layers lose depends
on the machine (caches, memory bandwidth, int8 dot products), so :func:`measure_layer_choices` measures
it where the model will run: it builds the model twice, every candidate layer as Winograd and as int8
direct, runs both with the VM instrumented (wall time of every kernel call, in the model, between the
layers that really precede it: single-layer timings either flush the caches or keep the weights warm,
and both mislead), and keeps direct for the layers whose kernel time it lowers.  Direct (per-tensor
int8 input, per-channel int8 weights) is never less accurate than the Winograd layer it replaces.

Layers the config already names (``WinoQConfig.layers``) keep their choice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import WinoQConfig

__all__ = ["LayerTiming", "SpeedChoice", "kernel_ms", "measure_layer_choices"]

_PREPACKED = "_prepacked"


@dataclass(frozen=True)
class LayerTiming:
    """Median milliseconds of one layer's kernels per model run, per choice."""

    name: str
    in_channels: int
    out_channels: int
    hw: tuple[int, int]
    ms: dict[str, float]

    @property
    def chosen(self) -> str:
        """The faster choice (the Winograd one on a tie)."""
        return min(self.ms, key=lambda c: (self.ms[c], c == "direct"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (compile metadata)."""
        return {"layer": self.name, "conv": f"{self.in_channels}->{self.out_channels}",
                "hw": list(self.hw), "ms": dict(self.ms), "chosen": self.chosen}


@dataclass
class SpeedChoice:
    """What :func:`measure_layer_choices` found.

    Attributes
    ----------
    timings : list of LayerTiming
        One per candidate layer, in model order.
    layers : dict
        ``{name: "direct"}`` for the layers measured faster as int8 direct (the config's overrides).
    compiled : CompiledModel or None
        The measured build with exactly those choices, when one was (saves a build).
    """

    timings: list[LayerTiming]
    layers: dict[str, str]
    compiled: Any = None

    def apply(self, cfg: WinoQConfig) -> WinoQConfig:
        """``cfg`` with these choices added to its ``layers`` (its own names were never measured)."""
        return cfg.with_(layers=dict(cfg.layers) | self.layers)


def kernel_ms(runners: Sequence[Any], x: np.ndarray, repeat: int = 20, budget_s: float = 10.0,
              ) -> list[dict[str, float]]:
    """Median milliseconds per call of every PrimFunc each runner's VM calls (``[{symbol: ms}]``).

    The runners are run in turn (interleaved, so drifts of the machine hit all alike): once to warm
    up, then up to ``repeat`` rounds (at least 3, and within ``budget_s`` seconds after those), each
    call instruction timed (the VM's instrument hook, wall time; the hook's own cost is ~1 us a call).
    The runners keep a no-op instrument afterwards (a VM cannot drop one): use fresh ones to deploy.
    """
    calls: dict[str, list[float]] = {}
    start: dict[str, float] = {}

    def instrument(func: object, symbol: str, before: bool, ret: object, *args: object) -> int:
        now = time.perf_counter()
        if before:
            start[symbol] = now
        else:
            calls.setdefault(symbol, []).append(now - start.pop(symbol, now))
        return 0  # VMInstrumentReturnKind.NO_OP

    per_run: list[dict[str, list[float]]] = [{} for _ in runners]
    for r in runners:
        r.vm.set_instrument(instrument)
        r(x)
    t_end = None
    for i in range(max(repeat, 3)):
        for r, acc in zip(runners, per_run, strict=True):
            calls.clear()
            r(x)
            for sym, ts in calls.items():  # per call: this run's total over one symbol's calls / calls
                acc.setdefault(sym, []).append(sum(ts) / len(ts))
        if i == 2:
            t_end = time.perf_counter() + budget_s
        if t_end is not None and time.perf_counter() > t_end:
            break
    for r in runners:
        r.vm.set_instrument(lambda *a: 0)
    return [{sym: 1e3 * float(np.median(v)) for sym, v in acc.items()} for acc in per_run]


def _layer_ms(records: list[Any], times: Mapping[str, float]) -> dict[str, float]:
    """``{layer: ms}``: the summed per-call time of the kernels each rewritten layer calls."""
    by_kernel = {s[: -len(_PREPACKED)] if s.endswith(_PREPACKED) else s: t for s, t in times.items()}
    out = {}
    for r in records:
        if r.rewritten and r.kernels and all(k in by_kernel for k in r.kernels):
            out[r.name] = sum(by_kernel[k] for k in r.kernels)
    return out


def measure_layer_choices(
    model: nn.Module,
    example_input: torch.Tensor,
    cfg: WinoQConfig,
    target: Any,
    *,
    scales: Any = None,
    database: Any = None,
    repeat: int = 20,
    log: Callable[[str], None] = print,
) -> SpeedChoice:
    """Measure, in the model on this machine, which Winograd layers run faster as int8 direct.

    Parameters
    ----------
    model, example_input
        As for :func:`~tvm_winoq.relax.build.compile_model`.
    cfg : WinoQConfig
        The model's configuration; layers it names keep their choice.
    target : tvm.target.Target
        A target this machine runs (the caller checks).
    scales, database
        Passed to :func:`~tvm_winoq.relax.build.compile_model`.
    repeat : int
        Timed model runs per build (median per kernel; the two builds run in turn).

    Returns
    -------
    SpeedChoice
    """
    from .relax.build import compile_model

    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    x = example_input.detach().float().contiguous().numpy()

    def build(c: WinoQConfig) -> Any:
        return compile_model(model, example_input, c, target=target, scales=scales, database=database)

    wino = build(cfg)
    candidates = [r for r in wino.records if r.kind == "winograd" and r.name not in cfg.layers]
    if not candidates:
        return SpeedChoice([], {}, wino)
    all_direct = {r.name: "direct" for r in candidates}
    direct = build(cfg.with_(layers=dict(cfg.layers) | all_direct))
    times = kernel_ms([wino.runner(), direct.runner()], x, repeat)
    wino_ms, direct_ms = _layer_ms(wino.records, times[0]), _layer_ms(direct.records, times[1])
    label = f"f{cfg.tile}"
    inf = float("inf")
    timings = [LayerTiming(r.name, r.weight_shape[1], r.weight_shape[0], (r.input_shape[2], r.input_shape[3]),
                           {label: wino_ms.get(r.name, inf), "direct": direct_ms.get(r.name, inf)})
               for r in candidates]
    layers = {t.name: "direct" for t in timings if t.chosen == "direct"}
    for t in timings:
        log(f"  {t.name:32s} {t.in_channels:>4d}->{t.out_channels:<4d} @{t.hw[0]}x{t.hw[1]}: "
            + ", ".join(f"{c} {v:.3f} ms" for c, v in t.ms.items()) + f" -> {t.chosen}")
    compiled = wino if not layers else direct if layers == all_direct else None
    return SpeedChoice(timings, layers, compiled)
