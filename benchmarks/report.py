"""Reports of the peer benchmark: system information, Markdown tables, JSON/Markdown files."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["save_results", "system_info", "to_markdown"]


def _passive() -> bool:
    from benchmarks import peers

    return bool(peers._STATE["passive"])


_ISA = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
        "avx512_fp16", "amx_int8")


def system_info() -> dict[str, Any]:
    """Date, CPU model (``lscpu``), int8-relevant ISA flags, cores, load average, waits, versions."""
    from importlib import metadata

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    info = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}
    flags = set(info.get("Flags", "").split())
    if not flags and Path("/proc/cpuinfo").exists():
        found = re.findall(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        flags = set(found[0].split()) if found else set()
    versions = {}
    for dist in ("numpy", "torch", "onnxruntime", "onnx", "ncnn", "apache-tvm"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": info.get("Model name", platform.processor()),
            "cpu_family_model": f"{info.get('CPU family', '?')}/{info.get('Model', '?')}",
            "cores": os.cpu_count(),
            "isa": [f for f in _ISA if f in flags],
            "int8_dot": next((f for f in ("avx512_vnni", "avx_vnni") if f in flags), "none (AVX2 at most)"),
            "loadavg_before": list(os.getloadavg()), "passive_wait": _passive(),
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions}


def _cell(r: Mapping[str, Any]) -> str:
    if r["status"] in ("skipped", "error"):
        return r["status"]
    bad = f"INVALID {r['sqnr_db']:.0f} dB" if r["status"] == "invalid" else ""
    return f"{r['median_ms']:.3f} {bad}".strip() if r["median_ms"] else bad


def to_markdown(result: Mapping[str, Any]) -> str:
    """Render :func:`run_benchmark` output: machine, median-ms matrix, details with ratios, notes."""
    meta, rows = result["meta"], result["rows"]
    names = list(dict.fromkeys(r["impl"] for r in rows))
    groups: dict[tuple[str, int], dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["threads"]), {})[r["impl"]] = r
    load = f"{meta['loadavg_before'][0]:.2f} / {meta.get('loadavg_after', [math.nan])[0]:.2f}"
    out = [f"# 3x3 s1 p1 conv layers, batch 1: int8 peers ({meta['date'][:10]})", "",
           f"- CPU: {meta['cpu']} (family/model {meta['cpu_family_model']}), {meta['cores']} cores; "
           f"ISA: {' '.join(meta['isa'])}; int8 dot product: {meta['int8_dot']}",
           f"- 1-min load average before / after: {load}; passive wait (idle threads sleep): "
           f"{meta['passive_wait']}",
           "- " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v),
           f"- interleaved round-robin, <= {meta['repeat']} samples per row (budget {meta['budget_s']} s per "
           f"shape x threads), seed {meta['seed']}; GOP/s = 2*C*K*H*W*9 / median",
           "- SQNR vs a float64 PyTorch conv; INVALID rows are not timed unless asked; "
           "`vs X` = median of X / median of the row (> 1: the row is faster); cpu/wall below the thread "
           "count means the threads did not get the cores", "", "## Median ms", "",
           "| shape | threads | " + " | ".join(names) + " | fastest |", "|---" * (len(names) + 3) + "|"]
    for (shape, t), g in groups.items():
        best = min((r for r in g.values() if r["status"] == "ok"), key=lambda r: r["median_ms"], default=None)
        out.append(f"| {shape} | {t} | " + " | ".join(_cell(g[n]) if n in g else "" for n in names)
                   + f" | {best['impl'] if best else ''} |")
    refs = [n for n in names if any(r["impl"] == n and r["status"] == "ok" for r in rows)]
    head = ["shape", "thr", "impl", "status", "SQNR dB", "median ms", "min ms", "GOP/s", "cpu/wall"]
    out += ["", "## Details", "", "| " + " | ".join(head + [f"vs {n}" for n in refs]) + " |",
            "|---" * (len(head) + len(refs)) + "|"]
    for (shape, t), g in groups.items():
        for n, r in g.items():
            num = [f"{r['median_ms']:.3f}", f"{r['min_ms']:.3f}", f"{r['gops']:.0f}",
                   f"{r['cpu_per_wall']:.2f}"] if r["median_ms"] else [""] * 4
            vs = [f"{r['speedup'][p]:.2f}x" if p in r["speedup"] else "" for p in refs]
            sq = "" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
            out.append(f"| {shape} | {t} | {n} | {r['status']} | {sq} | " + " | ".join(num + vs) + " |")
    out += ["", "## Implementations", ""] + [f"- `{n}`: {d}" for n, d in meta["impls"].items()]
    choices = meta.get("measured_choices") or {}
    if choices:
        out += ["", "## ours-auto: measured in the one-conv model", ""] + [
            f"- {key}: " + "; ".join(", ".join(f"{c} {v:.3f} ms" for c, v in t["ms"].items())
                                     + f" -> **{t['chosen']}**" for t in ts) for key, ts in choices.items()]
    notes = sorted({f"- `{r['impl']}` {r['shape']} threads={r['threads']}: {r['status']}: {r['reason']}"
                    for r in rows if r["status"] != "ok"})
    return "\n".join(out + (["", "## Not ok", ""] + notes if notes else []) + [""])


def save_results(result: Mapping[str, Any], json_path: str | Path | None = None,
                 md_path: str | Path | None = None) -> None:
    """Write :func:`run_benchmark` output as JSON and/or Markdown (creating parent folders)."""
    for path, render in ((json_path, lambda: json.dumps(result, indent=1)),
                         (md_path, lambda: to_markdown(result))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(render())
