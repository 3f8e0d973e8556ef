"""On-disk cache of finetuned scales, keyed by model, config and finetuning settings.

Files are JSON under ``<cache>/scales/``; they are written atomically (temp file + rename), so an
interrupted run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from .config import WinoQConfig
from .finetune import ConvLayer, FinetuneResult, FinetuneSettings, finetune_scales
from .io import write_file_atomic
from .paths import cache_dir
from .quant.plan import LayerScales


def cache_key(model_name: str, cfg: WinoQConfig, settings: FinetuneSettings, layers: list[ConvLayer]) -> str:
    """Stable key: model name, config, settings and a fingerprint of the layer weights."""
    h = hashlib.sha256()
    h.update(json.dumps([model_name, cfg.to_dict(), asdict(settings)], sort_keys=True, default=str).encode())
    for layer in layers:
        h.update(layer.name.encode())
        h.update(str(tuple(layer.weight.shape)).encode())
        h.update(f"{float(layer.weight.double().sum()):.9e}".encode())
    return h.hexdigest()[:20]


def _path(key: str, root: Path | None) -> Path:
    return (root or cache_dir()) / "scales" / f"{key}.json"


def load_cached(key: str, root: Path | None = None) -> FinetuneResult | None:
    """The cached result for ``key`` (``None`` if absent or unreadable)."""
    path = _path(key, root)
    try:
        data = json.loads(path.read_text())
        return FinetuneResult(
            shared=LayerScales.from_dict(data["shared"]) if data.get("shared") else None,
            per_layer={k: LayerScales.from_dict(v) for k, v in data.get("per_layer", {}).items()},
            report=data.get("report", []),
            seconds=float(data.get("seconds", 0.0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_result(key: str, result: FinetuneResult, root: Path | None = None) -> Path:
    """Write ``result`` atomically; returns the path."""
    path = _path(key, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "shared": result.shared.to_dict() if result.shared else None,
        "per_layer": {k: v.to_dict() for k, v in result.per_layer.items()},
        "report": result.report,
        "seconds": result.seconds,
    }
    return write_file_atomic(path, json.dumps(data, indent=1))


def finetune_cached(
    model_name: str,
    layers: list[ConvLayer],
    cfg: WinoQConfig,
    settings: FinetuneSettings,
    progress: bool = True,
    root: Path | None = None,
) -> tuple[FinetuneResult, bool]:
    """Finetune, or reuse a cached result; returns ``(result, was_cached)``."""
    key = cache_key(model_name, cfg, settings, layers)
    hit = load_cached(key, root)
    if hit is not None:
        return hit, True
    res = finetune_scales(layers, cfg, settings, progress=progress)
    save_result(key, res, root)
    return res, False
