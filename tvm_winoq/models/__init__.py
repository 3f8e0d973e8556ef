"""Model zoo of tvm-winoq: the networks the int8 Winograd flow is evaluated on.

``MODELS`` maps a name to a :class:`ModelSpec`; :func:`get_model` builds one in eval mode together
with a deterministic example input, and :func:`load_model_file` loads a user-defined model from a
Python file.

========================  =======  ==================  ==============================================
name                      weights  input               notes
========================  =======  ==================  ==============================================
``craft``                 real     1x3x384x384         easyocr CRAFT text detector; input is skimage
                                                       ``page()`` (a scanned text page)
``resnet18``              random   1x3x224x224         torchvision layout, 1000 classes
``resnet34``              random   1x3x224x224         torchvision layout, 1000 classes
``mobilenet_v2``          real     1x3x224x224         torchvision ImageNet weights; input ``chelsea``
``diffusion_unet``        random   1x4x32x32           SD-shaped latent UNet (320/640 channels)
``fmnist_resnet``         random*  1x1x28x28           \\* real once ``checkpoints/fmnist_resnet.pt``
                                                       exists (written by the training script)
========================  =======  ==================  ==============================================
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from tvm_winoq.errors import ModelError

__all__ = ["FMNIST_CHECKPOINT", "MODELS", "ModelSpec", "get_model", "load_model_file"]

#: Trained Fashion-MNIST weights; loaded by the ``fmnist_resnet`` registry entry when present.
FMNIST_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "fmnist_resnet.pt"

_T = TypeVar("_T")


@dataclass(frozen=True)
class ModelSpec:
    """One registered model.

    Attributes
    ----------
    name : str
        Registry key.
    build : Callable[[], torch.nn.Module]
        Builds the model (random parts draw from torch's global RNG, which :func:`get_model` seeds).
    input_shape : tuple of int
        NCHW shape of the example input.
    weights : str
        ``"real"`` (pretrained, from an offline weights package or checkpoint) or ``"random"``.
    description : str
        One line for ``winoq models`` style listings.
    example : Callable[[int], torch.Tensor] or None
        Builds the example input from a seed; ``None`` means seeded standard-normal noise.
    """

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    weights: str
    description: str
    example: Callable[[int], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.weights not in ("real", "random"):
            raise ModelError(f"model {self.name!r}: weights must be 'real' or 'random', got {self.weights!r}")


def _build_craft() -> nn.Module:
    from tvm_winoq.models.craft import craft

    return craft(pretrained=True)


def _craft_example(seed: int) -> torch.Tensor:
    from tvm_winoq.data import natural_image
    from tvm_winoq.models.craft import craft_preprocess

    return craft_preprocess(natural_image("page", size=None), (384, 384))


def _build_mobilenet_v2() -> nn.Module:
    from tvm_winoq.models.mobilenetv2 import mobilenet_v2

    return mobilenet_v2(pretrained=True)


def _imagenet_example(seed: int) -> torch.Tensor:
    from tvm_winoq.data import imagenet_preprocess, natural_image

    return imagenet_preprocess(natural_image("chelsea", size=None), 224)


def _build_resnet18() -> nn.Module:
    from tvm_winoq.models.resnet import resnet18

    return resnet18()


def _build_resnet34() -> nn.Module:
    from tvm_winoq.models.resnet import resnet34

    return resnet34()


def _build_diffusion_unet() -> nn.Module:
    from tvm_winoq.models.diffusion_unet import diffusion_unet

    return diffusion_unet()


def _build_fmnist_resnet() -> nn.Module:
    from tvm_winoq.models.resnet import fmnist_resnet

    return fmnist_resnet(FMNIST_CHECKPOINT if FMNIST_CHECKPOINT.is_file() else None)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "craft",
            _build_craft,
            (1, 3, 384, 384),
            "real",
            "CRAFT text detector (easyocr craft_mlt_25k, VGG16-BN + UNet), 19 3x3 stride-1 convs",
            _craft_example,
        ),
        ModelSpec("resnet18", _build_resnet18, (1, 3, 224, 224), "random", "ResNet-18, ImageNet shape"),
        ModelSpec("resnet34", _build_resnet34, (1, 3, 224, 224), "random", "ResNet-34, ImageNet shape"),
        ModelSpec(
            "mobilenet_v2",
            _build_mobilenet_v2,
            (1, 3, 224, 224),
            "real",
            "MobileNetV2, torchvision ImageNet weights (no dense 3x3 stride-1 convs: 13 depthwise ones)",
            _imagenet_example,
        ),
        ModelSpec(
            "diffusion_unet",
            _build_diffusion_unet,
            (1, 4, 32, 32),
            "random",
            "small Stable-Diffusion-shaped latent UNet, 3x3 convs at 320/640 channels",
        ),
        ModelSpec(
            "fmnist_resnet",
            _build_fmnist_resnet,
            (1, 1, 28, 28),
            "real" if FMNIST_CHECKPOINT.is_file() else "random",
            "ResNet-18-style net for Fashion-MNIST 28x28 (trained if checkpoints/fmnist_resnet.pt exists)",
        ),
    )
}


def get_model(name: str, *, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Build a registered model and its example input.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    seed : int
        Seeds the random weights and the example input; the global torch RNG is left untouched.

    Returns
    -------
    model : torch.nn.Module
        The model in eval mode.
    example_input : torch.Tensor
        float32 tensor of ``MODELS[name].input_shape`` (a real image for ``craft`` and
        ``mobilenet_v2``, seeded standard-normal noise otherwise).

    Raises
    ------
    ModelError
        If ``name`` is unknown.
    WeightsNotFoundError
        If a real-weights model's offline weights package is not installed.
    """
    spec = MODELS.get(name)
    if spec is None:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build()
    if spec.example is not None:
        example = spec.example(seed)
    else:
        gen = torch.Generator().manual_seed(seed)
        example = torch.randn(spec.input_shape, generator=gen, dtype=torch.float32)
    if tuple(example.shape) != spec.input_shape:
        raise ModelError(f"model {name!r}: example input {tuple(example.shape)} != {spec.input_shape}")
    return model.eval(), example


def load_model_file(path: str | Path) -> tuple[nn.Module, torch.Tensor]:
    """Load a user model from a Python file.

    The file must define ``model`` (a ``torch.nn.Module`` or a zero-argument callable returning
    one) and ``example_input`` (a ``torch.Tensor`` or a zero-argument callable returning one).

    Parameters
    ----------
    path : str or Path
        The ``.py`` file.

    Returns
    -------
    model : torch.nn.Module
        The model in eval mode.
    example_input : torch.Tensor
        Its example input.

    Raises
    ------
    ModelError
        If the file is missing, fails to execute, or lacks / mistypes ``model`` or ``example_input``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    mod_name = "_winoq_user_model_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot load {path} as a Python module (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # lets dataclasses / pickling inside the file resolve the module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # the file may import its sibling modules
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise ModelError(f"error while executing model file {path}: {type(exc).__name__}: {exc}") from exc
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    missing = [n for n in ("model", "example_input") if not hasattr(module, n)]
    if missing:
        raise ModelError(
            f"model file {path} must define `model` (nn.Module or function returning one) and "
            f"`example_input` (tensor or function returning one); missing: {', '.join(missing)}"
        )
    model = _resolve(module.model, nn.Module, "model", path)
    example = _resolve(module.example_input, torch.Tensor, "example_input", path)
    return model.eval(), example


def _resolve(obj: object, kind: type[_T], what: str, path: Path) -> _T:
    """Return ``obj`` if it is a ``kind``, else call it (no arguments) and check the result."""
    if isinstance(obj, kind):
        return obj
    if isinstance(obj, nn.Module) or not callable(obj):
        got = type(obj).__name__
        raise ModelError(f"{path}: `{what}` must be a {kind.__name__} or a function returning one, got {got}")
    try:
        value = obj()
    except Exception as exc:
        raise ModelError(f"{path}: calling `{what}()` failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(value, kind):
        raise ModelError(f"{path}: `{what}()` returned {type(value).__name__}, expected {kind.__name__}")
    return value
