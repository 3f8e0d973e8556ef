"""Find and load the hand-written schedules in the top-level ``schedules/`` folder.

``schedules/<family>.py`` is a plain Python module (loaded by path, so users can drop in their own
family or point ``WINOQ_SCHEDULES_DIR`` elsewhere; see :mod:`tvm_winoq.paths`).  Every family module
provides ``schedule_winoq_kernels(mod, target)`` (our Winograd kernels) and
``schedule_other_ops(mod, target)`` (every other legalized operator).  Optional hooks:
``prepack_gemm(func, target)`` / ``prepack_direct(func, target)`` (constant weights packed at compile
time, :mod:`.prepack`) and ``tensorized_direct(target)`` (``True`` where the int8 direct kernel runs on
a dot-product micro-kernel: ``winoq compile`` then measures which layers it makes faster).  Families:

* ``cpu``  -- any LLVM CPU target (x86 AVX2/AVX-512, Arm NEON): parallel, vectorized, register blocked;
* ``arm``  -- aarch64 with ``dotprod``/``i8mm``: the ``cpu`` family with the GEMM tensorized to sdot/smmla
  and the int8 direct kernel to sdot (when that module exists);
* ``x86``  -- x86-64 (``mtriple`` x86_64...): the ``cpu`` family with the GEMM tensorized to
  ``vpmaddwd`` (AVX2) / ``vpdpbusd`` (AVX-512 VNNI), and the int8 direct kernel on the same
  instructions (when that module exists);
* ``cuda`` -- CUDA targets (when that module exists).
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from functools import cache
from types import ModuleType

import tvm

from ..errors import TargetError
from ..paths import schedules_dir


@cache
def load_module(name: str) -> ModuleType:
    """Import ``schedules/<name>.py`` (cached) as module ``winoq_schedules.<name>``: a family, or a
    helper module that families share (``cpu_ops``)."""
    path = schedules_dir() / f"{name}.py"
    if not path.is_file():
        raise TargetError(f"no schedule module {name!r} (expected {path})")
    full = f"winoq_schedules.{name}"
    spec = importlib.util.spec_from_file_location(full, path)
    if spec is None or spec.loader is None:  # pragma: no cover - importlib contract
        raise TargetError(f"cannot load schedules from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module


def load_family(family: str) -> ModuleType:
    """Import the schedule family ``schedules/<family>.py`` (cached), checking it has both entry points."""
    if not (schedules_dir() / f"{family}.py").is_file():
        raise TargetError(f"no schedule family {family!r} (expected {schedules_dir() / f'{family}.py'})")
    module = load_module(family)
    for fn in ("schedule_winoq_kernels", "schedule_other_ops"):
        if not callable(getattr(module, fn, None)):
            raise TargetError(f"{module.__file__} does not define {fn}(mod, target)")
    return module


def family_for(target: tvm.target.Target) -> str | None:
    """The schedule family of ``target`` (``None``: no hand-written schedules, leave TIR as is)."""
    kind = target.kind.name
    if kind == "cuda":
        return "cuda" if (schedules_dir() / "cuda.py").is_file() else None
    if kind != "llvm":
        return None
    attrs = [str(a) for a in target.attrs.get("mattr", [])]
    triple = str(target.attrs.get("mtriple", "")) or f"{platform.machine()}-"  # none: the host's
    if triple.startswith("aarch64") and any(a in ("+dotprod", "+i8mm") for a in attrs):
        if (schedules_dir() / "arm.py").is_file():
            return "arm"
    if triple.startswith("x86_64") and (schedules_dir() / "x86.py").is_file():
        return "x86"
    return "cpu"


def schedules_for(target: tvm.target.Target) -> ModuleType | None:
    """The loaded schedule module for ``target`` (or ``None``)."""
    family = family_for(target)
    return load_family(family) if family else None
