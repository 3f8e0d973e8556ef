"""Accuracy metrics."""

from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - test|^2)`` in dB."""
    ref = reference.detach().to(torch.float64)
    err = (ref - test.detach().to(torch.float64)).pow(2).sum().item()
    sig = ref.pow(2).sum().item()
    if err == 0:
        return math.inf
    if sig == 0:
        return -math.inf
    return 10.0 * math.log10(sig / err)


def sqnr_db_t(reference: torch.Tensor, test: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    """Differentiable SQNR in dB (float tensor), for training losses."""
    sig = reference.pow(2).sum()
    err = (reference - test).pow(2).sum()
    return 10.0 * torch.log10((sig + eps) / (err + eps))
