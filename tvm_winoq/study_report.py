"""Writing the fidelity study: markdown tables, PNG plots, and the ``winoq report`` page.

``winoq eval MODEL -o DIR`` writes ``DIR/study.{md,json}`` and its plots; ``winoq report`` reads the
``study.json`` of several models (running the study for the ones missing) and writes one
``report.md`` that links every table and plot, with a summary of what the method buys and where the
issue's accuracy targets stand.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .errors import ConfigError

_TILE_ROW = re.compile(r"^F\((\d),3\) (.+)$")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return "" if v is None else str(v)


def study_markdown(res: dict) -> str:
    """The study table of one model as markdown."""
    rows = res["rows"]
    skip = {"method", "layers", "choices", "layer_mean_db", "finetune_s", "seconds", "winograd_mac_share",
            "budget", "build_s", "run_s", "engine"}
    metric_keys = [k for k in rows[0] if k not in skip]
    head = ["method", "layer-mean SQNR dB", *metric_keys, "F(4,3)+F(6,3) MAC %", "finetune s"]
    engine = res.get("settings", {}).get("engine", "reference")
    by = "the TVM-compiled module (host, one image per call)" if engine == "compiled" else \
        "the PyTorch integer reference"
    lines = [
        f"### {res['model']} ({res['eligible_layers']} eligible convs, task: {res['task']})",
        "",
        f"Task metric computed by {by}; layer SQNR by the integer reference on real activations.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for r in rows:
        vals = [r["method"], _fmt(r.get("layer_mean_db"))]
        vals += [_fmt(r.get(k)) for k in metric_keys]
        share = r.get("winograd_mac_share")
        vals += [_fmt(share) if share is not None else "", _fmt(r.get("finetune_s", 0.0))]
        lines.append("| " + " | ".join(vals) + " |")
    other = [r for r in rows if r.get("engine", engine) != engine]
    if other:
        lines += ["", "Rows computed by another engine: " + "; ".join(
            f"{r['method']}: {r['engine']}" for r in other) + "."]
    for r in rows:
        if r.get("choices"):
            counts: dict[str, int] = {}
            for c in r["choices"].values():
                counts[c] = counts.get(c, 0) + 1
            lines += ["", f"{r['method']}: per-layer choice " + ", ".join(
                f"{k} x{v}" for k, v in sorted(counts.items())) + " (" + ", ".join(
                f"`{n}`={c}" for n, c in r["choices"].items()) + ")"]
            b = r.get("budget")
            if b:
                lines += ["", f"Budget: end-to-end output SQNR (calibration images) {b['model_db']:.2f} dB "
                          f"vs all-direct {b['direct_db']:.2f} dB (target {b['target_db']:.2f} dB, "
                          f"{len(b['steps'])} layer steps from all F(6,3))."]
    return "\n".join(lines)


def tile_series(res: dict, metric: str) -> dict[str, dict[int, float]]:
    """``{method family: {tile: value}}`` of the rows named ``F(t,3) <family>``."""
    out: dict[str, dict[int, float]] = {}
    for r in res["rows"]:
        m = _TILE_ROW.match(r["method"])
        if m and isinstance(r.get(metric), float):
            out.setdefault(m.group(2), {})[int(m.group(1))] = r[metric]
    return {k: v for k, v in out.items() if len(v) > 1}


def write_plots(res: dict, folder: Path) -> list[str]:
    """The study's PNGs into ``folder``; returns their file names."""
    from .plots import plot_layer_sqnr, plot_metric_vs_tile, plot_position_ranges

    names = []
    layered = [r for r in res["rows"] if "layers" in r and r["layers"]]
    if layered:
        plot_layer_sqnr(layered, f"{res['model']}: SQNR per layer", folder / "layer_sqnr.png")
        names.append("layer_sqnr.png")
    pr = res.get("position_ranges")
    if pr:
        plot_position_ranges(np.array(pr["before"]), np.array(pr["after"]),
                             f"{res['model']} {pr['layer']}: F({pr['tile']},3) range of M per position",
                             folder / "position_ranges.png")
        names.append("position_ranges.png")
    metric = res.get("primary_metric")
    for key, fname, label in ((metric, "metric_vs_tile.png", metric),
                              ("layer_mean_db", "sqnr_vs_tile.png", "layer-mean SQNR (dB)")):
        series = tile_series(res, key) if key else {}
        if series:
            plot_metric_vs_tile(series, label, f"{res['model']}: {label} vs tile", folder / fname)
            names.append(fname)
    return names


def write_study(res: dict, out_dir: Path) -> Path:
    """Write ``study.md``, ``study.json`` and the plots atomically into ``out_dir``."""
    from .io import write_outputs

    with tempfile.TemporaryDirectory() as tmp:
        pngs = write_plots(res, Path(tmp))
        md = study_markdown(res) + "\n\n" + "\n".join(f"![{p[:-4]}]({p})" for p in pngs) + "\n"
        files: dict[str, str | bytes] = {"study.md": md, "study.json": json.dumps(res, indent=1, default=str)}
        files.update({p: (Path(tmp) / p).read_bytes() for p in pngs})
        return write_outputs(out_dir, files)


def _row(res: dict, prefix: str) -> dict | None:
    return next((r for r in res["rows"] if r["method"].startswith(prefix)), None)


def summary_lines(res: dict) -> list[str]:
    """What the numbers say for one model: learned vs standard F(6,3), the default vs int8 direct."""
    metric = res["primary_metric"]
    out = []
    if not res.get("eligible_layers"):
        out.append("- No eligible 3x3 stride-1 convolution: nothing is rewritten, so there is nothing to "
                   "compare between methods.")
        for row in res["rows"]:
            if row["method"].startswith("compiled") and metric in row:
                out.append(f"- Compiled TVM module: {metric} {row[metric]:.2f} (vs FP32 PyTorch).")
        return out
    for tile in (6, 4):
        std = _row(res, f"F({tile},3) group32, standard")
        lrn = _row(res, f"F({tile},3) group32, learned shared")
        if std and lrn:
            d_layer = lrn["layer_mean_db"] - std["layer_mean_db"]
            d_task = lrn.get(metric, float("nan")) - std.get(metric, float("nan"))
            verdict = "beat" if d_layer > 0 and d_task >= 0 else "do NOT beat"
            out.append(f"- F({tile},3) group 32: learned shared scales {verdict} standard scales: "
                       f"{d_layer:+.2f} dB layer-mean SQNR, {d_task:+.2f} {metric}.")
    direct, auto = _row(res, "int8 direct"), _row(res, "default: auto")
    nan = float("nan")
    if direct and auto:
        a, d = auto.get(metric, nan), direct.get(metric, nan)
        counts: dict[str, int] = {}
        for c in auto.get("choices", {}).values():
            counts[c] = counts.get(c, 0) + 1
        chosen = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
        out.append(f"- Shipped default ({auto['method'][9:]}): {metric} {a:.2f} vs int8 direct {d:.2f} "
                   f"({a - d:+.2f}); "
                   f"{auto['winograd_mac_share']:.0f}% of the eligible MACs run as F(4,3)/F(6,3) ({chosen}).")
        b = auto.get("budget")
        if b:
            out.append(f"  Its tile choice reached {b['model_db']:.2f} dB end-to-end output SQNR on the "
                       f"calibration images (target {b['target_db']:.2f}, all-direct {b['direct_db']:.2f}).")
    comp = _row(res, "compiled (TVM host)")
    if comp and auto:
        out.append(f"- Compiled TVM module of the default: {metric} {comp.get(metric, nan):.2f} "
                   f"(PyTorch reference {auto.get(metric, nan):.2f}); build {comp['build_s']:.0f} s.")
    return out


def report_markdown(studies: Sequence[dict], links: Sequence[str]) -> str:
    """One page: summary per model, then each model's table and plots (``links``: relative folders)."""
    lines = ["# tvm-winoq fidelity report", "",
             "Every number is computed here, from the seed in each study's settings; learned scales are "
             "finetuned on Gaussian noise only (data-free). Per-layer SQNR uses real activations the "
             "scales never saw.", ""]
    for res in studies:
        lines += [f"## {res['model']}", "", *summary_lines(res), ""]
    for res, link in zip(studies, links, strict=True):
        md, js = Path(link) / "study.md", Path(link) / "study.json"
        lines += [f"## {res['model']}: full table ([study.md]({md}), [study.json]({js}))",
                  "", study_markdown(res), ""]
        for png in ("position_ranges.png", "layer_sqnr.png", "metric_vs_tile.png", "sqnr_vs_tile.png"):
            lines.append(f"![{res['model']} {png[:-4]}]({Path(link) / png})")
        lines.append("")
    return "\n".join(lines)


def build_report(
    models: Sequence[str], out_dir: Path, run: Callable[[str], dict] | None = None,
    rerun: bool = False, log: Callable[[str], None] = print,
) -> Path:
    """Collect the studies of ``models`` (missing ones computed with ``run``); write ``out_dir/report.md``."""
    from .io import write_file_atomic

    studies, links = [], []
    for name in models:
        folder = out_dir / name
        path = folder / "study.json"
        if path.is_file() and not rerun:
            try:
                res = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not a study JSON ({e}); delete it or pass --rerun") from e
            log(f"{name}: using {path}")
        elif run is None:
            raise ConfigError(f"{path}: no study for {name}; run `winoq eval {name} -o {folder}` first")
        else:
            log(f"{name}: running the study ...")
            res = run(name)
            write_study(res, folder)
        studies.append(res)
        links.append(name)
    return write_file_atomic(out_dir / "report.md", report_markdown(studies, links))
