"""Target presets: every shipped preset loads and builds a TVM target; bad names and files fail clearly."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest

from tvm_winoq.errors import TargetError
from tvm_winoq.paths import targets_dir
from tvm_winoq.targets import TargetPreset, get_preset, host_features, host_preset, load_presets

EXPECTED = {
    "x86": {"host-avx2", "x86-avx512-vnni"},
    "arm": {"rpi4", "rpi5", "jetson-orin-cpu", "graviton3"},
    "cuda": {"cuda-sm80", "cuda-sm90"},
}


def test_shipped_presets_load() -> None:
    presets = load_presets()
    for family, names in EXPECTED.items():
        assert {p.name for p in presets.values() if p.family == family} == names
    for preset in presets.values():
        assert isinstance(preset, TargetPreset)
        assert preset.description and preset.rpc_key and preset.features
        assert preset.source is not None and preset.source.parent == targets_dir()


@pytest.mark.parametrize("name", sorted(set().union(*EXPECTED.values())))
def test_preset_builds_tvm_target(name: str) -> None:
    tvm = pytest.importorskip("tvm")
    preset = get_preset(name)
    target = preset.tvm_target()
    assert isinstance(target, tvm.target.Target)
    assert target.kind.name == preset.kind
    if preset.kind == "cuda":
        assert str(target.attrs["arch"]) == preset.target["arch"]
        assert target.host is not None and target.host.kind.name == "llvm"
    else:
        assert int(target.attrs["num-cores"]) >= 1
        assert str(target.attrs["mcpu"]) == preset.target["mcpu"]


def test_arm_features_match_tvm_feature_flags() -> None:
    pytest.importorskip("tvm")
    for name in ("rpi4", "rpi5", "jetson-orin-cpu", "graviton3"):
        preset = get_preset(name)
        attrs = preset.tvm_target().attrs
        assert bool(attrs["feature.has_dotprod"]) == ("dotprod" in preset.features), name
        assert bool(attrs["feature.has_matmul_i8"]) == ("i8mm" in preset.features), name
        assert preset.cross_compiler == "aarch64-linux-gnu-gcc"
        assert preset.emulator_cpu


def test_presets_are_immutable_and_hashable() -> None:
    preset = get_preset("rpi5")
    with pytest.raises(AttributeError):
        preset.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        preset.target["mcpu"] = "x"  # type: ignore[index]
    d = preset.target_dict()
    d["mattr"].append("+i8mm")  # a copy: the preset is unchanged
    assert list(preset.target["mattr"]) == ["+neon", "+dotprod"]
    assert len({preset, get_preset("rpi5")}) == 1


def test_alias_and_unknown_name() -> None:
    assert get_preset("host").name == "host-avx2"
    with pytest.raises(TargetError) as info:
        get_preset("rpi9")
    message = str(info.value)
    assert "rpi9" in message and "rpi5" in message and "cuda-sm90" in message


def test_fcompile() -> None:
    assert get_preset("host-avx2").fcompile() is None
    if shutil.which("aarch64-linux-gnu-gcc"):
        assert callable(get_preset("rpi5").fcompile())


def test_missing_cross_compiler(tmp_path: Path) -> None:
    (tmp_path / "t.toml").write_text(
        '[odd]\ndescription = "d"\nrpc_key = "odd"\nthreads = 1\nfeatures = []\n'
        'cross_compiler = "no-such-gcc-xyz"\n[odd.target]\nkind = "llvm"\n'
    )
    with pytest.raises(TargetError, match="no-such-gcc-xyz"):
        get_preset("odd", tmp_path).fcompile()


def test_host_preset() -> None:
    preset = host_preset()
    assert preset.cross_compiler is None
    best = host_preset(best=True)
    assert not best.missing_features()
    if platform.machine() == "x86_64" and {"avx2", "fma"} <= host_features():
        assert preset.name == "host-avx2"


BASE = '[p]\ndescription = "d"\nrpc_key = "k"\nthreads = 1\nfeatures = ["neon"]\n[p.target]\nkind = "llvm"\n'


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[p\nkind = 1", "invalid TOML"),
        (BASE.replace('rpc_key = "k"\n', ""), "'rpc_key'"),
        (BASE.replace("threads = 1", 'threads = "four"'), "'threads' must be a int"),
        (BASE.replace("threads = 1", "threads = true"), "'threads'"),
        (BASE.replace("threads = 1", "threads = -2"), "'threads' must be >= 0"),
        (BASE.replace('features = ["neon"]', 'features = "neon"'), "'features'"),
        (BASE.replace('features = ["neon"]', "features = [1]"), "'features' must be a list of strings"),
        (BASE.replace('kind = "llvm"', 'mcpu = "x"'), "'target.kind'"),
        (BASE + 'mtriple = "x"\n[q]\nthreads = 1\n', "preset 'q': unknown field|missing required"),
        (BASE.replace("threads = 1\n", "threads = 1\nthreds = 2\n"), "unknown field"),
        ("p = 3\n", "must be a table"),
    ],
)
def test_malformed_file_names_file_and_field(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(TargetError, match=needle) as info:
        load_presets(tmp_path)
    assert str(path) in str(info.value)


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(BASE)
    (tmp_path / "b.toml").write_text(BASE)
    with pytest.raises(TargetError, match="already defined"):
        load_presets(tmp_path)


def test_bad_target_reported_by_tvm(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    (tmp_path / "t.toml").write_text(BASE.replace('kind = "llvm"', 'kind = "no-such-kind"'))
    with pytest.raises(TargetError, match="preset 'p': bad target"):
        get_preset("p", tmp_path).tvm_target()


def test_reload_after_edit(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(BASE)
    assert get_preset("p", tmp_path).threads == 1
    path.write_text(BASE.replace("threads = 1", "threads = 3"))
    import os

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert get_preset("p", tmp_path).threads == 3


def test_host_preset_builds_exports_and_runs(tmp_path: Path) -> None:
    tvm = pytest.importorskip("tvm")
    import numpy as np
    from tvm.script import tirx as T

    @T.prim_func
    def add_i8(a: T.Buffer((64,), "int8"), b: T.Buffer((64,), "int8"), c: T.Buffer((64,), "int32")):
        T.func_attr({"global_symbol": "add_i8", "tir.noalias": True})
        for i in range(64):
            c[i] = T.Cast("int32", a[i]) + T.Cast("int32", b[i])

    preset = host_preset()
    lib = preset.export_library(
        tvm.compile(tvm.IRModule({"add_i8": add_i8}), target=preset.tvm_target()), tmp_path / "a.so"
    )
    mod = tvm.runtime.load_module(str(lib))
    a = np.arange(-32, 32, dtype=np.int8)
    c = tvm.runtime.tensor(np.zeros(64, np.int32))
    mod["add_i8"](tvm.runtime.tensor(a), tvm.runtime.tensor(a), c)
    np.testing.assert_array_equal(c.numpy(), 2 * a.astype(np.int32))
