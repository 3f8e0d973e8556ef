"""TVM Relax compiler flow: PyTorch model -> Relax -> quantized group-wise Winograd TIR kernels.

* :mod:`.importer` -- BatchNorm folding, ``torch.export``, ``from_exported_program``
* :mod:`.kernels` -- the TIR kernels of one layer (bit-exact with :mod:`tvm_winoq.quant.reference`)
* :mod:`.rewrite` -- the Relax pass replacing eligible ``conv2d`` calls by those kernels
* :mod:`.schedules` -- loads the hand-written schedules of ``schedules/<family>.py`` for a target
* :mod:`.build` -- compile, export ``.so``, load into a ``relax.VirtualMachine``
"""

from .build import (
    CompiledModel,
    LayerExecutable,
    LoadedModel,
    compile_layer,
    compile_model,
    host_target,
    load,
)
from .importer import ImportedModel, import_model
from .kernels import KernelSpec, layer_constants
from .rewrite import RewriteRecord, WinogradRewrite

__all__ = [
    "CompiledModel",
    "ImportedModel",
    "KernelSpec",
    "LayerExecutable",
    "LoadedModel",
    "RewriteRecord",
    "WinogradRewrite",
    "compile_layer",
    "compile_model",
    "host_target",
    "import_model",
    "layer_constants",
    "load",
]
