"""Train the Fashion-MNIST ResNet (``fmnist_resnet``) used by the fidelity study.

Deterministic (seeded), CPU-only; writes the checkpoint atomically, so an interrupted run leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import fashion_mnist
from .models import FMNIST_CHECKPOINT
from .models.resnet import fmnist_resnet

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set statistics


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> normalized float ``[N, 1, 28, 28]`` (the model's input convention)."""
    return (torch.from_numpy(images).float().div(255.0).sub(MEAN).div(STD)).unsqueeze(1)


def evaluate_accuracy(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 500
) -> float:
    """Top-1 accuracy (%) of ``model`` on uint8 images."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            logits = model(to_tensor(images[i : i + batch]))
            correct += int((logits.argmax(1) == torch.from_numpy(labels[i : i + batch])).sum())
    return 100.0 * correct / len(images)


def train_fmnist(
    epochs: int = 6,
    batch: int = 128,
    lr: float = 0.1,
    seed: int = 0,
    out: Path | None = None,
    log=print,
) -> dict:
    """Train with SGD + one-cycle schedule, random crop (pad 2) and horizontal flip.

    Returns ``{"test_accuracy": %, "seconds": s, "checkpoint": path}``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_tr, y_tr = fashion_mnist("train")
    x_te, y_te = fashion_mnist("test")
    model = fmnist_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * (len(x_tr) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    t0 = time.time()
    xt = to_tensor(x_tr)
    yt = torch.from_numpy(y_tr)
    for ep in range(epochs):
        model.train()
        perm = rng.permutation(len(x_tr))
        for i in range(len(x_tr) // batch):
            idx = torch.from_numpy(perm[i * batch : (i + 1) * batch])
            xb = F.pad(xt[idx], (2, 2, 2, 2), value=-MEAN / STD)
            dx, dy = rng.integers(0, 5, 2)
            xb = xb[:, :, dy : dy + 28, dx : dx + 28]
            if rng.random() < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(model(xb), yt[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate_accuracy(model, x_te, y_te)
        log(
            f"epoch {ep + 1}/{epochs}: loss {loss.item():.3f}, top-1 {acc:.2f}%, {time.time() - t0:.0f} s"
        )
    path = Path(out) if out is not None else FMNIST_CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return {"test_accuracy": acc, "seconds": time.time() - t0, "checkpoint": str(path)}
