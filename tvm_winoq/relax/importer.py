"""PyTorch -> Relax import: fold BatchNorm, ``torch.export`` with static shapes, ``from_exported_program``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax
from tvm.relax.frontend import detach_params
from tvm.relax.frontend.torch import from_exported_program

from ..convert import ConvInfo, eligible_convs, fold_batchnorm
from ..errors import ModelError
from .rewrite import weight_fingerprint

__all__ = ["ImportedModel", "bind_params", "import_model"]


@dataclass
class ImportedModel:
    """A model imported into Relax.

    Attributes
    ----------
    mod : tvm.IRModule
        ``main(x)`` (or ``main(x, *params)`` with ``keep_params_as_input``), static shapes, no "params"
        attribute (detached into :attr:`params`).
    params : dict
        Relax parameter name -> float array, in ``main``'s parameter order; empty unless
        ``keep_params_as_input``.
    param_targets : dict
        Relax parameter name -> PyTorch state-dict name (``p_layer1_0_conv1_weight`` ->
        ``layer1.0.conv1.weight``).
    input_shape : tuple of int
        Static NCHW shape of ``x``.
    layer_names : dict
        :func:`~tvm_winoq.relax.rewrite.weight_fingerprint` of each conv weight -> conv name, so the
        rewrite pass can name layers whose weights became Relax constants.
    convs : list of ConvInfo
        Every ``nn.Conv2d`` of the (folded) model and its Winograd eligibility.
    folded : nn.Module
        The BatchNorm-folded model that was exported (eval mode).
    """

    mod: tvm.IRModule
    params: dict[str, np.ndarray]
    param_targets: dict[str, str]
    input_shape: tuple[int, ...]
    layer_names: dict[str, str]
    convs: list[ConvInfo]
    folded: nn.Module = field(repr=False)


def _check_static(mod: tvm.IRModule) -> None:
    func = mod["main"]
    for p in func.params:
        ty = p.ty
        if isinstance(ty, relax.TensorType):
            if ty.shape is None or any(not isinstance(d, tvm.tirx.IntImm) for d in ty.shape):
                raise ModelError(f"input {p.name!r} has a dynamic shape {ty}; export with static shapes")
    sym = list(relax.analysis.defined_symbolic_vars(func)) + list(relax.analysis.free_symbolic_vars(func))
    if sym:
        names = sorted({str(v) for v in sym})
        raise ModelError(f"the imported model has dynamic (symbolic) shapes {names}; only static shapes "
                         "are supported")


def import_model(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    keep_params_as_input: bool = False,
    fold_bn: bool = True,
) -> ImportedModel:
    """Fold BatchNorm into the convs, export with ``torch.export`` and convert to Relax.

    Parameters
    ----------
    model : nn.Module
        Float model (not modified).
    example_input : torch.Tensor
        One float32 NCHW input; its shape becomes the (static) input shape of ``main``.
    keep_params_as_input : bool
        Keep weights as trailing parameters of ``main`` (returned in :attr:`ImportedModel.params`)
        instead of binding them as constants.
    fold_bn : bool
        Fold ``Conv2d -> BatchNorm2d`` pairs first (:func:`tvm_winoq.convert.fold_batchnorm`).

    Returns
    -------
    ImportedModel

    Raises
    ------
    ModelError
        If the input is not a float32 tensor, the model fails to run / export / convert, or the
        result has dynamic shapes.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dtype != torch.float32:
        raise ModelError("example_input must be one float32 torch.Tensor")
    name = type(model).__name__
    try:
        folded = fold_batchnorm(model, example_input) if fold_bn else model.eval()
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward
        raise ModelError(f"{name}: running the model on the example input failed: {e}") from e
    try:
        with torch.no_grad():
            ep = torch.export.export(folded, (example_input,))
    except Exception as e:  # noqa: BLE001 - torch.export raises many error types
        raise ModelError(f"{name}: torch.export failed: {type(e).__name__}: {e}") from e
    try:
        mod = from_exported_program(
            ep, keep_params_as_input=keep_params_as_input, unwrap_unit_return_tuple=True
        )
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{name}: Relax import (from_exported_program) failed: {e}") from e
    _check_static(mod)
    params: dict[str, np.ndarray] = {}
    targets: dict[str, str] = {}
    if keep_params_as_input:
        mod, detached = detach_params(mod)
        values = detached.get("main", [])
        n_in = int(mod["main"].attrs["num_input"])
        names = [p.name for p in mod["main"].params[n_in:]]
        params = {n: v.numpy() for n, v in zip(names, values, strict=True)}
        spec_targets = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.target}
        targets = {n: spec_targets.get(n, n) for n in names}
    convs = eligible_convs(folded)
    layer_names = {weight_fingerprint(folded.get_submodule(c.name).weight.detach().numpy()): c.name
                   for c in convs}
    return ImportedModel(mod=mod, params=params, param_targets=targets,
                         input_shape=tuple(example_input.shape), layer_names=layer_names, convs=convs,
                         folded=folded)


def bind_params(mod: tvm.IRModule, params: dict[str, np.ndarray]) -> tvm.IRModule:
    """Bind ``params`` (Relax parameter name -> array) of ``main`` as constants (``num_input`` is dropped
    once no parameter is left)."""
    if not params:
        return mod
    bound = relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)
    func = bound["main"]
    attrs = func.attrs
    if attrs is not None and "num_input" in attrs and len(func.params) == int(attrs["num_input"]):
        bound["main"] = func.without_attr("num_input")
    return bound
