"""The fidelity study (``winoq eval MODEL``): every method's per-layer SQNR and task accuracy.

Methods: FP32, int8 direct, and for each tile size F(2,3)/F(4,3)/F(6,3): per-tensor standard scales,
group-wise standard scales, group-wise learned shared scales (the paper; for each group size),
group-wise learned per-layer scales and, beyond the paper, M quantized per output channel
(:func:`~tvm_winoq.config.default_config`); an alternative point set for F(6,3); and the shipped default:
a per-layer choice of F(6,3)/F(4,3)/F(2,3)/int8 direct under an end-to-end SQNR budget
(:mod:`tvm_winoq.tile_choice`).  Optionally the default also runs as a TVM-compiled module
(:mod:`tvm_winoq.study_compiled`).  Results are JSON-ready dicts (written by :mod:`tvm_winoq.study_report`)
and reproducible from the seed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .config import default_config, groupwise, per_tensor
from .convert import fold_batchnorm, quantize_model
from .errors import ConfigError
from .evaluate import Method, capture_inputs, layer_sqnr, learn, scales_for
from .fidelity import real_inputs
from .finetune import ConvLayer, FinetuneSettings, collect_layers
from .tile_choice import Budget, TileChoice, choose_tiles, layer_macs

PRIMARY_METRIC = {"labels": "top1", "agreement": "top1_agreement", "craft": "heatmap_sqnr_db",
                  "sqnr": "output_sqnr_db"}
"""The task metric a report leads with, per task kind."""


ENGINES = ("reference", "compiled")
"""What computes each row's task metric: the PyTorch integer reference, or the TVM-compiled module."""


@dataclass(frozen=True)
class StudySettings:
    """What the study covers.

    ``budgets_db`` are the end-to-end output SQNR budgets (dB vs FP32, :class:`~.tile_choice.Budget`
    ``min_db``; relaxed to ``max_loss_db`` below int8 direct) of the automatic tile choice (one
    ``default: auto`` row each);
    ``engine`` computes every row's task metric with the PyTorch integer reference or with the
    TVM-compiled module (host, batch 1 per image as deployed); ``compiled`` (reference engine only)
    adds one compiled row for the first budget's default.
    """

    tiles: tuple[int, ...] = (2, 4, 6)
    groups: tuple[int, ...] = (16, 32, 64)
    images: int = 5
    size: int = 256
    test_limit: int | None = None
    budgets_db: tuple[float, ...] = (20.0,)
    max_loss_db: float = 3.0
    compiled: bool = False
    engine: str = "reference"
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)

    def __post_init__(self) -> None:
        if not self.tiles or any(t not in (2, 4, 6) for t in self.tiles):
            raise ConfigError(f"tiles: must be a non-empty subset of 2 4 6, got {self.tiles}")
        if not self.groups or any(g < 1 for g in self.groups):
            raise ConfigError(f"groups: must be positive group sizes, got {self.groups}")
        if self.images < 1 or self.size < 16:
            raise ConfigError(f"images >= 1 and size >= 16 required, got {self.images}, {self.size}")
        for b in self.budgets_db:
            Budget(b, self.max_loss_db)  # validates (one ConfigError naming the field)
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.test_limit is not None and self.test_limit < 1:
            raise ConfigError(f"test_limit: must be >= 1, got {self.test_limit}")


def study_methods(
    tiles: Sequence[int], groups: Sequence[int], budgets: Sequence[float] = (), max_loss_db: float = 3.0
) -> list[Method]:
    """The rows of the study table."""
    out = [Method("int8 direct", "direct", groupwise(6, 32))]
    for t in tiles:
        out.append(Method(f"F({t},3) per-tensor, standard", "winograd", per_tensor(t)))
        out.append(Method(f"F({t},3) group32, standard", "winograd", groupwise(t, 32, "standard")))
        for g in groups:
            name = f"F({t},3) group{g}, learned shared"
            out.append(Method(name, "winograd", groupwise(t, g), "learned-shared"))
        out.append(Method(f"F({t},3) group32, learned per-layer", "winograd",
                          groupwise(t, 32, "learned-per-layer"), "learned-per-layer"))
        out.append(Method(f"F({t},3) group32 + M per-channel, learned shared", "winograd", default_config(t),
                          "learned-shared"))
        if t == 6:
            alt = default_config(6).with_(points="f6_pm3/2")
            out.append(Method("F(6,3) group32 + M per-channel, points {0,±1,±1/2,±3/2}, learned shared",
                              "winograd", alt, "learned-shared"))
    for b in budgets:
        bud = Budget(b, max_loss_db)
        out.append(Method(f"default: auto F(6,3)/F(4,3)/F(2,3)/direct, end to end {bud.label()}", "auto",
                          default_config(6), "learned-shared", bud))
    return out


def task_data(model_name: str, s: StudySettings) -> dict:
    """Inputs for the task metric of a model."""
    if model_name == "fmnist_resnet":
        from .data import fashion_mnist
        from .train_fmnist import to_tensor

        x, y = fashion_mnist("test")
        n = s.test_limit or len(x)
        return {"kind": "labels", "x": to_tensor(x[:n]), "y": torch.from_numpy(y[:n])}
    if model_name in ("mobilenet_v2", "resnet18", "resnet34"):
        return {"kind": "agreement", "x": torch.cat(real_inputs(model_name, 16, 224))}
    if model_name == "craft":
        from .data import natural_image
        from .models.craft import craft_preprocess

        return {
            "kind": "craft",
            "x": real_inputs("craft", s.images, s.size),
            "page": craft_preprocess(natural_image("page", None), 384),
        }
    return {"kind": "sqnr", "x": real_inputs(model_name, s.images, s.size)}


def task_metric(kind: str, data: dict, ref: torch.nn.Module, model: torch.nn.Module, ref_pred) -> dict:
    """The task metric of ``model`` vs the FP32 ``ref`` (see :func:`task_data`)."""
    from .metrics import sqnr_db
    from .task_metrics import agreement, craft_metrics, top1

    if kind == "labels":
        return {"top1": top1(model, data["x"], data["y"])["top1"]}
    if kind == "agreement":
        return {"top1_agreement": agreement(top1(model, data["x"])["pred"], ref_pred)}
    if kind == "craft":
        return craft_metrics(ref, model, data["x"], data["page"])
    with torch.no_grad():
        out = torch.cat([model(x).flatten() for x in data["x"]])
        want = torch.cat([ref(x).flatten() for x in data["x"]])
    return {"output_sqnr_db": sqnr_db(want, out)}


@dataclass
class Resolved:
    """A method made concrete for one model: per-layer choices, configs and scales."""

    cfg: object
    scales: object
    choices: dict[str, str]
    finetune_s: float
    tile_choice: TileChoice | None = None


def resolve(
    meth: Method, layers: Sequence[ConvLayer], ft: FinetuneSettings, model_name: str,
    model: torch.nn.Module | None = None, inputs: Sequence[torch.Tensor] = (),
) -> Resolved:
    """Scales (finetuned or cached) and per-layer choices of ``meth``."""
    if meth.kind != "auto":
        scales, ft_s = scales_for(meth, layers, ft, model_name)
        choice = "direct" if meth.kind == "direct" else f"f{meth.cfg.tile}"
        return Resolved(meth.cfg, scales, {layer.name: choice for layer in layers}, ft_s)
    configs = {f"f{t}": meth.cfg.with_(tile=t, points=None) for t in (2, 4, 6)}
    learned = {k: learn(layers, c, meth.scales, ft, model_name) for k, c in configs.items()}
    scales = {k: r.shared for k, r in learned.items()}
    if model is None:
        raise ValueError(f"{meth.name}: the automatic tile choice needs the model and its inputs")
    tc = choose_tiles(model, layers, configs, scales, inputs, meth.budget, ft)
    choices = tc.choices
    per_layer = {n: scales[c] for n, c in choices.items() if c in scales}
    cfg = configs["f4"].with_(layers=choices)
    return Resolved(cfg, per_layer, choices, sum(r.seconds for r in learned.values()), tc)


def _layer_method(meth: Method, r: Resolved, name: str) -> tuple[Method, object]:
    choice = r.choices[name]
    if meth.kind != "auto":
        return meth, r.scales
    if choice == "direct":
        return Method("direct", "direct", r.cfg), None
    return Method(choice, "winograd", r.cfg.with_(tile=int(choice[1:]), layers={})), r.scales[name]


def _task_model(engine: str, folded: torch.nn.Module, example: torch.Tensor, r: Resolved):
    """``(model, engine used)`` whose task metric a row reports: the integer reference or the compiled
    module; a config the TIR kernels do not take (e.g. per-tensor V) falls back to the reference."""
    cfg = r.cfg.with_(layers={**r.cfg.layers, **r.choices})
    if engine == "compiled":
        from .study_compiled import CompiledAsTorch

        with torch.no_grad():
            tuple_out = isinstance(folded(example), tuple | list)
        compiled = CompiledAsTorch(folded, cfg, r.scales, tuple_out)
        try:
            compiled(example)  # builds now: a config the kernels reject is known before the task runs
            return compiled, "compiled"
        except ValueError as e:
            engine = f"reference ({str(e).split(';')[0]})"
    default = "direct" if set(r.choices.values()) == {"direct"} else f"f{r.cfg.tile}"
    return quantize_model(folded, cfg, r.scales, default=default, fold_bn=False)[0], engine


def winograd_share(layers: Sequence[ConvLayer], choices: Mapping[str, str]) -> float:
    """Fraction (%) of the eligible convolutions' MACs that run as F(4,3) or F(6,3)."""
    total = sum(layer_macs(x) for x in layers)
    fast = sum(layer_macs(x) for x in layers if choices[x.name] in ("f4", "f6"))
    return 100.0 * fast / total if total else 0.0


def eval_model(
    model_name: str, s: StudySettings | None = None, methods: Sequence[Method] | None = None,
    log=print,
) -> dict:
    """Run the study for a registered model; returns a JSON-ready dict."""
    from .models import get_model
    from .task_metrics import top1

    s = s or StudySettings()
    model, example = get_model(model_name)
    folded = fold_batchnorm(model, example)
    layers = collect_layers(folded, example)
    calib = real_inputs(model_name, min(s.images, 5), s.size if model_name == "craft" else None)
    acts = capture_inputs(folded, layers, calib)
    data = task_data(model_name, s)
    kind = data["kind"]
    ref_pred = top1(folded, data["x"])["pred"] if kind == "agreement" else None
    rows = [{"method": "FP32", **task_metric(kind, data, folded, folded, ref_pred)}]
    resolved: dict[str, Resolved] = {}
    if methods is None:
        methods = study_methods(s.tiles, s.groups, s.budgets_db, s.max_loss_db) if layers else []
    if not layers:  # e.g. MobileNetV2 (its only dense 3x3 has stride 2): FP32 and the compiled module
        log(f"  {model_name}: no eligible 3x3 stride-1 convolution; only FP32 and the compiled module")
    for meth in methods:
        t0 = time.time()
        r = resolve(meth, layers, s.finetune, model_name, folded, calib)
        resolved[meth.name] = r
        per = {}
        for layer in layers:
            lm, sc = _layer_method(meth, r, layer.name)
            per[layer.name] = layer_sqnr(lm, layer, acts[layer.name], sc)
        qm, engine = _task_model(s.engine, folded, example, r)
        row = {
            "method": meth.name,
            "layer_mean_db": sum(per.values()) / max(len(per), 1),
            "layers": per,
            "finetune_s": r.finetune_s,
            "winograd_mac_share": winograd_share(layers, r.choices),
            **task_metric(kind, data, folded, qm, ref_pred),
        }
        if meth.kind == "auto":
            row["choices"] = r.choices
            tc = r.tile_choice
            row["budget"] = {**meth.budget.__dict__, "direct_db": tc.direct_db,
                             "target_db": tc.target_db, "model_db": tc.model_db, "steps": tc.steps}
        row["engine"] = engine
        if engine == "compiled":
            row["build_s"] = qm.build_s
        row["seconds"] = time.time() - t0
        log(f"  {meth.name}: layer-mean {row['layer_mean_db']:.2f} dB ({row['seconds']:.0f} s)")
        rows.append(row)
    auto = [m for m in methods if m.kind == "auto"]
    if s.compiled and s.engine != "compiled" and (auto or not layers):
        from .config import default_config
        from .study_compiled import compiled_row

        if layers:
            r = resolved[auto[0].name]
            rows.append(compiled_row(auto[0].name, folded, example, r.cfg, r.scales, data, ref_pred, log))
        else:
            rows.append(compiled_row("nothing rewritten", folded, example, default_config(), None, data,
                                     ref_pred, log))
    res = {
        "model": model_name,
        "task": kind,
        "primary_metric": PRIMARY_METRIC[kind],
        "eligible_layers": len(layers),
        "layer_macs": {x.name: layer_macs(x) for x in layers},
        "rows": rows,
        "settings": {
            "tiles": s.tiles, "groups": s.groups, "images": s.images, "size": s.size,
            "test_limit": s.test_limit, "budgets_db": s.budgets_db,
            "max_loss_db": s.max_loss_db, "engine": s.engine,
            "finetune": s.finetune.__dict__,
        },
    }
    if layers:
        res["position_ranges"] = _position_ranges(layers, acts, max(s.tiles), s.finetune, model_name)
    return res


def _position_ranges(layers, acts, tile: int, ft: FinetuneSettings, model_name: str) -> dict:
    """Range per Winograd position of the largest layer, standard vs learned scales (group 32)."""
    from .plots import position_ranges

    layer = max(layers, key=layer_macs)
    cfg = groupwise(tile, 32)
    learned = learn(layers, cfg, "learned-shared", ft, model_name).shared
    x = acts[layer.name][0]
    before, after = position_ranges(layer, cfg, None, x), position_ranges(layer, cfg, learned, x)
    return {"layer": layer.name, "tile": tile, "before": before.tolist(), "after": after.tolist()}
