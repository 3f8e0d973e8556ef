"""Data-free finetuning: determinism, improvement, per-layer mode, model handling."""

import pytest
import torch
from torch import nn

from tvm_winoq.config import groupwise
from tvm_winoq.convert import eligible_convs, fold_batchnorm, quantize_model
from tvm_winoq.errors import ConfigError
from tvm_winoq.finetune import FinetuneSettings, collect_layers, finetune_scales
from tvm_winoq.metrics import sqnr_db


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.b1 = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 48, 3, padding=1)
        self.c3 = nn.Conv2d(48, 32, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.c4 = nn.Conv2d(32, 16, 3, padding=0, dilation=2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = torch.randn(m.weight.shape, generator=g) * 0.1
        self.b1.running_mean.uniform_(-0.2, 0.2, generator=g)
        self.b1.running_var.uniform_(0.5, 2.0, generator=g)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.c4(self.dw(torch.relu(self.c3(x))))


def _layers():
    m = Tiny().eval()
    x = torch.randn(1, 3, 20, 20)
    return m, x, collect_layers(fold_batchnorm(m, x), x)


def test_eligibility_report_names_reasons():
    infos = {i.name: i for i in eligible_convs(Tiny())}
    assert infos["c1"].eligible and infos["c2"].eligible
    assert "stride 2" in infos["c3"].reason
    assert "depthwise" in infos["dw"].reason
    assert "dilation 2" in infos["c4"].reason


def test_fold_batchnorm_preserves_function():
    m, x, _ = _layers()
    f = fold_batchnorm(m, x)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in f.modules())
    with torch.no_grad():
        assert torch.allclose(m(x), f(x), atol=1e-5)


def test_finetune_is_deterministic_and_improves():
    _, _, layers = _layers()
    assert [layer.name for layer in layers] == ["c1", "c2"]
    s = FinetuneSettings(steps=40, seed=3, spatial=12)
    cfg = groupwise(6, 16)
    r1 = finetune_scales(layers, cfg, s, progress=False)
    r2 = finetune_scales(layers, cfg, s, progress=False)
    assert torch.equal(r1.shared.s_b, r2.shared.s_b) and torch.equal(r1.shared.s_g, r2.shared.s_g)
    before = sum(r["sqnr_before_db"] for r in r1.report) / len(r1.report)
    after = sum(r["sqnr_after_db"] for r in r1.report) / len(r1.report)
    assert after > before + 3
    r3 = finetune_scales(layers, cfg, FinetuneSettings(steps=40, seed=4, spatial=12), progress=False)
    assert not torch.equal(r1.shared.s_b, r3.shared.s_b)


def test_per_layer_scales_and_quantize_model():
    m, x, layers = _layers()
    cfg = groupwise(4, 16, "learned-per-layer")
    res = finetune_scales(layers, cfg, FinetuneSettings(steps=20, per_layer=True, spatial=12), progress=False)
    assert set(res.per_layer) == {"c1", "c2"} and res.shared is None
    qm, report = quantize_model(m, cfg, res.per_layer, example_input=x)
    choices = {info.name: choice for info, choice in report}
    assert choices == {"c1": "f4", "c2": "f4", "c3": "float", "dw": "float", "c4": "float"}
    with torch.no_grad():
        ref = m(x)
        assert sqnr_db(ref, qm(x)) > 10


def test_layer_overrides_and_direct():
    m, x, _ = _layers()
    cfg = groupwise(6, 16).with_(layers={"c2": "direct", "c1": "f2"})
    qm, report = quantize_model(m, cfg, None, example_input=x, quantize_ineligible=True)
    choices = {info.name: choice for info, choice in report}
    assert choices["c1"] == "f2" and choices["c2"] == "direct" and choices["c3"] == "direct"
    with torch.no_grad():
        assert sqnr_db(m(x), qm(x)) > 20


def test_settings_validation():
    with pytest.raises(ConfigError, match="steps"):
        FinetuneSettings(steps=0)
    with pytest.raises(ConfigError, match="lr"):
        FinetuneSettings(lr=-1)
    with pytest.raises(ValueError, match="no eligible"):
        finetune_scales([], groupwise(), FinetuneSettings(steps=1), progress=False)


def test_tile_choice_meets_end_to_end_budget():
    from tvm_winoq.tile_choice import Budget, choose_tiles, winograd_mac_share

    m, x, layers = _layers()
    folded = fold_batchnorm(m, x)
    inputs = [torch.randn(1, 3, 20, 20, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    configs = {"f6": groupwise(6, 16), "f4": groupwise(4, 16), "f2": groupwise(2, 16)}
    scales = {"f6": None, "f4": None, "f2": None}
    s = FinetuneSettings(spatial=8)
    lax = choose_tiles(folded, layers, configs, scales, inputs, Budget(min_db=-1e9), s)
    assert [d.choice for d in lax.decisions] == ["f6", "f6"] and not lax.steps
    assert winograd_mac_share(lax.decisions, ("f6",)) == 1.0
    # as good as int8 direct end to end: steps are taken until the model gets there
    strict = choose_tiles(folded, layers, configs, scales, inputs, Budget(min_db=1e9, max_loss_db=0.0), s)
    assert strict.target_db == strict.direct_db and strict.model_db >= strict.target_db
    assert strict.steps and lax.model_db < strict.target_db
    assert [st[3] for st in strict.steps][-1] == strict.model_db
    mid_db = (lax.model_db + strict.direct_db) / 2
    mid = choose_tiles(folded, layers, configs, scales, inputs, Budget(min_db=mid_db), s)
    assert mid.target_db == mid_db and mid.model_db >= mid_db
    assert len(lax.steps) <= len(mid.steps) <= len(strict.steps)
    with pytest.raises(ConfigError, match="max_loss_db"):
        Budget(max_loss_db=-1)
    assert Budget(20, 3).target(18.2) == pytest.approx(15.2) and Budget(20, 3).target(36) == 20