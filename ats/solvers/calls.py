"""How a solver calls the network: activation checkpointing and mixed precision.

Backpropagating through N solver steps keeps every network call's activations until the
backward pass: N times a big network's activations. With ``checkpoint`` each call keeps only
its inputs and output, and its activations are recomputed, one call at a time, during the
backward pass (``torch.utils.checkpoint``, non-reentrant): about one extra forward pass of
compute for far less memory. The solver's own arithmetic (a few x-sized tensors per step,
the multistep history included) stays stored as usual, so gradients flow through it
unchanged. Without gradients (validation, sampling) checkpointing is skipped: there is
nothing to keep.

``precision`` bf16 or fp16 runs the network under ``torch.autocast`` on the device of x; the
solver's arithmetic stays in the sampling dtype and the network's output is cast back to it.
fp16 needs CUDA; bf16 runs on CUDA (where the GPU supports it) and on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as checkpoint_call

from ..tensors import ModelFn

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class NetworkCalls:
    """How every network call of a solver runs: ``checkpoint`` (recompute its activations in
    the backward pass instead of keeping them) and ``precision`` (fp32: as the model is; bf16,
    fp16: under autocast)."""
    checkpoint: bool = False
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, bool):
            raise ValueError(f"checkpoint must be true or false, got {self.checkpoint!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")

    @property
    def kwargs(self) -> dict[str, Any]:
        """``checkpoint`` and ``precision`` as keywords of ``sample`` and ``bind_solver``."""
        return {"checkpoint": self.checkpoint, "precision": self.precision}

    def check(self, device: torch.device | str) -> None:
        """A one-line ValueError where ``precision`` cannot run on ``device``."""
        kind = torch.device(device).type
        if self.precision == "fp32":
            return
        if kind == "cpu" and self.precision == "fp16":
            raise ValueError("precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
        if kind == "cuda" and self.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision bf16 is not supported by {torch.cuda.get_device_name()}; use fp16 or fp32")
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"precision {self.precision} runs on CUDA or the CPU, not {kind}; use fp32")

    def wrap(self, model_fn: ModelFn) -> ModelFn:
        """``model_fn`` with these settings applied (itself when there are none)."""
        if not self.checkpoint and self.precision == "fp32":
            return model_fn
        dtype = _DTYPES.get(self.precision)

        def call(x: Tensor, t: Tensor) -> Tensor:
            if dtype is None:
                return model_fn(x, t)
            self.check(x.device)
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                out = model_fn(x, t)
            return out.to(x.dtype)

        if not self.checkpoint:
            return call

        def checkpointed(x: Tensor, t: Tensor) -> Tensor:
            if not torch.is_grad_enabled():
                return call(x, t)
            return checkpoint_call(call, x, t, use_reentrant=False)
        return checkpointed
