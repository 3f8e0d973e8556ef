"""Real weights, real images: learned scales beat standard scales on held-out real activations."""

import pytest

from tvm_winoq.config import groupwise, per_tensor
from tvm_winoq.evaluate import Method
from tvm_winoq.fidelity import fidelity_table, format_markdown
from tvm_winoq.finetune import FinetuneSettings

pytestmark = [pytest.mark.weights, pytest.mark.slow]


def test_craft_learned_scales_beat_standard(tmp_path, monkeypatch):
    monkeypatch.setenv("WINOQ_CACHE", str(tmp_path))  # finetune from scratch, not from a user cache
    methods = [
        Method("int8 direct", "direct", groupwise(6, 32)),
        Method("F(6,3) per-tensor std", "winograd", per_tensor(6)),
        Method("F(6,3) g32 std", "winograd", groupwise(6, 32), "standard"),
        Method("F(6,3) g32 learned", "winograd", groupwise(6, 32), "learned-shared"),
        Method("F(4,3) g32 std", "winograd", groupwise(4, 32), "standard"),
        Method("F(4,3) g32 learned", "winograd", groupwise(4, 32), "learned-shared"),
    ]
    res = fidelity_table(
        "craft", images=2, size=128, methods=methods, settings=FinetuneSettings(steps=150, seed=0)
    )
    rows = {r["method"]: r for r in res["rows"]}
    print(format_markdown(res, per_layer=False))
    assert len(rows["int8 direct"]["layers"]) == 19
    assert rows["int8 direct"]["layer_mean_db"] > 33
    for t in (6, 4):
        std, learned = rows[f"F({t},3) g32 std"], rows[f"F({t},3) g32 learned"]
        assert learned["layer_mean_db"] > std["layer_mean_db"] + 8, t
        assert learned["model_db"] > std["model_db"] + 5, t
        assert learned["finetune_s"] < 180
    assert rows["F(6,3) g32 std"]["layer_mean_db"] >= rows["F(6,3) per-tensor std"]["layer_mean_db"] - 1
