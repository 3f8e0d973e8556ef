"""Exact Winograd F(m, r) transforms, their learnable diagonal scaling and 2D tiling."""

from .cook_toom import ALTERNATIVE_POINTS, DEFAULT_POINTS, WinogradMatrices, winograd_matrices
from .scaled import ScaledTransforms, scaled_transforms, winograd_conv2d_float
from .tiling import TileGeometry, assemble_tiles, extract_tiles, geometry

__all__ = [
    "ALTERNATIVE_POINTS",
    "DEFAULT_POINTS",
    "ScaledTransforms",
    "TileGeometry",
    "WinogradMatrices",
    "assemble_tiles",
    "extract_tiles",
    "geometry",
    "scaled_transforms",
    "winograd_conv2d_float",
    "winograd_matrices",
]
