"""End-to-end compiler flow: PyTorch model -> Relax -> Winograd rewrite -> schedules -> VM executable.

::

    cm = compile_model(model, x, groupwise(tile=4), target=host_target())
    cm.export("model.so")            # + model.json (input shape, rewrite records)
    runner = load("model.so")        # in any process
    y = runner(x.numpy())

``python -m tvm_winoq.relax.build run model.so in.npy out.npy`` runs an exported model in a fresh
process (used by the tests).  With ``keep_params_as_input`` the weights the rewrite does not transform
stay parameters of ``main``; ``export`` writes them beside the library (``model.params``,
``tvm.runtime.save_param_dict`` format, their order in ``model.json``) and :func:`load` passes them.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax

from ..config import WinoQConfig
from ..errors import ModelError
from ..quant.plan import LayerScales, WinogradLayerPlan
from .importer import bind_params, import_model
from .kernels import KernelSpec, gemm_func, input_func, layer_constants, output_func
from .rewrite import RewriteRecord, WinogradRewrite

__all__ = ["CompiledModel", "LayerExecutable", "LoadedModel", "compile_layer", "compile_model", "host_target",
           "load", "lower", "prepare_module", "tuned_functions"]


#: LLVM tuning features for x86 targets: scalar loads/stores instead of AVX-512 gathers/scatters
X86_NO_GATHER = ("+prefer-no-gather", "+prefer-no-scatter")


def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """The LLVM target of this machine (``mcpu`` from LLVM's host detection, all cores by default).

    On x86 the target asks LLVM for no gathers/scatters (:data:`X86_NO_GATHER`): with AVX-512 it
    vectorizes the transforms' strided accesses into ``vgatherdps``/``vpscatterqd``, which made the input
    kernel 14x slower on an Intel Xeon (microcoded gathers).  Pass an explicit target such as
    ``{"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}`` to build for any AVX2 + FMA CPU.
    """
    import os

    cfg: dict[str, object] = {"kind": "llvm", "num-cores": num_cores or os.cpu_count() or 1}
    cpu = tvm.target.codegen.llvm_get_system_cpu() if hasattr(tvm.target, "codegen") else None
    if cpu and cpu != "generic":
        cfg["mcpu"] = cpu
    if platform.machine() in ("x86_64", "AMD64"):
        cfg["mattr"] = list(X86_NO_GATHER)
    return tvm.target.Target(cfg)


def _as_target(target: tvm.target.Target | str | dict | None) -> tvm.target.Target:
    if target is None:
        return host_target()
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def lower(
    mod: tvm.IRModule, target: tvm.target.Target, schedule: bool = True, database: Any = None
) -> tvm.IRModule:
    """Legalize and fuse the Relax ops, and schedule every PrimFunc for ``target``.

    Our Winograd kernels get the hand-written schedules of the target's family in ``schedules/``
    (see :mod:`.schedules`); the legalized remaining operators get that family's generic schedule.
    With ``schedule=False`` everything stays naive TIR (the module ``winoq tune`` extracts tasks from).
    A ``database`` (:class:`tvm_winoq.tune.TuneLog`) is applied to the fused module first: its tuned
    PrimFuncs (attribute ``winoq.tuned``) win over the hand schedules, which schedule the rest.
    Families with ``prepack_gemm`` / ``prepack_direct`` hooks get the constant weights of every GEMM /
    direct kernel that is not tuned packed at compile time (:class:`.prepack.PrepackWeights`).
    """
    from .legalize import cpu_legalize_map
    from .schedules import schedules_for

    family = schedules_for(target) if schedule else None
    with target:
        if family is not None and database is None:
            mod = family.schedule_winoq_kernels(_prepack(mod, family, target), target)
        mod = tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.LegalizeOps(cpu_legalize_map() if target.kind.name == "llvm" else None),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ])(mod)
        if database is not None:
            from ..tune import apply_database

            mod = apply_database(mod, target, database)
            if family is not None:  # tuned GEMMs keep their kernel (the hook declines scheduled ones)
                mod = family.schedule_winoq_kernels(_prepack(mod, family, target), target)
        if family is not None:
            mod = family.schedule_other_ops(mod, target)
    return mod


def _prepack(mod: tvm.IRModule, family: Any, target: tvm.target.Target) -> tvm.IRModule:
    """The family's compile-time packing of constant kernel weights (:mod:`.prepack`), where it has hooks."""
    hooks = {kind: getattr(family, f"prepack_{kind}") for kind in ("gemm", "direct")
             if hasattr(family, f"prepack_{kind}")}
    if not hooks:
        return mod
    from .prepack import PrepackWeights

    return PrepackWeights(hooks, target)(mod)


def tuned_functions(mod: tvm.IRModule) -> list[str]:
    """Names of the PrimFuncs of a lowered module that use tuning-database schedules."""
    return sorted(gv.name_hint for gv, f in mod.functions.items()
                  if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "winoq.tuned" in f.attrs)


@dataclass
class CompiledModel:
    """A built model: the VM executable plus what the rewrite did.

    ``params`` (name -> float array, in the order of ``main``'s trailing parameters) is empty unless the
    model was compiled with ``keep_params_as_input``.
    """

    executable: tvm.runtime.Executable
    input_shape: tuple[int, ...]
    records: list[RewriteRecord]
    target: str
    tuned: list[str] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)

    def export(self, path: str | Path) -> Path:
        """Write ``path`` (shared library) and its sidecars (:meth:`write_sidecars`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.executable.export_library(str(path))
        self.write_sidecars(path)
        return path

    def write_sidecars(self, lib_path: str | Path) -> list[Path]:
        """Write ``lib_path.with_suffix('.json')`` (input shape, target, rewrite records, parameter names)
        and, with parameters, ``lib_path.with_suffix('.params')`` (``tvm.runtime.save_param_dict``)."""
        lib_path = Path(lib_path)
        meta: dict[str, Any] = {"input_shape": list(self.input_shape), "target": self.target,
                                "records": [asdict(r) for r in self.records]}
        written = [lib_path.with_suffix(".json")]
        if self.params:
            pfile = lib_path.with_suffix(".params")
            pfile.write_bytes(tvm.runtime.save_param_dict(
                {n: tvm.runtime.tensor(np.ascontiguousarray(v)) for n, v in self.params.items()}))
            meta["params"] = {"file": pfile.name, "names": list(self.params)}
            written.append(pfile)
        written[0].write_text(json.dumps(meta, indent=1))
        return written

    def runner(self, device: tvm.runtime.Device | None = None) -> LoadedModel:
        """Run in this process (no export)."""
        dev = device or tvm.cpu()
        params = [tvm.runtime.tensor(np.ascontiguousarray(v), dev) for v in self.params.values()]
        return LoadedModel(relax.VirtualMachine(self.executable, dev), self.input_shape, params, dev)


@dataclass
class LoadedModel:
    """A loaded Relax VM: call it with a float32 NCHW array (``params`` are passed after it)."""

    vm: relax.VirtualMachine
    input_shape: tuple[int, ...]
    params: list[tvm.runtime.Tensor] = field(default_factory=list)
    device: tvm.runtime.Device = field(default_factory=tvm.cpu)
    _input: tvm.runtime.Tensor | None = field(default=None, init=False, repr=False)

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Run ``main`` on ``x``; the result is a NumPy view of the output tensor (no copy).

        A CPU array aligned to 64 bytes (PyTorch's and TVM's allocations are) is passed without a copy
        (DLPack); any other input goes into one tensor allocated on the first call (a fresh tensor per
        call, and a copy of the output, cost 0.3 ms at 64@56 and 6 ms at 320@64: page faults on new
        memory; the copy into the kept tensor, ~0.1 ms at 64@56)."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if tuple(arr.shape) != tuple(self.input_shape):
            raise ModelError(f"input shape {arr.shape} != compiled shape {tuple(self.input_shape)}")
        if _on_cpu(self.device) and arr.ctypes.data % _ALIGN == 0:
            inp = tvm.runtime.from_dlpack(arr)
        else:
            if self._input is None:
                self._input = tvm.runtime.empty(arr.shape, "float32", self.device)
            self._input.copyfrom(arr)
            inp = self._input
        out = self.vm["main"](inp, *self.params)
        out = out if hasattr(out, "numpy") else out[0]
        if any(out.same_as(t) for t in (inp, *self.params)):  # main returned an argument
            return out.numpy()
        return _to_numpy(out)

    def time(self, x: np.ndarray, repeat: int = 10) -> float:
        """Median seconds per call of ``main`` (VM ``time_evaluator``)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.vm.set_input("main", tvm.runtime.tensor(x, self.device), *self.params)
        te = self.vm.time_evaluator("invoke_stateful", self.device, number=1, repeat=repeat)
        return float(np.median(te("main").results))


_ALIGN = 64
"""Byte alignment TVM requires of a tensor's data (``from_dlpack`` refuses less)."""


def _on_cpu(device: tvm.runtime.Device) -> bool:
    return device.dlpack_device_type() == tvm.cpu().dlpack_device_type()


def _to_numpy(t: tvm.runtime.Tensor) -> np.ndarray:
    """A host tensor as a NumPy array sharing its memory (DLPack); a copy for device tensors."""
    if _on_cpu(t.device):
        return np.from_dlpack(t)
    return t.numpy()


def compile_model(
    model: nn.Module,
    example_input: torch.Tensor,
    cfg: WinoQConfig,
    *,
    target: tvm.target.Target | str | dict | None = None,
    scales: LayerScales | Mapping[str, LayerScales] | None = None,
    keep_params_as_input: bool = False,
    winograd: bool = True,
    schedule: bool = True,
    database: Any = None,
) -> CompiledModel:
    """Import ``model``, rewrite its eligible convs to quantized Winograd and build for ``target``.

    Parameters
    ----------
    model, example_input
        Float model and one float32 NCHW input (static shape).
    cfg : WinoQConfig
        Winograd tile, quantization and per-layer choices.
    target : Target, str or dict, optional
        Build target (default :func:`host_target`).
    scales : LayerScales or mapping, optional
        Learned scales (shared or per layer name).
    keep_params_as_input : bool
        Import with the weights as parameters.  The weights of the convolutions the rewrite takes
        (Winograd or int8 direct: transformed and quantized offline) become constants; every other
        weight stays a parameter of ``main`` (``CompiledModel.params``, written beside the library by
        :meth:`CompiledModel.export`).
    winograd : bool
        ``False`` builds the plain float model (the baseline).
    schedule : bool
        Apply the CPU schedules (``False``: naive TIR).
    database : TuneLog, str or Path, optional
        ``winoq tune`` log (:func:`tvm_winoq.tune.read_tune_log`, or its folder) whose tuned schedules
        replace the hand schedules of the PrimFuncs it covers (``CompiledModel.tuned`` names them).

    Returns
    -------
    CompiledModel
    """
    tgt = _as_target(target)
    if isinstance(database, str | Path):
        from ..tune import read_tune_log

        database = read_tune_log(database, tgt)
    mod, input_shape, records, params = _prepare(model, example_input, cfg, scales, keep_params_as_input,
                                                 winograd)
    mod = lower(mod, tgt, schedule=schedule, database=database)
    try:
        ex = tvm.compile(mod, target=tgt)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{type(model).__name__}: TVM build failed: {e}") from e
    return CompiledModel(ex, input_shape, records, str(tgt), tuned_functions(mod), params)


def prepare_module(
    model: nn.Module,
    example_input: torch.Tensor,
    cfg: WinoQConfig,
    *,
    scales: LayerScales | Mapping[str, LayerScales] | None = None,
    keep_params_as_input: bool = False,
    winograd: bool = True,
) -> tuple[tvm.IRModule, tuple[int, ...], list[RewriteRecord]]:
    """Import ``model`` and rewrite its eligible convs: the Relax module that :func:`lower` takes.

    Returns
    -------
    mod : IRModule
        Weights bound (with ``keep_params_as_input``: those of the rewritten convs), Winograd / direct
        kernels (``winoq.kernel`` PrimFuncs) in place, nothing lowered.
    input_shape : tuple of int
    records : list of RewriteRecord
        One per convolution (rewritten or why not).
    """
    mod, shape, records, _ = _prepare(model, example_input, cfg, scales, keep_params_as_input, winograd)
    return mod, shape, records


def _prepare(
    model: nn.Module,
    example_input: torch.Tensor,
    cfg: WinoQConfig,
    scales: LayerScales | Mapping[str, LayerScales] | None,
    keep_params_as_input: bool,
    winograd: bool,
) -> tuple[tvm.IRModule, tuple[int, ...], list[RewriteRecord], dict[str, np.ndarray]]:
    """:func:`prepare_module` plus the parameters left in ``main`` (name -> array, in order)."""
    imp = import_model(model, example_input, keep_params_as_input=keep_params_as_input)
    if not winograd:
        return relax.transform.FoldConstant()(imp.mod), imp.input_shape, [], dict(imp.params)
    rw = WinogradRewrite(cfg, scales, imp.layer_names)
    mod = rw(relax.transform.FoldConstant()(bind_params(imp.mod, imp.params)))
    records = list(rw.records)
    if not imp.params:
        return mod, imp.input_shape, records, {}
    # separate params: bind only the weights of the rewritten convs (their transform is offline)
    taken = {r.name for r in records if r.rewritten}
    bind = {n: v for n, v in imp.params.items() if imp.param_targets.get(n, "").rpartition(".")[0] in taken}
    rest = {n: v for n, v in imp.params.items() if n not in bind}
    rw_part = WinogradRewrite(cfg, scales, imp.layer_names)
    part = rw_part(relax.transform.FoldConstant()(bind_params(imp.mod, bind)))
    def done(recs: list[RewriteRecord]) -> list[tuple[str, str, str]]:
        return [(r.name, r.kind, r.reason) for r in recs if r.rewritten]

    if done(rw_part.records) != done(records):  # a rewritten conv not mapped to its parameters
        return mod, imp.input_shape, records, {}  # keep everything bound
    return part, imp.input_shape, records, rest  # the reasons of the fully bound pass (constants)


@dataclass
class LayerExecutable:
    """The three kernels of one Winograd layer, built standalone (tests and benchmarks)."""

    spec: KernelSpec
    module: tvm.runtime.Module
    consts: dict[str, np.ndarray]
    debug: bool

    def _buffers(self, x: np.ndarray) -> dict[str, tvm.runtime.Tensor]:
        s = self.spec
        p, t, c, k = s.positions, s.tiles, s.in_channels, s.out_channels
        shapes = {"v_q": ((p, t, c), s.v.dtype), "s_v": (s.sv_shape, "float32"), "s_x": ((1,), "float32"),
                  "m_f": ((p, t, k), "float32"), "y": (s.out_shape, "float32")}
        if self.debug:
            shapes |= {"acc": ((p, t, k, s.gemm_groups), "int32"), "m_q": ((p, t, k), s.m_quant.dtype),
                       "s_m": (s.sm_shape, "float32")}
        bufs = {n: tvm.runtime.tensor(np.zeros(sh, dt)) for n, (sh, dt) in shapes.items()}
        bufs["x"] = tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32))
        bufs |= {n: tvm.runtime.tensor(v) for n, v in self.consts.items()}
        return bufs

    def _args(self, b: dict[str, tvm.runtime.Tensor]) -> list[tuple[str, list[tvm.runtime.Tensor]]]:
        gemm = ["v_q", "s_v", "u_q", "s_u"] + (["acc"] if self.debug else []) + ["m_f"]
        out = ["m_f", "s_x", "bias"] + (["m_q", "s_m"] if self.debug else []) + ["y"]
        return [("winoq_input", [b[n] for n in ("x", "v_q", "s_v", "s_x")]),
                ("winoq_gemm", [b[n] for n in gemm]), ("winoq_output", [b[n] for n in out])]

    def __call__(self, x: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Run on ``x``; returns every produced tensor by name (``y``, ``v_q``, ``m_f``, ...)."""
        arr = x.numpy() if isinstance(x, torch.Tensor) else x
        b = self._buffers(arr)
        for name, args in self._args(b):
            self.module[name](*args)
        return {n: v.numpy() for n, v in b.items() if n not in ("x", *self.consts)}

    def time(self, x: np.ndarray, number: int = 5, repeat: int = 5) -> dict[str, float]:
        """Median seconds per kernel (``time_evaluator``)."""
        b = self._buffers(x)
        out = {}
        for name, args in self._args(b):
            self.module[name](*args)
            te = self.module.time_evaluator(name, tvm.cpu(), number=number, repeat=repeat)
            out[name] = float(np.median(te(*args).results))
        return out


def compile_layer(
    plan: WinogradLayerPlan,
    x_shape: tuple[int, ...],
    target: tvm.target.Target | str | dict | None = None,
    *,
    debug: bool = False,
    schedule: bool = True,
) -> LayerExecutable:
    """Build the kernels of one layer (``debug`` adds the integer intermediates as outputs)."""
    tgt = _as_target(target)
    spec = KernelSpec.from_plan(plan, x_shape)
    funcs = {"winoq_input": input_func(spec, debug), "winoq_gemm": gemm_func(spec, debug),
             "winoq_output": output_func(spec, debug)}
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n).with_attr("winoq.kernel", n[6:])
                        for n, f in funcs.items()})
    from .schedules import schedules_for

    family = schedules_for(tgt) if schedule else None
    if family is not None:
        mod = family.schedule_winoq_kernels(mod, tgt)
    lib = tvm.compile(mod, target=tgt).jit()
    return LayerExecutable(spec, lib, layer_constants(plan), debug)


def load(path: str | Path, device: tvm.runtime.Device | None = None) -> LoadedModel:
    """Load an exported model (``.so`` + ``.json``, and ``.params`` when it has parameters) into a Relax VM.

    Raises
    ------
    ModelError
        If the metadata or the parameters file is missing or unreadable.
    """
    path = Path(path)
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path.with_suffix('.json')}: cannot read the module metadata ({e})") from e
    dev = device or tvm.cpu()
    params: list[tvm.runtime.Tensor] = []
    if meta.get("params"):
        pfile = path.with_name(meta["params"]["file"])
        try:
            saved = tvm.runtime.load_param_dict(pfile.read_bytes())
            params = [saved[n].copyto(dev) for n in meta["params"]["names"]]
        except (OSError, KeyError, RuntimeError) as e:
            raise ModelError(f"{pfile}: cannot load the module's parameters ({e}); it must lie beside "
                             f"{path.name} as written by winoq compile --keep-params") from e
    lib = tvm.runtime.load_module(str(path))
    return LoadedModel(relax.VirtualMachine(lib, dev), tuple(meta["input_shape"]), params)


def _main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "run":
        print("usage: python -m tvm_winoq.relax.build run MODEL.so IN.npy OUT.npy", file=sys.stderr)
        return 2
    runner = load(argv[1])
    np.save(argv[3], runner(np.load(argv[2])))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
