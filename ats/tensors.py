"""Small tensor helpers and types shared by the solvers and the model wrappers."""
from __future__ import annotations

from typing import Callable

from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]   # model_fn(x, t) -> the noise prediction eps


def expand_dims(v: Tensor, dims: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with ``dims`` dimensions in all."""
    return v.reshape(v.shape + (1,) * (dims - v.ndim))
