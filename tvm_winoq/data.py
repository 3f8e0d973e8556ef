"""Offline example data: natural images from ``skimage.data`` and the Fashion-MNIST dataset.

Nothing here touches the network.  The natural images are the ones scikit-image ships inside its
wheel (images that need a ``pooch`` download are deliberately not used), and Fashion-MNIST is read
from the Debian package ``dataset-fashion-mnist`` (gzipped IDX files under
``/usr/share/datasets/fashion-mnist/``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from tvm_winoq.errors import ConfigError, WinoqError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NATURAL_IMAGE_NAMES",
    "fashion_mnist",
    "imagenet_preprocess",
    "natural_image",
    "natural_images",
    "resize_uint8",
    "to_rgb_uint8",
]

#: Images bundled with the scikit-image wheel (load offline), in the deterministic order used by
#: :func:`natural_images`.  The first eight are the photographs/scans used for calibration and tests;
#: the rest are extra (mostly grayscale) images.
NATURAL_IMAGE_NAMES: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "page",
    "text",
    "camera",
    "coins",
    "moon",
    "retina",
    "clock",
    "brick",
    "grass",
    "gravel",
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Default location of the Debian package ``dataset-fashion-mnist``; ``WINOQ_FASHION_MNIST_DIR``
#: overrides it.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Convert a grayscale, RGB or RGBA image to uint8 HWC RGB.

    Parameters
    ----------
    img : numpy.ndarray
        ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` image; uint8, bool or float in [0, 1].

    Returns
    -------
    numpy.ndarray
        ``[H, W, 3]`` uint8 array.
    """
    arr = np.asarray(img)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ConfigError(f"expected an HW, HWC (C in 1, 3, 4) image, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def resize_uint8(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a uint8 HWC image to ``size`` (``int`` for square, or ``(height, width)``).

    Uses :func:`skimage.transform.resize` with anti-aliasing; the result is uint8.
    """
    from skimage.transform import resize

    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(hw) <= 0:
        raise ConfigError(f"resize target must be positive, got {size!r}")
    img = to_rgb_uint8(img)
    if img.shape[:2] == hw:
        return img
    out = resize(img, (*hw, img.shape[2]), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def natural_image(name: str, size: int | None = 256) -> np.ndarray:
    """Load one bundled ``skimage.data`` image by name as uint8 HWC RGB.

    Parameters
    ----------
    name : str
        One of :data:`NATURAL_IMAGE_NAMES` (e.g. ``"chelsea"``, ``"page"``).
    size : int or None
        Resize to ``size x size``; ``None`` keeps the original resolution.

    Returns
    -------
    numpy.ndarray
        ``[size, size, 3]`` (or original ``[H, W, 3]``) uint8 array.

    Raises
    ------
    WinoqError
        If the name is unknown or the image cannot be loaded offline.
    """
    if name not in NATURAL_IMAGE_NAMES:
        raise WinoqError(f"unknown natural image {name!r}; known: {', '.join(NATURAL_IMAGE_NAMES)}")
    from skimage import data as skdata

    try:
        img = getattr(skdata, name)()
    except Exception as exc:  # pooch download needed / corrupt install
        raise WinoqError(f"cannot load skimage.data.{name}() offline: {exc}") from exc
    img = to_rgb_uint8(img)
    return img if size is None else resize_uint8(img, size)


def natural_images(n: int = 5, size: int = 256) -> list[np.ndarray]:
    """Return the first ``n`` bundled natural images, in a fixed order.

    Parameters
    ----------
    n : int
        Number of images, at most ``len(NATURAL_IMAGE_NAMES)``.
    size : int
        Every image is resized to ``size x size`` (aspect ratio not preserved).

    Returns
    -------
    list of numpy.ndarray
        uint8 ``[size, size, 3]`` RGB images, starting astronaut, coffee, chelsea, rocket, ...
    """
    if not 0 <= n <= len(NATURAL_IMAGE_NAMES):
        raise ConfigError(f"n must be in [0, {len(NATURAL_IMAGE_NAMES)}], got {n}")
    return [natural_image(name, size) for name in NATURAL_IMAGE_NAMES[:n]]


def imagenet_preprocess(img_uint8: np.ndarray, size: int = 224) -> torch.Tensor:
    """Standard ImageNet evaluation preprocessing of one image.

    Resize the shorter side to ``round(size * 256 / 224)``, center-crop ``size x size``, scale to
    [0, 1] and normalise with the ImageNet mean/std (torchvision's ``Resize(256) + CenterCrop(224)``).

    Parameters
    ----------
    img_uint8 : numpy.ndarray
        uint8 image, HW or HWC (gray, RGB or RGBA).
    size : int
        Output side length.

    Returns
    -------
    torch.Tensor
        float32 ``[1, 3, size, size]`` (NCHW).
    """
    img = to_rgb_uint8(img_uint8)
    h, w = img.shape[:2]
    short = round(size * 256 / 224)
    scale = short / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = resize_uint8(img, (nh, nw))
    top, left = (nh - size) // 2, (nw - size) // 2
    img = img[top : top + size, left : left + size]
    x = img.astype(np.float32) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=">u4", count=1)[0]
    if header != magic:
        raise WinoqError(f"{path}: not an IDX file of the expected type (magic {header:#010x})")
    ndim = magic & 0xFF
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise WinoqError(f"{path}: truncated IDX file ({data.size} bytes for dims {dims})")
    return data.reshape(dims).copy()  # frombuffer gives a read-only view of the bytes


def fashion_mnist(split: str = "test", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.

    Parameters
    ----------
    split : {"test", "train"}
        ``"test"`` has 10 000 images, ``"train"`` 60 000.
    root : str or Path, optional
        Folder with the ``*-idx?-ubyte[.gz]`` files; default ``$WINOQ_FASHION_MNIST_DIR`` or
        ``/usr/share/datasets/fashion-mnist``.

    Returns
    -------
    images : numpy.ndarray
        uint8 ``[N, 28, 28]``.
    labels : numpy.ndarray
        int64 ``[N]`` in ``0..9`` (see :data:`FASHION_MNIST_CLASSES`).

    Raises
    ------
    WinoqError
        If the dataset files are missing (install with ``apt-get install dataset-fashion-mnist``).
    """
    prefixes = {"test": "t10k", "train": "train"}
    if split not in prefixes:
        raise ConfigError(f"split must be 'test' or 'train', got {split!r}")
    folder = Path(root or os.environ.get("WINOQ_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        stem = folder / f"{prefixes[split]}-{kind}"
        found = next((p for p in (stem.with_name(stem.name + ".gz"), stem) if p.is_file()), None)
        if found is None:
            raise WinoqError(
                f"Fashion-MNIST {split} split not found in {folder} (missing {stem.name}[.gz]); "
                "install it with `apt-get install dataset-fashion-mnist` or set WINOQ_FASHION_MNIST_DIR"
            )
        paths.append(found)
    images = _read_idx(paths[0], _IDX_IMAGES_MAGIC)
    labels = _read_idx(paths[1], _IDX_LABELS_MAGIC).astype(np.int64)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise WinoqError(f"Fashion-MNIST {split}: inconsistent shapes {images.shape} / {labels.shape}")
    return images, labels
