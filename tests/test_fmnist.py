"""The Fashion-MNIST ResNet: the shipped checkpoint (made by ``winoq train-fmnist``) is trained."""

from __future__ import annotations

import pytest
import torch

from tvm_winoq.data import fashion_mnist
from tvm_winoq.models import FMNIST_CHECKPOINT, get_model
from tvm_winoq.train_fmnist import evaluate_accuracy, to_tensor


@pytest.mark.slow
def test_shipped_checkpoint_is_trained() -> None:
    assert FMNIST_CHECKPOINT.is_file(), "run `winoq train-fmnist` to produce the checkpoint"
    model, x = get_model("fmnist_resnet")
    assert x.shape == (1, 1, 28, 28)
    images, labels = fashion_mnist("test")
    assert len(images) == 10_000
    assert evaluate_accuracy(model, images, labels) >= 92.0  # full test set


def test_to_tensor_normalizes() -> None:
    images, _ = fashion_mnist("train")
    x = to_tensor(images[:2000])
    assert x.shape == (2000, 1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1.0) < 0.1
