"""Pictures people would rather look at than read: sample grids (PNG)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .atomic import write_atomic
from .metrics import to_uint8


def image_grid(images: Tensor, nrow: int | None = None, scale: int = 1, pad: int = 1) -> Tensor:
    """[B, C, H, W] in [-1, 1] -> one uint8 image [H', W', C] (C = 1 or 3), nearest upscaling."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    x = to_uint8(images).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = h * scale, w * scale
    grid = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    return grid.permute(1, 2, 0)


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write ``image_grid`` as a PNG (temporary file, then rename)."""
    from PIL import Image
    grid = image_grid(images, nrow, scale).numpy()
    return write_atomic(path, lambda tmp: Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).save(tmp))
