"""Target presets: named TVM targets + cross compiler + RPC key, stored as data in ``targets/*.toml``.

Each ``targets/<family>.toml`` holds one table per preset (see ``targets/x86.toml`` for the field
list).  :func:`load_presets` reads and validates every file without importing TVM;
:meth:`TargetPreset.tvm_target` builds the ``tvm.target.Target`` on demand.

Examples
--------
>>> from tvm_winoq.targets import get_preset
>>> rpi5 = get_preset("rpi5")
>>> ex = tvm.compile(mod, target=rpi5.tvm_target())            # doctest: +SKIP
>>> ex.export_library("net.so", fcompile=rpi5.fcompile())      # doctest: +SKIP
"""

from __future__ import annotations

import os
import platform
import shutil
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import TargetError
from .paths import targets_dir

__all__ = [
    "TargetPreset",
    "get_preset",
    "host_features",
    "host_preset",
    "load_presets",
    "preset_names",
]

_REQUIRED = {"description": str, "target": dict, "rpc_key": str, "threads": int, "features": list}
_OPTIONAL = {"cross_compiler": str, "cross_options": list, "emulator_cpu": str, "aliases": list}

# /proc/cpuinfo flags that provide each preset feature.
_X86_FLAGS = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"),
    "vnni": ("avx512_vnni",),
}
_ARM_FLAGS = {"neon": ("asimd",), "dotprod": ("asimddp",), "i8mm": ("i8mm",), "sve": ("sve",)}


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class TargetPreset:
    """One named deployment target.

    Attributes
    ----------
    name : str
        Preset name (``rpi5``, ``host-avx2``, ...).
    family : str
        Stem of the file it comes from (``arm``, ``x86``, ``cuda``).
    description : str
        One-line human description.
    target : Mapping
        TVM target dict (read-only); for GPUs it contains a ``host`` sub-dict.
    rpc_key : str
        Device key at an RPC tracker.
    threads : int
        Runtime threads to benchmark with; 0 means every core of the machine running the code.
    features : tuple of str
        ISA features the generated code may use (``dotprod``, ``i8mm``, ``avx2``, ``vnni``, ...).
    cross_compiler : str or None
        Compiler driver for ``export_library`` (``None``: the host's default ``cc``).
    cross_options : tuple of str
        Extra options for that compiler.
    emulator_cpu : str or None
        ``qemu-aarch64 -cpu`` model able to run this preset's code on the emulated board.
    aliases : tuple of str
        Other accepted names.
    source : Path or None
        File the preset was read from.
    """

    name: str
    family: str
    description: str
    target: Mapping[str, Any]
    rpc_key: str
    threads: int
    features: tuple[str, ...]
    cross_compiler: str | None = None
    cross_options: tuple[str, ...] = ()
    emulator_cpu: str | None = None
    aliases: tuple[str, ...] = ()
    source: Path | None = field(default=None, compare=False)

    def __hash__(self) -> int:
        return hash((self.name, self.family))

    @property
    def kind(self) -> str:
        """TVM target kind (``llvm``, ``cuda``, ...)."""
        return str(self.target["kind"])

    @property
    def is_cross(self) -> bool:
        """Whether exporting needs a cross compiler (code is not for this host's ISA)."""
        return self.cross_compiler is not None

    def target_dict(self) -> dict[str, Any]:
        """The TVM target as a plain, mutable dict (``num-cores`` filled in for CPU targets).

        Returns
        -------
        dict
            A fresh copy; safe to modify.
        """
        out = _thaw(self.target)
        if out.get("kind") == "llvm" and "num-cores" not in out:
            out["num-cores"] = self.threads if self.threads > 0 else (os.cpu_count() or 1)
        return out

    def tvm_target(self) -> Any:
        """Build the ``tvm.target.Target`` of this preset (host attached for GPU targets).

        Returns
        -------
        tvm.target.Target

        Raises
        ------
        TargetError
            If TVM rejects the target dict (the message names the file and preset).
        """
        import tvm

        cfg = self.target_dict()
        host = cfg.pop("host", None)
        try:
            return tvm.target.Target(cfg, host=host) if host else tvm.target.Target(cfg)
        except Exception as exc:  # TVM raises its own error types (ValueError, TVMError, ...)
            where = self.source or self.family
            raise TargetError(f"{where}: preset {self.name!r}: bad target: {exc}") from exc

    def fcompile(self) -> Callable[..., Any] | None:
        """Compile function for ``export_library(path, fcompile=...)``.

        Returns
        -------
        callable or None
            ``tvm.support.cc.cross_compiler(...)`` for cross targets, ``None`` (TVM's default host
            compiler) otherwise.

        Raises
        ------
        TargetError
            If the cross compiler is not installed.
        """
        if self.cross_compiler is None:
            return None
        if shutil.which(self.cross_compiler) is None:
            raise TargetError(
                f"preset {self.name!r} needs the cross compiler {self.cross_compiler!r}, which is not on "
                "PATH (Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)"
            )
        from tvm.support import cc

        return cc.cross_compiler(self.cross_compiler, options=list(self.cross_options) or None)

    def export_library(self, module: Any, path: str | os.PathLike[str]) -> Path:
        """Export a compiled executable / runtime module as a shared library for this target.

        Parameters
        ----------
        module : tvm.runtime.Executable or tvm.runtime.Module
            Result of ``tvm.compile`` (Relax VM executable or TIR module).
        path : path-like
            Output ``.so`` path.

        Returns
        -------
        Path
            ``path``.
        """
        fcompile = self.fcompile()
        if fcompile is None:
            module.export_library(str(path))
        else:
            module.export_library(str(path), fcompile=fcompile)
        return Path(path)

    def missing_features(self, available: set[str] | None = None) -> list[str]:
        """Features of this preset that a machine lacks.

        Parameters
        ----------
        available : set of str, optional
            Features of the machine; defaults to :func:`host_features`.

        Returns
        -------
        list of str
            Empty when code built for this preset can run there (ISA-wise).
        """
        have = host_features() if available is None else available
        return [f for f in self.features if f not in have]


def _check_type(path: Path, name: str, key: str, value: Any, typ: type) -> None:
    if (typ is int and isinstance(value, bool)) or not isinstance(value, typ):
        raise TargetError(
            f"{path}: preset {name!r}: field {key!r} must be a {typ.__name__}, got {type(value).__name__}"
        )


def _parse_preset(path: Path, name: str, table: Any) -> TargetPreset:
    if not isinstance(table, dict):
        raise TargetError(f"{path}: {name!r} must be a table [{name}] describing one preset")
    unknown = sorted(set(table) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise TargetError(f"{path}: preset {name!r}: unknown field(s) {unknown}")
    for key, typ in _REQUIRED.items():
        if key not in table:
            raise TargetError(f"{path}: preset {name!r}: missing required field {key!r}")
        _check_type(path, name, key, table[key], typ)
    for key, typ in _OPTIONAL.items():
        if key in table:
            _check_type(path, name, key, table[key], typ)
    target = table["target"]
    if not isinstance(target.get("kind"), str) or not target["kind"]:
        raise TargetError(f"{path}: preset {name!r}: field 'target.kind' is required (e.g. \"llvm\")")
    if "host" in target and not isinstance(target["host"], dict):
        raise TargetError(f"{path}: preset {name!r}: field 'target.host' must be a table")
    if table["threads"] < 0:
        raise TargetError(f"{path}: preset {name!r}: field 'threads' must be >= 0")
    for key in ("features", "cross_options", "aliases"):
        if not all(isinstance(v, str) for v in table.get(key, [])):
            raise TargetError(f"{path}: preset {name!r}: field {key!r} must be a list of strings")
    return TargetPreset(
        name=name,
        family=path.stem,
        description=table["description"],
        target=_freeze(target),
        rpc_key=table["rpc_key"] or name,
        threads=table["threads"],
        features=tuple(table["features"]),
        cross_compiler=table.get("cross_compiler") or None,
        cross_options=tuple(table.get("cross_options", ())),
        emulator_cpu=table.get("emulator_cpu") or None,
        aliases=tuple(table.get("aliases", ())),
        source=path,
    )


_CACHE: dict[tuple, dict[str, TargetPreset]] = {}


def load_presets(directory: str | os.PathLike[str] | None = None) -> dict[str, TargetPreset]:
    """Read and validate every ``*.toml`` preset file.

    Parameters
    ----------
    directory : path-like, optional
        Folder of preset files; defaults to :func:`tvm_winoq.paths.targets_dir`.

    Returns
    -------
    dict of str to TargetPreset
        Presets by name, in file-name then file order (aliases not included).

    Raises
    ------
    TargetError
        If a file is not valid TOML, a field is missing or mistyped (the message names the file and
        the field), or two presets share a name.
    """
    folder = Path(directory) if directory is not None else targets_dir()
    files = sorted(folder.glob("*.toml"))
    stamp = (str(folder.resolve()), tuple((str(f), f.stat().st_mtime_ns) for f in files))
    if stamp in _CACHE:
        return dict(_CACHE[stamp])
    presets: dict[str, TargetPreset] = {}
    names: dict[str, Path] = {}
    for path in files:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise TargetError(f"{path}: invalid TOML: {exc}") from exc
        for name, table in data.items():
            preset = _parse_preset(path, name, table)
            for label in (name, *preset.aliases):
                if label in names:
                    raise TargetError(f"{path}: preset name {label!r} is already defined in {names[label]}")
                names[label] = path
            presets[name] = preset
    _CACHE.clear()
    _CACHE[stamp] = presets
    return dict(presets)


def preset_names(directory: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of all presets (aliases excluded), in file order."""
    return list(load_presets(directory))


def get_preset(name: str, directory: str | os.PathLike[str] | None = None) -> TargetPreset:
    """Look a preset up by name or alias.

    Parameters
    ----------
    name : str
        Preset name (``rpi5``) or alias (``host``).
    directory : path-like, optional
        Folder of preset files; defaults to :func:`tvm_winoq.paths.targets_dir`.

    Returns
    -------
    TargetPreset

    Raises
    ------
    TargetError
        If no preset has that name; the message lists the known names.
    """
    presets = load_presets(directory)
    if name in presets:
        return presets[name]
    for preset in presets.values():
        if name in preset.aliases:
            return preset
    known = ", ".join(presets)
    raise TargetError(f"unknown target preset {name!r}; known presets: {known}")


def host_features() -> set[str]:
    """Preset features (``avx2``, ``vnni``, ``dotprod``, ``i8mm``, ...) supported by this machine's CPU.

    Returns
    -------
    set of str
        Empty on platforms without ``/proc/cpuinfo``.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    table = _ARM_FLAGS if platform.machine().lower() in ("aarch64", "arm64") else _X86_FLAGS
    return {feat for feat, needed in table.items() if all(f in flags for f in needed)}


_ARM_PARTS = {"0xd08": "rpi4", "0xd0b": "rpi5", "0xd42": "jetson-orin-cpu", "0xd40": "graviton3"}


def host_preset(best: bool = False, directory: str | os.PathLike[str] | None = None) -> TargetPreset:
    """The preset for code that runs on this machine.

    Parameters
    ----------
    best : bool
        ``False`` (default): the canonical portable host preset (``host-avx2`` on x86-64 when AVX2 +
        FMA are present) so results and tuning logs are comparable across machines.  ``True``: the
        most capable preset this CPU can run (e.g. ``x86-avx512-vnni`` on AVX-512 VNNI machines).
    directory : path-like, optional
        Folder of preset files.

    Returns
    -------
    TargetPreset
        A preset from the files; on an unknown CPU a synthesized ``host-native`` preset using
        ``llvm -mcpu=<detected>`` and the host compiler.
    """
    presets = load_presets(directory)
    feats = host_features()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        order = ["x86-avx512-vnni", "host-avx2"] if best else ["host-avx2"]
        for name in order:
            cand = presets.get(name)
            if cand is not None and not cand.missing_features(feats):
                return cand
    elif machine in ("aarch64", "arm64"):
        part = ""
        try:
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
                if line.lower().startswith("cpu part"):
                    part = line.split(":")[1].strip().lower()
                    break
        except OSError:
            pass
        cand = presets.get(_ARM_PARTS.get(part, ""))
        if cand is not None:
            # Native build on the board itself: use the local compiler, not the cross one.
            return replace(cand, cross_compiler=None, cross_options=())
    return _native_preset(feats)


def _native_preset(feats: set[str]) -> TargetPreset:
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    return TargetPreset(
        name="host-native",
        family="detected",
        description=f"this machine's CPU as detected by LLVM ({cpu})",
        target=_freeze({"kind": "llvm", "mcpu": cpu}),
        rpc_key="host-native",
        threads=0,
        features=tuple(sorted(feats)),
    )
