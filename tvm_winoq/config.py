"""Quantization granularities and the frozen, validated tvm-winoq configuration.

The Winograd-domain tensors are viewed as ``[P, R, C]``: ``P = n*n`` Winograd positions, ``R`` rows
(tiles for the activations V and M, output channels for the weights U) and ``C`` the channel axis that
is split into groups (input channels for V and U, output channels for M).  A :class:`QuantSpec`
says which of those axes get their own scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Literal

from .errors import ConfigError
from .winograd.cook_toom import ALTERNATIVE_POINTS, parse_points


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole channel axis."""

    def group_size(self, channels: int) -> int:
        return max(channels, 1)


@dataclass(frozen=True)
class PerChannel:
    """One scale per channel."""

    def group_size(self, channels: int) -> int:
        return 1


@dataclass(frozen=True)
class PerGroup:
    """One scale per group of ``size`` consecutive channels (the last group may be smaller)."""

    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"granularity: PerGroup size must be a positive int, got {self.size!r}")

    def group_size(self, channels: int) -> int:
        return min(self.size, max(channels, 1))


Granularity = PerTensor | PerChannel | PerGroup


def parse_granularity(text: str | Granularity) -> Granularity:
    """``"tensor"``, ``"channel"`` or ``"group32"`` (also ``"g32"`` / ``"32"``) to a granularity object."""
    if isinstance(text, PerTensor | PerChannel | PerGroup):
        return text
    t = str(text).strip().lower()
    if t in ("tensor", "per-tensor", "pertensor"):
        return PerTensor()
    if t in ("channel", "per-channel", "perchannel"):
        return PerChannel()
    digits = t.removeprefix("per-group").removeprefix("group").removeprefix("g").strip("-_ :")
    if digits.isdigit():
        return PerGroup(int(digits))
    raise ConfigError(f"granularity: cannot parse {text!r}; use 'tensor', 'channel' or 'group<N>'")


ROUNDINGS: tuple[str, ...] = ("half-even", "half-away")
"""Round-to-nearest tie rules; compiled kernels implement ``half-even`` (TIR ``nearbyint``)."""


@dataclass(frozen=True)
class QuantSpec:
    """How one stage is quantized: symmetric, ``bits`` wide, one scale per channel group and,
    optionally, per Winograd position and per row (tile for activations, output channel for U)."""

    granularity: Granularity = PerTensor()
    per_position: bool = False
    per_row: bool = False
    bits: int = 8
    rounding: str = "half-even"

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding: must be one of {ROUNDINGS}, got {self.rounding!r}")
        if not isinstance(self.granularity, PerTensor | PerChannel | PerGroup):
            raise ConfigError(
                f"granularity: expected PerTensor/PerChannel/PerGroup, got {self.granularity!r}"
            )
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ConfigError(f"bits: must be an int in [2, 16], got {self.bits!r}")

    @property
    def qmax(self) -> int:
        """Largest quantized magnitude (127 for 8 bits; the range is symmetric ``[-qmax, qmax]``)."""
        return (1 << (self.bits - 1)) - 1


ScaleMode = Literal["standard", "learned-shared", "learned-per-layer"]
SCALE_MODES: tuple[str, ...] = ("standard", "learned-shared", "learned-per-layer")
INELIGIBLE_CHOICES: tuple[str, ...] = ("float", "direct")
LayerChoice = Literal["f2", "f4", "f6", "direct", "float"]
LAYER_CHOICES: tuple[str, ...] = ("f2", "f4", "f6", "direct", "float")


@dataclass(frozen=True)
class WinoQConfig:
    """Configuration of the fully quantized group-wise Winograd convolution.

    Parameters
    ----------
    tile : int
        Output tile size ``m`` of ``F(m, 3)``: 2, 4 or 6 (any ``m >= 2`` works in the reference).
    points : tuple of Fraction or str, optional
        Finite interpolation points (``n - 1`` of them) or the name of an alternative set; ``None``
        selects the standard set.
    act, v, u, m : QuantSpec
        Input activations, input-transform output V, transformed weights U and the output-transform
        input M (the Hadamard/GEMM result).
    scale_mode : str
        ``standard`` (Cook-Toom scales), ``learned-shared`` (one S_B/S_G for the model, the paper) or
        ``learned-per-layer``.
    direct : QuantSpec
        Weight quantization of the int8 direct-convolution fallback (per output channel).
    layers : mapping
        Per-layer override ``{layer name: "f2"|"f4"|"f6"|"direct"|"float"}``.
    ineligible : str
        What becomes of the convolutions Winograd cannot take (stride, 1x1, dilation, groups) that
        ``layers`` does not name: ``"float"`` (kept, the method's scope) or ``"direct"`` (int8 direct:
        every conv W8A8).
    """

    tile: int = 6
    points: tuple[Fraction, ...] | str | None = None
    act: QuantSpec = QuantSpec(PerTensor())
    v: QuantSpec = QuantSpec(PerGroup(32), per_position=True, per_row=True)
    u: QuantSpec = QuantSpec(PerGroup(32), per_position=True, per_row=True)
    m: QuantSpec = QuantSpec(PerGroup(32), per_position=False, per_row=True)
    scale_mode: str = "learned-shared"
    direct: QuantSpec = QuantSpec(PerChannel())
    layers: Mapping[str, str] = field(default_factory=dict)
    ineligible: str = "float"

    def __post_init__(self) -> None:
        if not isinstance(self.tile, int) or self.tile < 2 or self.tile > 8:
            raise ConfigError(f"tile: must be an int in [2, 8] (F(2,3)/F(4,3)/F(6,3)), got {self.tile!r}")
        if isinstance(self.points, str):
            if self.points not in ALTERNATIVE_POINTS:
                raise ConfigError(
                    f"points: unknown point set {self.points!r}; known: {sorted(ALTERNATIVE_POINTS)}"
                )
            pts = ALTERNATIVE_POINTS[self.points]
        elif self.points is not None:
            pts = parse_points(self.points)
        else:
            pts = None
        if pts is not None and len(pts) != self.tile + 1:
            raise ConfigError(f"points: F({self.tile},3) needs {self.tile + 1} finite points, got {len(pts)}")
        if pts is not None and not isinstance(self.points, str):
            object.__setattr__(self, "points", pts)
        for name in ("act", "v", "u", "m", "direct"):
            if not isinstance(getattr(self, name), QuantSpec):
                raise ConfigError(f"{name}: expected a QuantSpec, got {getattr(self, name)!r}")
        if not isinstance(self.act.granularity, PerTensor) or self.act.per_position or self.act.per_row:
            raise ConfigError("act: input activations are quantized per tensor (integer input transform)")
        if self.scale_mode not in SCALE_MODES:
            raise ConfigError(f"scale_mode: must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        for a, b in ((self.v, "v"), (self.u, "u")):
            if not isinstance(a.granularity, PerTensor | PerChannel | PerGroup):
                raise ConfigError(f"{b}: bad granularity")
        gv, gu = self.v.granularity, self.u.granularity
        if (
            isinstance(gv, PerGroup)
            and isinstance(gu, PerGroup)
            and (gv.size % gu.size and gu.size % gv.size)
        ):
            raise ConfigError(
                f"u: group size {gu.size} and v group size {gv.size} must nest (one divides the other)"
            )
        if not isinstance(self.layers, Mapping):
            raise ConfigError(f"layers: expected a mapping name -> choice, got {type(self.layers).__name__}")
        for name, choice in self.layers.items():
            if choice not in LAYER_CHOICES:
                raise ConfigError(f"layers[{name!r}]: must be one of {LAYER_CHOICES}, got {choice!r}")
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        if self.ineligible not in INELIGIBLE_CHOICES:
            raise ConfigError(f"ineligible: must be one of {INELIGIBLE_CHOICES}, got {self.ineligible!r}")

    @property
    def point_values(self) -> tuple[Fraction, ...] | None:
        """The finite points as Fractions (``None`` for the default set)."""
        if isinstance(self.points, str):
            return ALTERNATIVE_POINTS[self.points]
        return self.points

    def with_(self, **changes: Any) -> WinoQConfig:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (inverse of :func:`config_from_dict`)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            val = getattr(self, f.name)
            if isinstance(val, QuantSpec):
                val = _spec_to_dict(val)
            elif f.name == "points" and val is not None and not isinstance(val, str):
                val = [str(p) for p in val]
            elif f.name == "layers":
                val = dict(val)
            out[f.name] = val
        return out


def _gran_to_str(g: Granularity) -> str:
    return (
        "tensor" if isinstance(g, PerTensor) else "channel" if isinstance(g, PerChannel) else f"group{g.size}"
    )


def _spec_to_dict(s: QuantSpec) -> dict[str, Any]:
    return {
        "granularity": _gran_to_str(s.granularity),
        "per_position": s.per_position,
        "per_row": s.per_row,
        "bits": s.bits,
        "rounding": s.rounding,
    }


def config_from_dict(data: Mapping[str, Any]) -> WinoQConfig:
    """Build a :class:`WinoQConfig` from :meth:`WinoQConfig.to_dict` output (unknown keys are errors)."""
    known = {f.name for f in fields(WinoQConfig)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"config: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    kw: dict[str, Any] = {}
    for key, val in data.items():
        if key in ("act", "v", "u", "m", "direct"):
            if not isinstance(val, Mapping):
                raise ConfigError(f"{key}: expected an object, got {val!r}")
            extra = set(val) - {"granularity", "per_position", "per_row", "bits", "rounding"}
            if extra:
                raise ConfigError(f"{key}: unknown field(s) {sorted(extra)}")
            kw[key] = QuantSpec(
                granularity=parse_granularity(val.get("granularity", "tensor")),
                per_position=bool(val.get("per_position", False)),
                per_row=bool(val.get("per_row", False)),
                bits=val.get("bits", 8),
                rounding=val.get("rounding", "half-even"),
            )
        else:
            kw[key] = val
    return WinoQConfig(**kw)


def groupwise(tile: int = 6, group: int = 32, scale_mode: str = "learned-shared") -> WinoQConfig:
    """The paper's group-wise configuration for ``F(tile, 3)`` with channel groups of ``group``."""
    g = PerGroup(group)
    return WinoQConfig(
        tile=tile,
        v=QuantSpec(g, per_position=True, per_row=True),
        u=QuantSpec(g, per_position=True, per_row=True),
        m=QuantSpec(g, per_position=False, per_row=True),
        scale_mode=scale_mode,
    )


def default_config(tile: int = 4, group: int = 32, scale_mode: str = "learned-shared") -> WinoQConfig:
    """tvm-winoq's default: the paper's group-wise config with M quantized per (tile, output channel).

    One M scale per output channel (instead of per 32-channel group) still spans all ``n x n``
    positions, so the output transform stays integer; on CRAFT it gains 4-5 dB per layer
    (``docs/results/craft_sqnr.md``).
    """
    m = QuantSpec(PerChannel(), per_position=False, per_row=True)
    return groupwise(tile, group, scale_mode).with_(m=m)


def per_tensor(tile: int = 6, scale_mode: str = "standard") -> WinoQConfig:
    """Per-tensor quantization of every stage (the classic baseline)."""
    t = QuantSpec(PerTensor())
    return WinoQConfig(tile=tile, v=t, u=t, m=t, scale_mode=scale_mode)
