"""Read what TVM generated for AArch64: disassembly of a cross-compiled library, the code of one
exported kernel, the innermost loop around a micro-kernel instruction and its ``llvm-mca`` estimate.

Shared by ``tests/test_arm*.py`` (which instructions appear where) and ``benchmarks/arm_mca.py``
(static cycle estimates).  Needs ``aarch64-linux-gnu-objdump`` / ``-readelf`` (binutils-aarch64-linux-gnu)
and, for the estimate, ``llvm-mca`` (Debian ``llvm``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["OBJDUMP", "count", "disassemble", "function_code", "inner_loop", "mca", "mca_cycles", "tool"]

OBJDUMP = shutil.which("aarch64-linux-gnu-objdump")


def tool(name: str, *args: str) -> str:
    """Output of the cross binutils' ``name`` (``objdump``, ``readelf``) run with ``args``."""
    return subprocess.run([f"aarch64-linux-gnu-{name}", *args], capture_output=True, text=True,
                          check=True).stdout


def disassemble(lib: Path) -> list[tuple[int, str]]:
    """``objdump -d`` of ``lib``: (address, instruction text) of every instruction."""
    out = []
    for line in tool("objdump", "-d", "--no-show-raw-insn", str(lib)).splitlines():
        m = re.match(r"\s+([0-9a-f]+):\s+(\S.*)$", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def _code_refs(code: list[tuple[int, str]], lo: int, hi: int,
               funcs: frozenset[int] = frozenset()) -> set[int]:
    """Code addresses in ``[lo, hi)`` that ``code`` takes (an ``adrp`` directly followed by an ``add`` to
    the same register: the parallel bodies handed to ``TVMBackendParallelLaunch``), calls (``bl``) or
    tail-calls (``b`` to one of ``funcs``: the exported wrapper ends in ``b <name>_compute_``).

    Only adjacent ``adrp``/``add`` pairs count: a register's page is stale once anything else ran (a
    stale page would cut a parallel body in two at some constant's address)."""
    refs, page = set(), None  # page: (register, address) of the instruction just before
    for _, ins in code:
        prev, page = page, None
        if m := re.match(r"adrp\s+(x\d+),\s*([0-9a-f]+)", ins):
            page = (m.group(1), int(m.group(2), 16))
        elif (m := re.match(r"add\s+(x\d+),\s*(x\d+),\s*#0x([0-9a-f]+)", ins)) and prev is not None \
                and prev[0] == m.group(2) == m.group(1):
            refs.add(prev[1] + int(m.group(3), 16))
        elif m := re.match(r"bl\s+([0-9a-f]+)", ins):
            refs.add(int(m.group(1), 16))
        elif (m := re.match(r"b\s+([0-9a-f]+)", ins)) and int(m.group(1), 16) in funcs:
            refs.add(int(m.group(1), 16))
    return {a for a in refs if lo <= a < hi}


def function_code(lib: Path, symbol: str) -> tuple[list[str], list[str]]:
    """Instructions of the exported ``symbol`` and of the internal functions it launches or calls (its
    parallel bodies have no symbols: LLVM gives them private linkage), and all other instructions.

    Function boundaries: a symbol's size where it has one, else the next function symbol or code address
    some function takes.
    """
    sec = next(ln.split() for ln in tool("readelf", "-SW", str(lib)).splitlines() if " .text " in ln)
    lo = int(sec[sec.index(".text") + 2], 16)
    hi = lo + int(sec[sec.index(".text") + 4], 16)
    syms, sizes = {}, {}
    for line in tool("readelf", "-sW", str(lib)).splitlines():
        f = line.split()
        if len(f) >= 8 and f[3] == "FUNC" and f[6] != "UND" and lo <= int(f[1], 16) < hi:
            syms[f[7]] = int(f[1], 16)
            sizes[syms[f[7]]] = int(f[2], 0)
    code = disassemble(lib)
    entries = set(syms.values())
    while True:  # the internal functions reachable from any function
        bounds = sorted(entries) + [hi]
        found = set().union(*(_code_refs([c for c in code if a <= c[0] < b], lo, hi)
                              for a, b in zip(bounds, bounds[1:], strict=False)))
        if found <= entries:
            break
        entries |= found
    bounds = sorted(entries) + [hi]
    ranges = dict(zip(bounds, bounds[1:], strict=False))
    ranges |= {a: a + n for a, n in sizes.items() if n > 0}  # a symbol's own size, where it has one
    todo, mine = [syms[symbol]], set()
    while todo:
        a = todo.pop()
        if a not in mine:
            mine.add(a)
            todo += _code_refs([c for c in code if a <= c[0] < ranges[a]], lo, hi, frozenset(syms.values()))
    inside, outside = [], []
    for addr, ins in code:
        (inside if any(a <= addr < ranges[a] for a in mine) else outside).append(ins)
    return inside, outside


def count(code: list[str], mnemonic: str) -> int:
    """How many instructions of ``code`` are ``mnemonic``."""
    return sum(1 for ins in code if ins.split()[0] == mnemonic)


# ----------------------------------------------------------------------------------------- llvm-mca
def mca() -> str | None:
    """Path of ``llvm-mca`` (or the newest ``llvm-mca-N``), ``None`` if there is none."""
    return shutil.which("llvm-mca") or next(
        (shutil.which(f"llvm-mca-{v}") for v in range(25, 12, -1) if shutil.which(f"llvm-mca-{v}")), None)


def inner_loop(code: list[tuple[int, str]], mnemonic: str) -> list[str]:
    """The innermost backward branch's body that contains ``mnemonic`` (a micro-kernel's loop)."""
    addr = [a for a, _ in code]
    best: list[str] = []
    for i, (a, ins) in enumerate(code):
        m = re.match(r"(b\.\w+|cbn?z|tbn?z|b)\s+(?:\S+,\s*)*([0-9a-f]+)\s+<", ins)
        if not m:
            continue
        target = int(m.group(2), 16)
        if target >= a or target not in addr:
            continue
        body = [x for _, x in code[addr.index(target):i + 1]]
        if any(x.split()[0] == mnemonic for x in body) and (not best or len(body) < len(best)):
            best = body
    return best


_BRANCH = re.compile(r"(b|bl|b\.\w+|cbn?z|tbn?z|ret)$")


def mca_cycles(loop: list[str], cpu: str, iterations: int = 100) -> float:
    """``llvm-mca``'s cycles per iteration of ``loop`` (objdump text; branches become ``nop``) on ``cpu``
    (e.g. ``cortex-a76``, ``neoverse-v1``).  LLVM 14 models these cores with its Cortex-A57 scheduling
    model, so take the numbers as rough and compare loops under the same model.

    Raises
    ------
    RuntimeError
        Without ``llvm-mca``, or when it rejects the code.
    """
    exe = mca()
    if exe is None:
        raise RuntimeError("llvm-mca not found (apt-get install llvm)")
    asm = "\n".join("nop" if _BRANCH.match(x.split()[0]) else re.sub(r"\s+(<.*>|//.*)$", "", x) for x in loop)
    res = subprocess.run([exe, "-mtriple=aarch64", f"-mcpu={cpu}", "-mattr=+dotprod,+i8mm",
                          f"-iterations={iterations}"], input=asm + "\n", capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"llvm-mca failed: {res.stderr.strip()}")
    m = re.search(r"Total Cycles:\s+(\d+)", res.stdout)
    if m is None:
        raise RuntimeError(f"llvm-mca printed no cycle count: {res.stdout[:200]}")
    return float(m.group(1)) / iterations
