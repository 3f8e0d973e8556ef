"""CPU legalizations (``tvm_winoq.relax.legalize``): group norm with per-lane partial sums, sigmoid and
SiLU on ``topi.fast_exp``; numerically against PyTorch, structurally on the lowered TIR."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from tvm_winoq.config import default_config
from tvm_winoq.relax.build import compile_model, lower
from tvm_winoq.relax.importer import import_model
from tvm_winoq.targets import get_preset

pytestmark = pytest.mark.tvm

TARGET = get_preset("host").tvm_target()


class _NormAct(nn.Module):
    def __init__(self, channels: int, groups: int, act: str) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if self.act == "silu":
            return nn.functional.silu(y)
        return y * torch.sigmoid(y) if self.act == "x*sigmoid" else torch.sigmoid(y)


def _model(channels: int, groups: int, act: str) -> nn.Module:
    torch.manual_seed(0)
    m = _NormAct(channels, groups, act).eval()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)
    return m


def _blocks(mod) -> set[str]:
    """Names of the TIR blocks of every PrimFunc of ``mod``."""
    from tvm import tirx

    return {n for _, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)
            for n in re.findall(r'sblock\("([\w.]+)"', f.script())}


@pytest.mark.parametrize(("shape", "groups", "act", "partial"), [
    ((1, 64, 12, 32), 8, "x*sigmoid", True),   # 16 lanes per group
    ((2, 48, 5, 24), 12, "silu", True),        # 8 lanes
    ((1, 32, 7, 7), 4, "sigmoid", False),      # W = 7: upstream's group norm
])
def test_group_norm_and_sigmoid_match_pytorch(shape, groups, act, partial):
    model = _model(shape[1], groups, act)
    x = torch.randn(*shape) * 3 + 1
    with torch.no_grad():
        ref = model(x).numpy()
    y = compile_model(model, x, default_config(), target=TARGET, winograd=False).runner()(x)
    assert np.abs(y - ref).max() <= 2e-5 * np.abs(ref).max()
    blocks = _blocks(lower(import_model(model, x).mod, TARGET))
    assert any(b.startswith("group_norm_partial") for b in blocks) == partial
    assert "sigmoid_neg" in blocks  # fast_exp sigmoid, no scalar expf
    if partial:  # normalized in NCHW directly, no reshaped copy of the input
        assert not any(b.startswith("T_reshape") for b in blocks)
