"""Config validation and round-trip."""

import pytest

from tvm_winoq.config import (
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    WinoQConfig,
    config_from_dict,
    groupwise,
    parse_granularity,
    per_tensor,
)
from tvm_winoq.errors import ConfigError


def test_roundtrip_dict():
    for cfg in (
        groupwise(6, 32),
        groupwise(4, 64, "standard"),
        per_tensor(2),
        WinoQConfig(tile=6, points="f6_pm3/2", layers={"a.b": "direct"}),
    ):
        assert config_from_dict(cfg.to_dict()) == cfg


def test_granularity_parse():
    assert parse_granularity("group32") == PerGroup(32)
    assert parse_granularity("tensor") == PerTensor()
    assert parse_granularity("channel") == PerChannel()
    with pytest.raises(ConfigError, match="granularity"):
        parse_granularity("rows")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"tile": 1}, "tile"),
        ({"tile": "6"}, "tile"),
        ({"scale_mode": "magic"}, "scale_mode"),
        ({"points": "nope"}, "points"),
        ({"points": [0, 1]}, "points"),
        ({"layers": {"x": "f5"}}, "layers"),
        ({"act": QuantSpec(PerGroup(8))}, "act"),
        ({"v": QuantSpec(PerGroup(24), True, True), "u": QuantSpec(PerGroup(32), True, True)}, "u"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WinoQConfig(**kwargs)


def test_quantspec_validation():
    with pytest.raises(ConfigError, match="bits"):
        QuantSpec(bits=1)
    with pytest.raises(ConfigError, match="PerGroup"):
        PerGroup(0)
    assert QuantSpec(bits=8).qmax == 127


def test_unknown_dict_field():
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_dict({"tile": 6, "tiel": 4})


def test_frozen():
    cfg = groupwise()
    with pytest.raises(AttributeError):
        cfg.tile = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.layers["x"] = "f2"  # type: ignore[index]
