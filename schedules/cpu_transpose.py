"""Float32 block transposes as TIR tensor intrinsics (any LLVM target): ``n`` row loads, ``n`` shuffles
(``T.Shuffle``, LLVM picks the permutes: ``vunpck``/``vperm`` on x86, ``zip``/``trn`` on Arm), ``n`` row
stores, where a vectorized loop would gather or scatter one element per lane.

* ``TRANSPOSE_INTRIN[n]`` (``n`` = 8, 4): ``C[w, c] = A[c, 0, w]``, an NCHW input row block to channels
  innermost (the input kernel's quantization reads its rows through it);
* ``TRANSPOSE_FMA_INTRIN``: ``C[k, 0, w] = A[w, k] * S[0] + B[k]``, 8x8, channels-innermost output tiles
  to an NCHW row block with the dequantization fma (the output kernel's store).

The ``0`` axes are the unit row axis between the two transposed ones (tensorize only matches unit axes
of a region when the intrinsic's buffer has them).
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

__all__ = ["TRANSPOSE_FMA_INTRIN", "TRANSPOSE_INTRIN"]


def _transpose_intrin(n: int) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """``C[w, c] = A[c, 0, w]`` for ``n x n`` float32 (an NCHW row block to channels innermost)."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        sa, sh, sc = T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (n, 1, n), "float32", offset_factor=1, strides=[sa, sh, 1])
        C = T.match_buffer(c, (n, n), "float32", offset_factor=1, strides=[sc, 1])
        with T.sblock("root"):
            T.reads(A[0:n, 0, 0:n])
            T.writes(C[0:n, 0:n])
            for i, j in T.grid(n, n):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vj, vi] = A[vi, 0, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        sa, sh, sc = T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (n, 1, n), "float32", offset_factor=1, strides=[sa, sh, 1])
        C = T.match_buffer(c, (n, n), "float32", offset_factor=1, strides=[sc, 1])
        with T.sblock("root"):
            T.reads(A[0:n, 0, 0:n])
            T.writes(C[0:n, 0:n])
            for i in T.unroll(n):
                C.vstore([i, 0], T.Shuffle([A.vload([j, 0, 0], f"float32x{n}") for j in range(n)],
                                           [j * n + i for j in range(n)]))

    return desc, impl


TRANSPOSE_INTRIN = {8: "winoq_transpose8x8_f32", 4: "winoq_transpose4x4_f32"}
TRANSPOSE_FMA_INTRIN = "winoq_transpose8x8_fma_f32"


def _transpose_fma_intrin(n: int = 8) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """``C[i, 0, j] = A[j, i] * S[0] + B[i]`` for ``n x n`` float32 (an NCHW output row block from a
    channels-innermost tile): ``n`` row loads, ``n`` shuffles (LLVM picks the permutes), ``n`` fma and
    ``n`` row stores, instead of one gathered element per lane."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, s: T.handle, b: T.handle, c: T.handle) -> None:
        sa, sc, sh = T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (n, n), "float32", offset_factor=1, strides=[sa, 1])
        S = T.match_buffer(s, (1,), "float32", offset_factor=1)
        B = T.match_buffer(b, (n,), "float32", offset_factor=1)
        C = T.match_buffer(c, (n, 1, n), "float32", offset_factor=1, strides=[sc, sh, 1])
        with T.sblock("root"):
            T.reads(A[0:n, 0:n], S[0], B[0:n])
            T.writes(C[0:n, 0, 0:n])
            for i, j in T.grid(n, n):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, 0, vj] = A[vj, vi] * S[0] + B[vi]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, s: T.handle, b: T.handle, c: T.handle) -> None:
        sa, sc, sh = T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (n, n), "float32", offset_factor=1, strides=[sa, 1])
        S = T.match_buffer(s, (1,), "float32", offset_factor=1)
        B = T.match_buffer(b, (n,), "float32", offset_factor=1)
        C = T.match_buffer(c, (n, 1, n), "float32", offset_factor=1, strides=[sc, sh, 1])
        with T.sblock("root"):
            T.reads(A[0:n, 0:n], S[0], B[0:n])
            T.writes(C[0:n, 0, 0:n])
            for i in T.unroll(n):
                C.vstore([i, 0, 0], T.Shuffle([A.vload([j, 0], f"float32x{n}") for j in range(n)],
                                              [j * n + i for j in range(n)])
                         * T.broadcast(S[0], n) + T.broadcast(B[i], n))

    return desc, impl


for _n, _name in TRANSPOSE_INTRIN.items():
    TensorIntrin.register(_name, *_transpose_intrin(_n), override=True)
TensorIntrin.register(TRANSPOSE_FMA_INTRIN, *_transpose_fma_intrin(), override=True)
