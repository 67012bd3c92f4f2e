"""A small class-conditional U-Net for 8x8 images (the embedded digits model).

Noise prediction eps(x, k, y) with k the DDPM training step (0..999) and y a class label
in 0..9, or ``num_classes`` for "no label" (classifier-free guidance). Two resolutions
(8x8 -> 4x4 -> 2x2), residual blocks with GroupNorm and an added time/class embedding.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def timestep_embedding(k: Tensor, dim: int, max_period: float = 10000.) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps k, [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=k.device) / half)
    args = k.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    """eps-prediction U-Net, ``channels`` at 8x8, 4x4 and 2x2."""

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 64), num_classes: int = 10,
                 in_channels: int = 1) -> None:
        super().__init__()
        c1, c2, c3 = channels
        emb = 4 * c1
        self.num_classes = num_classes
        self.config = {"channels": list(channels), "num_classes": num_classes, "in_channels": in_channels}
        self.time_mlp = nn.Sequential(nn.Linear(c1, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(num_classes + 1, emb)
        self.conv_in = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb)
        self.down2 = ResBlock(c1, c2, emb)
        self.mid1 = ResBlock(c2, c3, emb)
        self.mid2 = ResBlock(c3, c3, emb)
        self.up2 = ResBlock(c3 + c2, c2, emb)
        self.up1 = ResBlock(c2 + c1, c1, emb)
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, in_channels, 3, padding=1)

    def forward(self, x: Tensor, k: Tensor, labels: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        k = torch.as_tensor(k, device=x.device).reshape(-1).expand(b)
        if labels is None:
            labels = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
        emb = self.time_mlp(timestep_embedding(k, self.conv_in.out_channels)) + self.label_emb(labels.long())
        dtype = x.dtype
        x = x.to(self.conv_in.weight.dtype)
        emb = emb.to(x.dtype)
        h1 = self.down1(self.conv_in(x), emb)                      # 8x8
        h2 = self.down2(F.avg_pool2d(h1, 2), emb)                  # 4x4
        h = self.mid2(self.mid1(F.avg_pool2d(h2, 2), emb), emb)    # 2x2
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.), h2], 1), emb)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.), h1], 1), emb)
        return self.conv_out(F.silu(self.norm_out(h))).to(dtype)
