"""Offline example data: skimage natural images and Fashion-MNIST."""

from __future__ import annotations

import gzip
import socket

import numpy as np
import pytest
import torch

from tvm_winoq import data
from tvm_winoq.errors import ConfigError, WinoqError


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_all_natural_images_load_offline(no_network) -> None:
    imgs = data.natural_images(len(data.NATURAL_IMAGE_NAMES), size=64)
    assert len(imgs) == len(data.NATURAL_IMAGE_NAMES)
    for img in imgs:
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert img.std() > 5  # not blank


def test_natural_images_order_and_determinism() -> None:
    a = data.natural_images(3, size=32)
    b = [data.natural_image(n, 32) for n in ("astronaut", "coffee", "chelsea")]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert data.natural_images()[0].shape == (256, 256, 3)


def test_page_by_name_is_gray_rgb() -> None:
    page = data.natural_image("page", 128)
    assert page.shape == (128, 128, 3)
    assert np.array_equal(page[..., 0], page[..., 1]) and np.array_equal(page[..., 1], page[..., 2])
    assert data.natural_image("page", None).shape == (191, 384, 3)


def test_natural_image_errors() -> None:
    with pytest.raises(WinoqError, match="known"):
        data.natural_image("lena")
    with pytest.raises(ConfigError):
        data.natural_images(len(data.NATURAL_IMAGE_NAMES) + 1)


def test_imagenet_preprocess() -> None:
    x = data.imagenet_preprocess(data.natural_image("chelsea", None))
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    assert -3 < x.mean().item() < 3 and 0.3 < x.std().item() < 3
    gray = np.full((300, 500), 124, np.uint8)  # ~ ImageNet red mean
    assert data.imagenet_preprocess(gray, 32).shape == (1, 3, 32, 32)


@pytest.mark.skipif(not data.FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_test_split() -> None:
    images, labels = data.fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels), np.full(10, 1000))
    assert len(data.FASHION_MNIST_CLASSES) == 10


def _write_idx(path, arr: np.ndarray, magic: int, compress: bool) -> None:
    raw = np.array([magic, *arr.shape], ">u4").tobytes() + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_fashion_mnist_reader_and_missing(tmp_path) -> None:
    imgs = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs, 0x803, compress=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([9, 0, 4]), 0x801, compress=False)
    x, y = data.fashion_mnist("test", root=tmp_path)
    assert np.array_equal(x, imgs) and y.tolist() == [9, 0, 4]
    with pytest.raises(WinoqError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("train", root=tmp_path)
    with pytest.raises(ConfigError):
        data.fashion_mnist("val")
