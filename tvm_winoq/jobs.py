"""Plain functions behind the CLI's model-level commands."""

from __future__ import annotations

from .config import groupwise
from .convert import eligible_convs, fold_batchnorm
from .finetune import FinetuneSettings, collect_layers


def describe_layers(model_name: str) -> str:
    """A table of every conv of a registered model: shape, eligibility and the reason."""
    from .models import get_model

    model, _ = get_model(model_name)
    lines = [f"{'layer':40s} {'in':>5s} {'out':>5s} {'k':>3s} {'s':>2s} {'d':>2s} {'g':>5s}  verdict"]
    infos = eligible_convs(model)
    for i in infos:
        lines.append(
            f"{i.name:40s} {i.in_channels:5d} {i.out_channels:5d} {i.kernel[0]:3d} {i.stride[0]:2d} "
            f"{i.dilation[0]:2d} {i.groups:5d}  {i.reason}"
        )
    n = sum(i.eligible for i in infos)
    lines.append(f"{n} of {len(infos)} convolutions are eligible for Winograd F(m,3)")
    return "\n".join(lines)


def finetune_model(
    model_name: str, tile: int = 6, group: int = 32, settings: FinetuneSettings | None = None
) -> str:
    """Finetune (cached) the scales of a registered model; returns a printable report."""
    from .models import get_model
    from .scale_cache import finetune_cached

    s = settings or FinetuneSettings()
    model, example = get_model(model_name)
    folded = fold_batchnorm(model, example)
    layers = collect_layers(folded, example)
    cfg = groupwise(tile, group, "learned-per-layer" if s.per_layer else "learned-shared")
    res, cached = finetune_cached(model_name, layers, cfg, s)
    lines = [
        f"{model_name}: F({tile},3) group {group}, {len(layers)} layers, "
        f"{'cached' if cached else f'finetuned in {res.seconds:.1f} s'} (Gaussian inputs only)"
    ]
    if res.shared is not None:
        lines.append("S_B = " + " ".join(f"{v:.3f}" for v in res.shared.s_b.tolist()))
        lines.append("S_G = " + " ".join(f"{v:.3f}" for v in res.shared.s_g.tolist()))
    lines.append(f"{'layer':40s} {'SQNR before':>12s} {'after':>8s}  (held-out Gaussian inputs, dB)")
    for r in res.report:
        lines.append(f"{r['layer']:40s} {r['sqnr_before_db']:12.2f} {r['sqnr_after_db']:8.2f}")
    return "\n".join(lines)


def describe_targets() -> str:
    """A table of the target presets in ``targets/``."""
    from .targets import load_presets

    rows = [f"{'preset':18s} {'kind':6s} {'features':26s} {'threads':>7s}  description"]
    for p in load_presets().values():
        feats = ",".join(p.features) or "-"
        rows.append(f"{p.name:18s} {p.kind:6s} {feats:26s} {p.threads:7d}  {p.description}")
    return "\n".join(rows)


def board_command(
    action: str, cpu: str = "max", port: int = 9190, key: str = "", tracker: str | None = None
) -> str:
    """``start`` / ``stop`` / ``status`` of the emulated aarch64 board; returns a printable line."""
    from . import board

    if action == "start":
        st = board.board_start(cpu=cpu, port=port, key=key, tracker=tracker)
        return f"board up: {st}"
    if action == "stop":
        pids = board.board_stop(port=port)
        return f"stopped pids {pids}" if pids else "no board was running"
    return str(board.board_status(port=port))
