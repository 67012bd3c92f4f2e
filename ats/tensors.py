"""Small tensor helpers shared by the solvers and the model wrappers."""
from __future__ import annotations

from torch import Tensor


def expand_dims(v: Tensor, dims: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with ``dims`` dimensions in all."""
    return v.reshape(v.shape + (1,) * (dims - v.ndim))
