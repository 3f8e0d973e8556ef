"""Exact Cook-Toom construction of Winograd F(m, r) transforms.

For interpolation points ``a_0 .. a_{n-2}`` plus the point at infinity (``n = m + r - 1``), the 1D
minimal filtering algorithm is the transpose of polynomial multiplication by evaluation and
interpolation::

    Y = A^T [(G g) * (B^T d)],   A^T = V_m^T,   G = S0^-1 V_r,   B^T = S0 V_n^-T

where ``V_k`` is the ``n x k`` Vandermonde matrix of the points (row ``[a^0 .. a^{k-1}]``, and
``e_{k-1}`` for infinity) and ``S0 = diag(f)`` with ``f_j = prod_{l != j} (a_j - a_l)`` is the
conventional ("standard", as in Lavin & Gray / wincnn) diagonal scaling.  Every computation is done
with :class:`fractions.Fraction`, so the matrices are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import numpy as np

from ..errors import ConfigError

INF = "inf"
"""Marker for the point at infinity in a point list."""

Point = Fraction | str
FracMatrix = list[list[Fraction]]

DEFAULT_POINTS: dict[int, tuple[Fraction, ...]] = {
    1: (Fraction(0),),
    2: (Fraction(0), Fraction(1)),
    3: (Fraction(0), Fraction(1), Fraction(-1)),
    4: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2)),
    5: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2)),
    6: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2)),
    7: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2)),
}
"""Default finite points keyed by their count ``n - 1`` (F(2,3): 3, F(4,3): 5, F(6,3): 7)."""

ALTERNATIVE_POINTS: dict[str, tuple[Fraction, ...]] = {
    # Better-conditioned rational points for F(6,3) (Barabasz et al. style): +-3/2 instead of +-1/2
    # spreads the Vandermonde nodes and reduces the dynamic range of A^T.
    "f6_pm3/2": (
        Fraction(0),
        Fraction(1),
        Fraction(-1),
        Fraction(1, 2),
        Fraction(-1, 2),
        Fraction(3, 2),
        Fraction(-3, 2),
    ),
    "f6_pm1/4": (
        Fraction(0),
        Fraction(1),
        Fraction(-1),
        Fraction(2),
        Fraction(-2),
        Fraction(1, 4),
        Fraction(-1, 4),
    ),
}


def parse_points(points: Sequence[object]) -> tuple[Fraction, ...]:
    """Turn user point values (ints, ``"1/2"`` strings, floats with exact binary value) into Fractions."""
    out: list[Fraction] = []
    for p in points:
        try:
            out.append(Fraction(p) if not isinstance(p, float) else Fraction(p).limit_denominator(1 << 20))
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            raise ConfigError(f"points: cannot read interpolation point {p!r} as a rational number") from exc
    return tuple(out)


def _vandermonde(points: Sequence[Fraction], cols: int) -> FracMatrix:
    """``len(points)+1`` x ``cols`` Vandermonde matrix, last row the point at infinity."""
    rows = [[p**k for k in range(cols)] for p in points]
    rows.append([Fraction(int(k == cols - 1)) for k in range(cols)])
    return rows


def _inverse(mat: FracMatrix) -> FracMatrix:
    """Exact Gauss-Jordan inverse."""
    n = len(mat)
    aug = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(mat)]
    for col in range(n):
        piv = next((r for r in range(col, n) if aug[r][col] != 0), None)
        if piv is None:
            raise ConfigError("points: the Vandermonde matrix is singular (repeated interpolation points)")
        aug[col], aug[piv] = aug[piv], aug[col]
        inv_p = 1 / aug[col][col]
        aug[col] = [v * inv_p for v in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0:
                f = aug[r][col]
                aug[r] = [a - f * b for a, b in zip(aug[r], aug[col], strict=True)]
    return [row[n:] for row in aug]


def _transpose(mat: FracMatrix) -> FracMatrix:
    return [list(col) for col in zip(*mat, strict=True)]


@dataclass(frozen=True)
class WinogradMatrices:
    """Exact ``F(m, r)`` transforms ``A^T`` (m x n), ``G`` (n x r), ``B^T`` (n x n) with standard scales.

    Parameters
    ----------
    m : int
        Output tile size.
    r : int
        Filter size.
    points : tuple of Fraction
        The ``n - 1`` finite interpolation points (infinity is implicit).
    """

    m: int
    r: int
    points: tuple[Fraction, ...]

    def __post_init__(self) -> None:
        if self.m < 1 or self.r < 1:
            raise ConfigError(f"tile: F(m, r) needs m >= 1 and r >= 1, got F({self.m}, {self.r})")
        if len(self.points) != self.n - 1:
            raise ConfigError(
                f"points: F({self.m},{self.r}) needs {self.n - 1} finite points plus infinity, "
                f"got {len(self.points)}"
            )
        if len(set(self.points)) != len(self.points):
            raise ConfigError(f"points: interpolation points must be distinct, got {self.points}")

    @property
    def n(self) -> int:
        """Input tile size ``m + r - 1``."""
        return self.m + self.r - 1

    @cached_property
    def std_scale(self) -> tuple[Fraction, ...]:
        """The conventional diagonal ``f`` (``B^T = diag(f) V_n^-T``, ``G = diag(f)^-1 V_r``)."""
        f = []
        for j, a in enumerate(self.points):
            prod = Fraction(1)
            for l_, b in enumerate(self.points):
                if l_ != j:
                    prod *= a - b
            f.append(prod)
        f.append(Fraction(1))
        if f[0] < 0:  # wincnn convention: first row of B^T positive
            f[0] = -f[0]
        return tuple(f)

    @cached_property
    def AT(self) -> FracMatrix:  # noqa: N802 - conventional name
        """Output transform ``A^T`` (m x n): the transposed Vandermonde matrix ``V_m^T``."""
        return _transpose(_vandermonde(self.points, self.m))

    @cached_property
    def G(self) -> FracMatrix:  # noqa: N802
        """Filter transform ``G`` (n x r)."""
        v = _vandermonde(self.points, self.r)
        return [[x / f for x in row] for row, f in zip(v, self.std_scale, strict=True)]

    @cached_property
    def BT(self) -> FracMatrix:  # noqa: N802
        """Input transform ``B^T`` (n x n)."""
        vinv_t = _transpose(_inverse(_vandermonde(self.points, self.n)))
        return [[x * f for x in row] for row, f in zip(vinv_t, self.std_scale, strict=True)]

    def numpy(self, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(A^T, G, B^T)`` as numpy arrays."""
        return (
            np.array(self.AT, dtype=dtype),
            np.array(self.G, dtype=dtype),
            np.array(self.BT, dtype=dtype),
        )

    def integer_bt(self) -> tuple[np.ndarray, np.ndarray]:
        """Integer form of ``B^T``: ``B^T = diag(1 / c) @ BT_int`` with ``BT_int`` integral.

        Returns
        -------
        (BT_int, c) : (int64 array n x n, float64 array n)
            ``c_i`` is the least common multiple of the denominators of row ``i``.
        """
        ints, cs = [], []
        for row in self.BT:
            c = 1
            for x in row:
                c = c * x.denominator // np.gcd(c, x.denominator)
            ints.append([int(x * c) for x in row])
            cs.append(float(c))
        return np.array(ints, dtype=np.int64), np.array(cs, dtype=np.float64)


def winograd_matrices(m: int, r: int = 3, points: Sequence[object] | None = None) -> WinogradMatrices:
    """Build exact ``F(m, r)`` matrices from ``points`` (default: the standard set for ``n - 1`` points).

    Parameters
    ----------
    m, r : int
        Output tile and filter size.
    points : sequence, optional
        Finite interpolation points; infinity is appended implicitly.
    """
    n = m + r - 1
    if points is None:
        if n - 1 not in DEFAULT_POINTS:
            raise ConfigError(f"points: no default point set for F({m},{r}); pass {n - 1} points")
        pts = DEFAULT_POINTS[n - 1]
    else:
        pts = parse_points(points)
    return WinogradMatrices(m=m, r=r, points=pts)
