"""2D tiling of an NCHW convolution input into overlapping Winograd tiles, and back."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TileGeometry:
    """Tiling of one convolution: ``F(m, r)`` over an ``H x W`` input with symmetric ``padding``.

    Output ``OH = H + 2*pad - r + 1`` (likewise OW) is covered by ``th x tw`` tiles of ``m x m``;
    the padded input is zero-extended at the bottom/right so every tile has a full ``n x n`` input.
    """

    m: int
    r: int
    height: int
    width: int
    pad_h: int
    pad_w: int

    @property
    def n(self) -> int:
        return self.m + self.r - 1

    @property
    def out_h(self) -> int:
        return self.height + 2 * self.pad_h - self.r + 1

    @property
    def out_w(self) -> int:
        return self.width + 2 * self.pad_w - self.r + 1

    @property
    def tiles_h(self) -> int:
        return -(-self.out_h // self.m)

    @property
    def tiles_w(self) -> int:
        return -(-self.out_w // self.m)

    @property
    def tiles(self) -> int:
        """Tiles per image."""
        return self.tiles_h * self.tiles_w

    @property
    def padded_h(self) -> int:
        return self.tiles_h * self.m + self.r - 1

    @property
    def padded_w(self) -> int:
        return self.tiles_w * self.m + self.r - 1


def geometry(x_shape: tuple[int, ...], m: int, r: int, padding: tuple[int, int]) -> TileGeometry:
    """Tile geometry of an NCHW input of ``x_shape`` for ``F(m, r)``."""
    _, _, h, w = x_shape
    geo = TileGeometry(m=m, r=r, height=h, width=w, pad_h=padding[0], pad_w=padding[1])
    if geo.out_h < 1 or geo.out_w < 1:
        raise ValueError(f"input {h}x{w} with padding {padding} is smaller than the {r}x{r} kernel")
    return geo


def extract_tiles(x: torch.Tensor, geo: TileGeometry) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N*th*tw, C, n, n]`` input tiles (zero padded), tile index row-major."""
    n_, c = x.shape[:2]
    xp = F.pad(
        x,
        (geo.pad_w, geo.padded_w - geo.width - geo.pad_w, geo.pad_h, geo.padded_h - geo.height - geo.pad_h),
    )
    t = xp.unfold(2, geo.n, geo.m).unfold(3, geo.n, geo.m)  # N, C, th, tw, n, n
    return t.permute(0, 2, 3, 1, 4, 5).reshape(n_ * geo.tiles, c, geo.n, geo.n)


def assemble_tiles(y: torch.Tensor, geo: TileGeometry, batch: int) -> torch.Tensor:
    """``[N*th*tw, K, m, m]`` output tiles -> ``[N, K, OH, OW]`` (cropping the overhang)."""
    k = y.shape[1]
    y = y.reshape(batch, geo.tiles_h, geo.tiles_w, k, geo.m, geo.m).permute(0, 3, 1, 4, 2, 5)
    y = y.reshape(batch, k, geo.tiles_h * geo.m, geo.tiles_w * geo.m)
    return y[:, :, : geo.out_h, : geo.out_w]
