"""torchvision-compatible ResNet-18/34 and a small ResNet for 28x28 Fashion-MNIST.

:class:`ResNet` reproduces torchvision's module tree and parameter names (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0``, ..., ``fc``), so torchvision state dicts load
unchanged.  No torchvision import is needed (the PyPI torchvision build does not match this torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tvm_winoq.errors import ModelError, WeightsNotFoundError

__all__ = ["BasicBlock", "ResNet", "fmnist_resnet", "load_checkpoint", "resnet18", "resnet34"]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 conv+BN, identity or 1x1-conv+BN shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with :class:`BasicBlock` stages (torchvision layout).

    Parameters
    ----------
    layers : sequence of int
        Blocks per stage (``[2, 2, 2, 2]`` is ResNet-18, ``[3, 4, 6, 3]`` ResNet-34).
    num_classes : int
        Width of the final ``fc`` layer.
    in_channels : int
        Input image channels.
    widths : sequence of int
        Output channels of each stage (torchvision: 64, 128, 256, 512).
    small_input : bool
        ``False``: ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool).  ``True``: CIFAR/MNIST
        stem (3x3 stride-1 conv, no max-pool) for small images.
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ModelError(f"layers {list(layers)} and widths {list(widths)} must be equally long")
        stem = widths[0]
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.maxpool: nn.Module = nn.Identity() if small_input else nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = stem
        for i, (n_blocks, width) in enumerate(zip(layers, widths, strict=True), start=1):
            stride = 1 if i == 1 else 2
            blocks = [
                BasicBlock(in_ch if j == 0 else width, width, stride if j == 0 else 1)
                for j in range(n_blocks)
            ]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_ch = width
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 (torchvision layout, random init).

    Parameters
    ----------
    num_classes : int
        Classifier width.

    Returns
    -------
    ResNet
        Randomly initialised model (call ``torch.manual_seed`` first for reproducibility).
    """
    return ResNet([2, 2, 2, 2], num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    """ResNet-34 (torchvision layout, random init).

    Parameters
    ----------
    num_classes : int
        Classifier width.

    Returns
    -------
    ResNet
        Randomly initialised model (call ``torch.manual_seed`` first for reproducibility).
    """
    return ResNet([3, 4, 6, 3], num_classes)


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict (strict) into ``model``.

    ``path`` may hold a plain state dict or a dict with a ``"state_dict"`` or ``"model"`` entry;
    a DataParallel ``module.`` prefix is stripped.

    Parameters
    ----------
    model : torch.nn.Module
        Model to fill.
    path : str or Path
        ``torch.save`` file.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    WeightsNotFoundError
        If the file does not exist.
    ModelError
        If it is not a matching checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ModelError(f"{path} does not contain a state dict (got {type(obj).__name__})")
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path} does not match {type(model).__name__}: {exc}") from exc
    return model


def fmnist_resnet(checkpoint: str | Path | None = None, num_classes: int = 10) -> ResNet:
    """ResNet-18-style network for ``[N, 1, 28, 28]`` Fashion-MNIST images.

    3x3 stride-1 stem (16 channels, no max-pool) and four stages of two BasicBlocks at widths
    16/32/64/128 with strides 1/2/2/2 (28 -> 28 -> 14 -> 7 -> 4), global average pool, linear.
    15 of its 20 convolutions are 3x3 stride 1.

    Parameters
    ----------
    checkpoint : str or Path, optional
        Trained weights to load strictly (see :func:`load_checkpoint`); random init if ``None``.
    num_classes : int
        Classifier width.

    Returns
    -------
    ResNet
        The model (train mode; the registry puts it in eval mode).
    """
    model = ResNet([2, 2, 2, 2], num_classes, in_channels=1, widths=(16, 32, 64, 128), small_input=True)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model
