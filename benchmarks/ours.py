"""Our rows of the layer benchmark (:mod:`benchmarks.peers`): one ``nn.Conv2d`` compiled by tvm_winoq."""

from __future__ import annotations

import warnings

import numpy as np

from benchmarks.peers import _STATE, Call, Factory, Unavailable, register_impl

__all__ = ["WINOGRAD_FLOOR_DB", "tvm_winoq"]


def tvm_winoq(tile: int, group: int = 32, best: bool = False, measured: bool = False) -> Factory:
    """Ours: ``tvm_winoq.relax.build.compile_model`` on one ``nn.Conv2d``, the shipped default config
    (``default_config(tile, group)``: group-wise V, M per output channel).

    Built once per (tile, shape, weights) for the target preset of :func:`benchmarks.peers.set_preset`,
    or with ``best`` for ``host_preset(best=True)`` (e.g. ``x86-avx512-vnni``, ``vpdpwssd``), the preset
    that uses the same ISA as the peers' int8 kernels (ONNX Runtime picks VNNI at run time); that row is
    skipped where it would be the same preset.  Threads via TVM's pool.  Scales are learned data-free
    for the layer (200 SGD steps on Gaussian inputs, as ``winoq compile`` does).
    With ``measured`` (for ``host_preset(best=True)``, whatever the run's preset), the layer is the
    faster of Winograd and int8 direct as measured by ``winoq compile``'s ``measure`` phase
    (:func:`tvm_winoq.speed_choice.measure_layer_choices`, at the row's thread count).
    Any import/build problem of the module makes the row skipped.
    """

    def factory(x: np.ndarray, w: np.ndarray, b: np.ndarray, threads: int) -> Call:
        try:
            import torch
            import tvm

            from tvm_winoq.config import default_config
            from tvm_winoq.finetune import ConvLayer, FinetuneSettings, finetune_scales
            from tvm_winoq.relax.build import compile_model
            from tvm_winoq.speed_choice import measure_layer_choices
            from tvm_winoq.targets import get_preset, host_preset
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"tvm_winoq.relax.build not usable: {type(e).__name__}: {e}") from e
        preset = _STATE["preset"]
        if measured:
            preset = host_preset(best=True).name
        elif best:
            preset = host_preset(best=True).name
            if get_preset(preset) == get_preset(_STATE["preset"]):
                raise Unavailable(f"the best host preset is the run's preset ({preset})")
        cache = _STATE["tvm"]
        key = (tile, group, preset, measured, threads, x.shape, hash(w.tobytes()), hash(b.tobytes()))
        if key not in cache:
            conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(w))
                conv.bias.copy_(torch.from_numpy(b))
            cfg = default_config(tile=tile, group=group)
            layer = ConvLayer("conv", torch.from_numpy(w), torch.from_numpy(b), (1, 1), tuple(x.shape))
            scales = finetune_scales([layer], cfg, FinetuneSettings(steps=200), progress=False).shared
            model, xt = torch.nn.Sequential(conv).eval(), torch.from_numpy(x)
            target = get_preset(preset).tvm_target()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if measured:
                    tvm.get_global_func("runtime.config_threadpool")(1, threads)
                    _STATE["tvm_threads"] = threads
                    choice = measure_layer_choices(model, xt, cfg, target, scales=scales, log=lambda s: None)
                    _STATE["choices"][f"{x.shape[1]}@{x.shape[2]}x{x.shape[3]} threads={threads}"] = [
                        t.to_dict() for t in choice.timings]
                    cfg = choice.apply(cfg)
                    cm = choice.compiled or compile_model(model, xt, cfg, target=target, scales=scales)
                else:
                    cm = compile_model(model, xt, cfg, target=target, scales=scales)
            if not any(r.rewritten for r in cm.records):
                raise Unavailable(f"the conv was not rewritten to Winograd: {cm.records}")
            while len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[key] = cm.runner()
        runner = cache[key]

        def call() -> np.ndarray:
            if _STATE["tvm_threads"] != threads:
                tvm.get_global_func("runtime.config_threadpool")(1, threads)
                _STATE["tvm_threads"] = threads
            return runner(x)

        return call

    return factory


# All-int8 Winograd is less accurate than direct int8 (that is the method's trade-off, measured in the
# fidelity study): on these random He-initialised layers F(4,3) reaches ~20 dB, F(6,3) ~15 dB vs float64,
# so our rows have a 12 dB floor -- still far above a wrong answer (<= 0 dB); the SQNR is in every table.
WINOGRAD_FLOOR_DB = 12.0
register_impl("ours-f2", tvm_winoq(2), min_sqnr_db=WINOGRAD_FLOOR_DB,
              note="tvm_winoq compile_model, default_config(tile=2, group=32), learned scales")
register_impl("ours-f4", tvm_winoq(4), min_sqnr_db=WINOGRAD_FLOOR_DB,
              note="tvm_winoq compile_model, default_config(tile=4, group=32), learned scales")
register_impl("ours-f6", tvm_winoq(6), min_sqnr_db=WINOGRAD_FLOOR_DB,
              note="tvm_winoq compile_model, default_config(tile=6, group=32), learned scales")
register_impl("ours-f4-best", tvm_winoq(4, best=True), min_sqnr_db=WINOGRAD_FLOOR_DB,
              note="as ours-f4, for host_preset(best=True) (x86-avx512-vnni on a VNNI CPU)")
register_impl("ours-auto", tvm_winoq(4, measured=True), min_sqnr_db=WINOGRAD_FLOOR_DB,
              note="as ours-f4-best, F(4,3) or int8 direct as measured faster (winoq compile's default)")
