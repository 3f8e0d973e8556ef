"""A small Stable-Diffusion-shaped UNet (random weights) for latent-space convolution workloads.

It reproduces the convolution shapes that dominate an SD 1.x UNet's first two levels -- 3x3 convs at
320 and 640 channels, ``GroupNorm(32)`` + SiLU pre-activation ResBlocks with a timestep-embedding
bias, one stride-2 downsample conv, one nearest-upsample + 3x3 conv, and skip concatenations -- at a
size that runs in a fraction of a second on a ``[1, 4, 32, 32]`` latent.  The timestep is fixed
(a buffer), so ``forward`` takes the latent only, which keeps export single-input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiffusionUNet", "ResBlock", "diffusion_unet", "timestep_embedding"]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding as in SD (``cos`` half first), shape ``[len(timesteps), dim]``.

    Parameters
    ----------
    timesteps : torch.Tensor
        1-D tensor of (float or int) timesteps.
    dim : int
        Embedding width (even).
    max_period : float
        Longest sinusoid period.

    Returns
    -------
    torch.Tensor
        float32 embedding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-5)


class ResBlock(nn.Module):
    """SD ResBlock: GN-SiLU-conv3x3, + emb bias, GN-SiLU-conv3x3, 1x1-conv shortcut if widths differ."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip: nn.Module = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DiffusionUNet(nn.Module):
    """Two-level latent UNet: 320 channels at full, 640 at half resolution.

    ``conv_in`` (4->320) -> ``down0`` ResBlock 320 -> ``downsample`` (3x3 stride 2) -> ``down1``
    ResBlock 320->640 -> ``mid`` ResBlock 640 -> ``up1`` ResBlock on concat(mid, down1) 1280->640 ->
    ``upsample`` (nearest x2 + 3x3 conv 640) -> ``up0`` ResBlock on concat(up, down0) 960->320 ->
    GN-SiLU-``conv_out`` (320->4).

    Parameters
    ----------
    in_channels : int
        Latent channels.
    base : int
        Channels of the first level (the second has ``2 * base``).
    timestep : int
        The fixed diffusion timestep whose embedding biases every ResBlock.
    """

    def __init__(self, in_channels: int = 4, base: int = 320, timestep: int = 500) -> None:
        super().__init__()
        c0, c1, emb_dim = base, 2 * base, 4 * base
        self.register_buffer("t_freq", timestep_embedding(torch.tensor([timestep]), c0), persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.down0 = ResBlock(c0, c0, emb_dim)
        self.downsample = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.down1 = ResBlock(c0, c1, emb_dim)
        self.mid = ResBlock(c1, c1, emb_dim)
        self.up1 = ResBlock(c1 + c1, c1, emb_dim)
        self.upsample_conv = nn.Conv2d(c1, c1, 3, padding=1)
        self.up0 = ResBlock(c1 + c0, c0, emb_dim)
        self.norm_out = _norm(c0)
        self.conv_out = nn.Conv2d(c0, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(self.t_freq)
        h0 = self.down0(self.conv_in(x), emb)
        h1 = self.down1(self.downsample(h0), emb)
        h = self.mid(h1, emb)
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        h = self.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up0(torch.cat([h, h0], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def diffusion_unet(base: int = 320) -> DiffusionUNet:
    """Build the small diffusion UNet with random (PyTorch default) init.

    Parameters
    ----------
    base : int
        First-level width (320 as in SD 1.x; must be a multiple of 32 for GroupNorm).

    Returns
    -------
    DiffusionUNet
        Model for ``[N, 4, H, W]`` latents with even ``H``, ``W``.
    """
    return DiffusionUNet(base=base)
