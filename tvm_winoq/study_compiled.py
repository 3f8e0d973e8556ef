"""The fidelity study's compiled row: the same task metric, computed by the TVM-compiled module.

The compiled int8 kernels are bit-exact with the PyTorch integer reference
(``tests/test_kernels_bitexact.py``), so this row should match the reference row up to float32
rounding of the non-Winograd ops; it is measured anyway, because users run the module, not the simulation.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn


class CompiledAsTorch(nn.Module):
    """A model compiled for the host, called like the PyTorch model (batch 1 per call, one build per shape).

    Parameters
    ----------
    model : nn.Module
        The float (BN-folded) model.
    cfg, scales
        The :class:`~tvm_winoq.config.WinoQConfig` (with per-layer choices) and learned scales.
    tuple_output : bool
        Return ``(y,)`` like models whose first output is what the task metric reads (CRAFT).
    """

    def __init__(self, model: nn.Module, cfg, scales, tuple_output: bool) -> None:
        super().__init__()
        self.model, self.cfg, self.scales, self.tuple_output = model, cfg, scales, tuple_output
        self.runners: dict[tuple[int, ...], object] = {}
        self.build_s = 0.0

    def _runner(self, x: torch.Tensor):
        from .relax.build import compile_model

        key = tuple(x.shape)
        if key not in self.runners:
            t0 = time.time()
            self.runners[key] = compile_model(self.model, x, self.cfg, scales=self.scales).runner()
            self.build_s += time.time() - t0
        return self.runners[key]

    def forward(self, x: torch.Tensor):  # noqa: D102 - same contract as the wrapped model
        outs = [torch.from_numpy(self._runner(xi)(xi)) for xi in x.split(1)]
        y = torch.cat(outs)
        return (y,) if self.tuple_output else y


def compiled_row(
    name: str, model: nn.Module, example: torch.Tensor, cfg, scales, data: dict, ref_pred,
    log: Callable[[str], None] = print,
) -> dict:
    """The task metric of ``name`` run through the compiled module (``"compiled (TVM host): ..."``)."""
    from .study import task_metric

    with torch.no_grad():
        out = model(example)
    wrapped = CompiledAsTorch(model, cfg, scales, isinstance(out, tuple | list))
    t0 = time.time()
    metric = task_metric(data["kind"], data, model, wrapped, ref_pred)
    total = time.time() - t0
    run_s = total - wrapped.build_s
    log(f"  compiled: {len(wrapped.runners)} build(s) {wrapped.build_s:.0f} s, run {run_s:.0f} s")
    return {"method": f"compiled (TVM host): {name}", "build_s": wrapped.build_s,
            "run_s": run_s, **metric}
