"""TIR kernel of the int8 direct convolution (the per-layer ``direct`` choice), specialized on static shapes.

It reproduces :func:`~tvm_winoq.quant.baselines.direct_conv2d_int8` (integers bit for bit, the float
output to float32 rounding) as one PrimFunc ``winoq_direct``:

``x`` [N,C,H,W] f32, ``w_q`` [KH,KW,C/groups,K] int8, ``s_w`` [K] f32, ``bias`` [K] f32 -> ``y`` [N,K,OH,OW]

* ``x_absmax``/``x_scale``/``x_quant``: per-tensor input scale ``s_x``, ``x`` quantized to int8, zero
  padded and transposed to ``x_q`` [N,Hp,Wp,C] (channels innermost);
* ``conv_acc``: ``acc[n,oh,ow,k] = sum_{r,s,c} int32(x_q[n, oh*sh + r*dh, ow*sw + s*dw, c0(k) + c]) *
  int32(w_q[r,s,c,k])`` (exact int32; ``k`` innermost so a schedule vectorizes over output channels);
* ``dequant``: ``y[n,k,oh,ow] = float32(acc) * (s_w[k] * s_x) + bias[k]``.

Any kernel size, stride, dilation, groups (depthwise included) and padding.  With ``debug=True`` the
integer intermediates are outputs: ``(x, w_q, s_w, bias, x_q, s_x, acc, y)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import tvm
import tvm_ffi
from tvm import tirx
from tvm.script import tirx as T

from ..config import QuantSpec
from ..errors import ConfigError
from ..quant.baselines import quantize_weight_per_channel
from .kernels import input_quant_macro

__all__ = ["DirectLayerExecutable", "DirectPacking", "DirectSpec", "compile_direct_layer", "direct_constants",
           "direct_func", "direct_layer_module", "packed_direct_func"]


@dataclass(frozen=True)
class DirectSpec:
    """Static description of one int8 direct convolution instance."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    groups: int
    act_qmax: int = 127

    @staticmethod
    def of(x_shape: Sequence[int], w_shape: Sequence[int], *, stride: Sequence[int] = (1, 1),
           dilation: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0, 0, 0), groups: int = 1,
           act_qmax: int = 127) -> DirectSpec:
        """The spec of a conv with NCHW input ``x_shape`` and OIHW weight ``w_shape``.

        ``padding`` is ``(top, left, bottom, right)`` (or ``(h, w)``, symmetric).

        Raises
        ------
        ConfigError
            If the shapes, groups or quantization do not fit the kernel.
        """
        n, c, h, w = (int(d) for d in x_shape)
        k, cg, kh, kw = (int(d) for d in w_shape)
        pad = tuple(int(p) for p in padding)
        if len(pad) == 2:
            pad = (pad[0], pad[1], pad[0], pad[1])
        if groups < 1 or c % groups or k % groups or cg * groups != c:
            raise ConfigError(f"weight {tuple(w_shape)} with groups={groups} does not fit input "
                              f"{tuple(x_shape)}")
        if act_qmax > 127:
            raise ConfigError("the TIR direct kernel supports up to 8-bit activations")
        spec = DirectSpec(n, c, h, w, k, (kh, kw), (int(stride[0]), int(stride[1])),
                          (int(dilation[0]), int(dilation[1])), pad, int(groups), int(act_qmax))  # type: ignore[arg-type]
        if spec.out_h < 1 or spec.out_w < 1:
            raise ConfigError(f"conv output of input {tuple(x_shape)} would be empty")
        return spec

    @property
    def padded_h(self) -> int:
        return self.height + self.padding[0] + self.padding[2]

    @property
    def padded_w(self) -> int:
        return self.width + self.padding[1] + self.padding[3]

    @property
    def out_h(self) -> int:
        return (self.padded_h - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        return (self.padded_w - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_channels, self.out_h, self.out_w)

    @property
    def group_in(self) -> int:
        """Input channels per group (the reduction length per kernel tap)."""
        return self.in_channels // self.groups

    @property
    def group_out(self) -> int:
        """Output channels per group."""
        return self.out_channels // self.groups

    def fields(self) -> list[int]:
        """The spec as a flat list of ints (the ``winoq.direct_spec`` attribute of its kernels)."""
        return [self.batch, self.in_channels, self.height, self.width, self.out_channels, *self.kernel,
                *self.stride, *self.dilation, *self.padding, self.groups, self.act_qmax]

    @staticmethod
    def of_func(func: tirx.PrimFunc) -> DirectSpec | None:
        """The spec whose plain kernel (:func:`direct_func`) ``func`` is, read from its
        ``winoq.direct_spec`` attribute; ``None`` for anything else (a scheduled, packed or debug kernel)."""
        attrs = func.attrs if func.attrs is not None else {}
        if "winoq.direct_spec" not in attrs:
            return None
        f = [int(v) for v in attrs["winoq.direct_spec"]]
        spec = DirectSpec(*f[:5], (f[5], f[6]), (f[7], f[8]), (f[9], f[10]), (f[11], f[12], f[13], f[14]),
                          f[15], f[16])
        plain = direct_func(spec).with_attrs(attrs)
        return spec if tvm_ffi.structural_equal(plain, func) else None

    def key(self) -> str:
        """Short readable name fragment (``direct_c64_k128_3x3s2_56x56``)."""
        extra = "".join([f"d{self.dilation[0]}" if self.dilation != (1, 1) else "",
                         f"g{self.groups}" if self.groups != 1 else ""])
        return (f"direct_c{self.in_channels}_k{self.out_channels}_{self.kernel[0]}x{self.kernel[1]}"
                f"s{self.stride[0]}{extra}_{self.height}x{self.width}")


def direct_constants(
    weight: torch.Tensor, bias: torch.Tensor | None, spec_w: QuantSpec
) -> dict[str, np.ndarray]:
    """Offline-quantized weights in the kernel's layout.

    Returns
    -------
    dict
        ``w_q`` [KH, KW, C/groups, K] int8 (output channels innermost), ``s_w`` [K] float32 (per output
        channel, exactly the reference's scales) and ``bias`` [K] float32 (zeros without bias).

    Raises
    ------
    ConfigError
        If ``spec_w`` has more than 8 bits.
    """
    if spec_w.bits > 8:
        raise ConfigError("the TIR direct kernel supports up to 8-bit weights")
    w_q, s_w = quantize_weight_per_channel(weight, spec_w)
    k = weight.shape[0]
    b = torch.zeros(k) if bias is None else bias.detach()
    return {
        "w_q": w_q.to(torch.int8).permute(2, 3, 1, 0).contiguous().numpy(),
        "s_w": s_w.to(torch.float32).contiguous().numpy(),
        "bias": b.to(torch.float32).reshape(k).contiguous().numpy(),
    }


def _in_channel(spec: DirectSpec, k: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
    """Input channel read by output channel ``k`` at reduction index ``c`` (``c`` for one group)."""
    if spec.groups == 1:
        return c
    if spec.group_in == 1 and spec.group_out == 1:  # depthwise
        return k
    return k // spec.group_out * spec.group_in + c


def direct_func(spec: DirectSpec, debug: bool = False) -> tirx.PrimFunc:
    """Kernel ``direct``: ``(x, w_q, s_w, bias, y)``; ``debug``: ``(x, w_q, s_w, bias, x_q, s_x, acc, y)``."""
    nb, c, h, w, k = spec.batch, spec.in_channels, spec.height, spec.width, spec.out_channels
    kh, kw = spec.kernel
    sh, sw_ = spec.stride
    dh, dw = spec.dilation
    hp, wp, oh, ow, cg = spec.padded_h, spec.padded_w, spec.out_h, spec.out_w, spec.group_in
    quantize_input = input_quant_macro((nb, c, h, w), (hp, wp), spec.padding[:2], spec.act_qmax, "int8")

    @T.macro
    def body(x, wq, sw, bias, xq, sx, acc, y):
        xmax = T.sblock_alloc_buffer((1,), "float32")
        quantize_input(x, xmax, sx, xq)
        for i0, i1, i2, i3, i4, i5, i6 in T.grid(nb, oh, ow, k, kh, kw, cg):
            with T.sblock("conv_acc"):
                v0, v1, v2, v3, v4, v5, v6 = T.axis.remap("SSSSRRR", [i0, i1, i2, i3, i4, i5, i6])
                with T.init():
                    acc[v0, v1, v2, v3] = 0
                acc[v0, v1, v2, v3] = acc[v0, v1, v2, v3] + (
                    T.Cast("int32", xq[v0, v1 * sh + v4 * dh, v2 * sw_ + v5 * dw, _in_channel(spec, v3, v6)])
                    * T.Cast("int32", wq[v4, v5, v6, v3]))
        for i0, i1, i2, i3 in T.grid(nb, k, oh, ow):
            with T.sblock("dequant"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                y[v0, v1, v2, v3] = T.Cast("float32", acc[v0, v2, v3, v1]) * (sw[v1] * sx[0]) + bias[v1]

    if debug:
        @T.prim_func(s_tir=True, private=True)
        def winoq_direct_debug(x: T.Buffer((nb, c, h, w), "float32"), wq: T.Buffer((kh, kw, cg, k), "int8"),
                               sw: T.Buffer((k,), "float32"), bias: T.Buffer((k,), "float32"),
                               xq: T.Buffer((nb, hp, wp, c), "int8"), sx: T.Buffer((1,), "float32"),
                               acc: T.Buffer((nb, oh, ow, k), "int32"),
                               y: T.Buffer((nb, k, oh, ow), "float32")):
            T.func_attr({"tirx.noalias": True})
            body(x, wq, sw, bias, xq, sx, acc, y)

        return winoq_direct_debug

    @T.prim_func(s_tir=True, private=True)
    def winoq_direct(x: T.Buffer((nb, c, h, w), "float32"), wq: T.Buffer((kh, kw, cg, k), "int8"),
                     sw: T.Buffer((k,), "float32"), bias: T.Buffer((k,), "float32"),
                     y: T.Buffer((nb, k, oh, ow), "float32")):
        T.func_attr({"tirx.noalias": True})
        xq = T.sblock_alloc_buffer((nb, hp, wp, c), "int8")
        sx = T.sblock_alloc_buffer((1,), "float32")
        acc = T.sblock_alloc_buffer((nb, oh, ow, k), "int32")
        body(x, wq, sw, bias, xq, sx, acc, y)

    return winoq_direct.with_attr("winoq.direct_spec", spec.fields())


@dataclass(frozen=True)
class DirectPacking:
    """How a packed direct kernel (:func:`packed_direct_func`) takes its constant ``w_q``: output channels
    in blocks of ``kb``, input channels in groups of ``cw`` (quads, or pairs; zero weights pad the last),
    ``[K/kb, KH, KW, C/cw, kb, cw]`` (each block's weights one contiguous stream, one group per output
    channel a 32-bit lane), and the input either signed bytes ``q`` (``x_offset = 0``: Arm ``sdot``,
    signed x signed) or shifted by ``x_offset`` into unsigned bytes ``q + x_offset`` (x86 ``vpdpbusd``,
    unsigned x signed), undone exactly by the constant ``w_c[k] = x_offset * sum(w_q[.., k])``.  With
    pairs (``cw = 2``: x86 ``vpmaddwd`` without VNNI) the input is stored as ``int16`` ``q`` (a pair is
    one 32-bit broadcast), no offset."""

    kb: int
    x_offset: int = 128
    cw: int = 4

    def __post_init__(self) -> None:
        # q + x_offset must be a byte of x_dtype for every q in [-127, 127]
        if (self.kb < 1 or not (self.x_offset == 0 or 127 <= self.x_offset <= 128) or self.cw not in (2, 4)
                or (self.cw == 2 and self.x_offset)):
            raise ValueError(f"DirectPacking: bad packing {self}")

    @property
    def x_dtype(self) -> str:
        """Storage type of the quantized input: ``int16`` for pairs, ``int8`` without an offset, else
        ``uint8``."""
        if self.cw == 2:
            return "int16"
        return "int8" if self.x_offset == 0 else "uint8"

    def channels(self, c: int) -> int:
        """``c`` input channels rounded up to whole groups of ``cw`` (the packed kernel's)."""
        return -(-c // self.cw) * self.cw

    def fits(self, spec: DirectSpec) -> bool:
        """Whether ``spec`` can take this packing (dense, whole blocks of output channels)."""
        return spec.groups == 1 and spec.out_channels % self.kb == 0

    def pack(self, w_q: np.ndarray) -> np.ndarray:
        """``w_q`` ``[KH, KW, C, K]`` (:func:`direct_constants`) in this layout, input channels padded with
        zero weights to whole groups (``C = 3``: the padded input channel reads ``x_offset``)."""
        kh, kw, c, k = w_q.shape
        if k % self.kb:
            raise ValueError(f"DirectPacking: {k} output channels are not blocks of {self.kb}")
        cp, cw = self.channels(c), self.cw
        w_q = np.pad(w_q, ((0, 0), (0, 0), (0, cp - c), (0, 0)))
        blocks = w_q.reshape(kh, kw, cp // cw, cw, k // self.kb, self.kb)
        return np.ascontiguousarray(blocks.transpose(4, 0, 1, 2, 5, 3))

    def scales(self, s_w: np.ndarray) -> np.ndarray:
        """``s_w`` [K] as the kernel reads it: as it is."""
        return s_w

    def extras(self, w_q: np.ndarray) -> list[np.ndarray]:
        """The constants the kernel takes after ``bias``: ``w_c`` [K] int32."""
        sums = w_q.astype(np.int64).sum(axis=(0, 1, 2)) * self.x_offset
        return [np.ascontiguousarray(sums.astype(np.int32))]


def packed_direct_func(spec: DirectSpec, packing: DirectPacking) -> tirx.PrimFunc:
    """Kernel ``direct`` on weights packed at compile time: ``(x, w_p, s_w, bias, w_c, y)``.

    The same integers as :func:`direct_func`, laid out for a dot-product micro-kernel over input
    channel quads or pairs (``vpdpbusd``: unsigned x signed bytes; ``sdot``: signed x signed;
    ``vpmaddwd``: int16 pairs, the weights sign-extended on load): ``x_q`` is stored as
    ``packing.x_dtype`` ``q + x_offset`` (padding ``x_offset``), ``conv_acc`` sums ``(q + x_offset) * w``
    over ``(r, s, c4, ci)`` (``ci < cw``) with ``k`` split ``(ko, ki)``, and ``dequant`` subtracts
    ``w_c[k]`` first (0 without an offset), so ``acc - w_c`` is the plain kernel's accumulator, bit for bit.
    """
    if not packing.fits(spec):
        raise ConfigError(f"{spec.key()} does not fit the packed direct kernel ({packing})")
    nb, c, h, w, k = spec.batch, spec.in_channels, spec.height, spec.width, spec.out_channels
    kh, kw = spec.kernel
    sh, sw_ = spec.stride
    dh, dw = spec.dilation
    hp, wp, oh, ow, kb = spec.padded_h, spec.padded_w, spec.out_h, spec.out_w, packing.kb
    cp, cw = packing.channels(c), packing.cw  # the extra channels hold x_offset, their weights are 0
    quantize_input = input_quant_macro((nb, c, h, w), (hp, wp), spec.padding[:2], spec.act_qmax,
                                       packing.x_dtype, packing.x_offset, cp)

    @T.prim_func(s_tir=True, private=True)
    def winoq_direct_packed(x: T.Buffer((nb, c, h, w), "float32"),
                            wq: T.Buffer((k // kb, kh, kw, cp // cw, kb, cw), "int8"),
                            sw: T.Buffer((k,), "float32"), bias: T.Buffer((k,), "float32"),
                            wc: T.Buffer((k,), "int32"), y: T.Buffer((nb, k, oh, ow), "float32")):
        T.func_attr({"tirx.noalias": True})
        xq = T.sblock_alloc_buffer((nb, hp, wp, cp), packing.x_dtype)
        sx = T.sblock_alloc_buffer((1,), "float32")
        xmax = T.sblock_alloc_buffer((1,), "float32")
        acc = T.sblock_alloc_buffer((nb, oh, ow, k), "int32")
        quantize_input(x, xmax, sx, xq)
        for i0, i1, i2, i3, i4, i5, i6, i7, i8 in T.grid(nb, oh, ow, k // kb, kb, kh, kw, cp // cw, cw):
            with T.sblock("conv_acc"):
                v0, v1, v2, ko, ki, v5, v6, c4, ci = T.axis.remap(
                    "SSSSSRRRR", [i0, i1, i2, i3, i4, i5, i6, i7, i8])
                with T.init():
                    acc[v0, v1, v2, ko * kb + ki] = 0
                acc[v0, v1, v2, ko * kb + ki] = acc[v0, v1, v2, ko * kb + ki] + (
                    T.Cast("int32", xq[v0, v1 * sh + v5 * dh, v2 * sw_ + v6 * dw, c4 * cw + ci])
                    * T.Cast("int32", wq[ko, v5, v6, c4, ki, ci]))
        for i0, i1, i2, i3 in T.grid(nb, k, oh, ow):
            with T.sblock("dequant"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                y[v0, v1, v2, v3] = (T.Cast("float32", acc[v0, v2, v3, v1] - wc[v1]) * (sw[v1] * sx[0])
                                     + bias[v1])

    return winoq_direct_packed


_CONSTS = ("w_q", "s_w", "bias", "w_c")  # the kernel's constant arguments, in order (``w_c``: packed only)


@dataclass
class DirectLayerExecutable:
    """The ``direct`` kernel of one layer, built standalone (tests and benchmarks)."""

    spec: DirectSpec
    module: tvm.runtime.Module
    consts: dict[str, np.ndarray]
    debug: bool

    def _args(self, x: np.ndarray) -> dict[str, tvm.runtime.Tensor]:
        s = self.spec
        shapes = {"y": (s.out_shape, "float32")}
        if self.debug:
            shapes = {"x_q": ((s.batch, s.padded_h, s.padded_w, s.in_channels), "int8"),
                      "s_x": ((1,), "float32"),
                      "acc": ((s.batch, s.out_h, s.out_w, s.out_channels), "int32")} | shapes
        bufs = {"x": tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32))}
        bufs |= {n: tvm.runtime.tensor(self.consts[n]) for n in _CONSTS if n in self.consts}
        bufs |= {n: tvm.runtime.tensor(np.zeros(sh, dt)) for n, (sh, dt) in shapes.items()}
        return bufs

    def __call__(self, x: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Run on ``x``: ``y`` (``debug``: also ``x_q`` [N,C,H,W] unpadded, ``s_x``, ``acc`` [N,K,OH,OW])."""
        arr = x.numpy() if isinstance(x, torch.Tensor) else x
        if tuple(arr.shape) != (self.spec.batch, self.spec.in_channels, self.spec.height, self.spec.width):
            raise ConfigError(f"input shape {tuple(arr.shape)} does not match the kernel's {self.spec}")
        b = self._args(arr)
        self.module["winoq_direct"](*b.values())
        out = {n: v.numpy() for n, v in b.items() if n != "x" and n not in _CONSTS}
        if self.debug:
            (t, left), h, w = self.spec.padding[:2], self.spec.height, self.spec.width
            out["x_q"] = out["x_q"][:, t:t + h, left:left + w].transpose(0, 3, 1, 2)
            out["acc"] = out["acc"].transpose(0, 3, 1, 2)
        return out

    def time(self, x: np.ndarray, number: int = 5, repeat: int = 5) -> float:
        """Median seconds per call (``time_evaluator``)."""
        args = list(self._args(x).values())
        te = self.module.time_evaluator("winoq_direct", tvm.cpu(), number=number, repeat=repeat)
        return float(np.median(te(*args).results))


def direct_layer_module(
    spec: DirectSpec,
    consts: dict[str, np.ndarray],
    target: tvm.target.Target,
    *,
    debug: bool = False,
    schedule: bool = True,
) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """The ``direct`` kernel of ``spec`` for ``target`` as a scheduled module (one PrimFunc,
    ``winoq_direct``) and the constants it takes (packed where the family packs them: its
    ``prepack_direct`` hook, e.g. ``schedules/x86.py``, ``schedules/arm.py``).  Cross targets build it
    with ``tvm.compile`` and export it with their preset (:meth:`TargetPreset.export_library`).

    Parameters
    ----------
    spec : DirectSpec
        Shapes of the layer.
    consts : dict
        :func:`direct_constants` of its weights.
    target : Target
        A CPU (LLVM) target.
    debug : bool
        Expose the integer intermediates (never packed).
    schedule : bool
        Apply the target family's ``schedule_direct`` (``False``: naive TIR, never packed).

    Returns
    -------
    (IRModule, dict)
    """
    from .schedules import schedules_for

    func = direct_func(spec, debug).with_attr("winoq.kernel", "direct")
    family = schedules_for(target) if schedule else None
    packed = None if debug or family is None or not hasattr(family, "prepack_direct") else (
        family.prepack_direct(func, target))
    if packed is not None:
        func, packing = packed
        consts = consts | {"w_q": packing.pack(consts["w_q"]), "s_w": packing.scales(consts["s_w"]),
                           "w_c": packing.extras(consts["w_q"])[0]}
    mod = tvm.IRModule({"winoq_direct": func.with_attr("global_symbol", "winoq_direct")})
    if family is not None:
        mod = family.schedule_winoq_kernels(mod, target)
    return mod, consts


def compile_direct_layer(
    spec: DirectSpec,
    consts: dict[str, np.ndarray],
    target: tvm.target.Target | str | dict,
    *,
    debug: bool = False,
    schedule: bool = True,
) -> DirectLayerExecutable:
    """Build the ``direct`` kernel of ``spec`` for ``target`` (``debug`` adds ``x_q``/``s_x``/``acc``)
    and load it on this host (:func:`direct_layer_module`, then ``tvm.compile``).

    Parameters
    ----------
    spec : DirectSpec
        Shapes of the layer.
    consts : dict
        :func:`direct_constants` of its weights.
    target : Target, str or dict
        A CPU (LLVM) target this host runs.
    debug : bool
        Expose the integer intermediates.
    schedule : bool
        Apply the target family's ``schedule_direct`` (``False``: naive TIR).

    Returns
    -------
    DirectLayerExecutable
    """
    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    mod, consts = direct_layer_module(spec, consts, tgt, debug=debug, schedule=schedule)
    return DirectLayerExecutable(spec, tvm.compile(mod, target=tgt).jit(), consts, debug)
