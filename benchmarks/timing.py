"""Interleaved timing of zero-argument calls (the layer and model benchmarks share it)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["Call", "Timing", "time_interleaved"]

Call = Callable[[], np.ndarray]


@dataclass
class Timing:
    """Per-call seconds (``number`` calls per sample) and process CPU time / wall time."""

    samples_s: list[float]
    number: int
    cpu_per_wall: float


def time_interleaved(calls: Mapping[str, Call], repeat: int, *, warmup: int = 2, min_sample_s: float = 2e-3,
                     budget_s: float | None = None, min_repeat: int = 5,
                     gap_s: float = 0.0) -> dict[str, Timing]:
    """Time ``calls`` round-robin: every repetition runs each callable once, starting one later each round.

    Parameters
    ----------
    calls : mapping of str to zero-argument callable
    repeat : int
        Samples per callable; lowered to fit ``budget_s`` (never below ``min_repeat``).
    warmup : int
        Untimed rounds; the fastest warmup call sets ``number``, the calls per sample that make one
        sample last at least ``min_sample_s``.
    budget_s : float, optional
        Wall-clock budget of the timed rounds.
    min_repeat : int
        Floor of the budget-lowered repeat.
    gap_s : float
        Sleep before each sample (outside the timed region).

    Returns
    -------
    dict of str to Timing
    """
    names = list(calls)
    best = dict.fromkeys(names, math.inf)
    for _ in range(max(warmup, 1)):
        for n in names:
            t0 = time.perf_counter()
            calls[n]()
            best[n] = min(best[n], time.perf_counter() - t0)
    number = {n: max(1, min(1000, math.ceil(min_sample_s / max(best[n], 1e-9)))) for n in names}
    reps = repeat
    if budget_s is not None:
        per_round = sum(best[n] * number[n] + gap_s for n in names)
        reps = max(min(min_repeat, repeat), min(repeat, int(budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu = dict.fromkeys(names, 0.0)
    for r in range(reps):
        for n in names[r % len(names):] + names[: r % len(names)]:
            if gap_s:
                time.sleep(gap_s)
            fn, k = calls[n], number[n]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(k):
                fn()
            samples[n].append((time.perf_counter() - t0) / k)
            cpu[n] += time.process_time() - c0
    return {n: Timing(samples[n], number[n], cpu[n] / max(sum(samples[n]) * number[n], 1e-12)) for n in names}
