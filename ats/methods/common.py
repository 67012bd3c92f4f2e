"""What every schedule-learning method shares: its result, saving it, and guarding a fit."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import write_atomic


@dataclass
class FitResult:
    """A learned discretization: a global schedule ``timesteps`` [N+1] (with optional
    ``cond_timesteps``, the times the network sees), or per-sample schedules [B, N+1]
    (``per_sample``, with the ``seeds`` they belong to), or a ``predictor`` module that maps
    x_T to a schedule. ``history`` holds the loss curves by step."""
    method: str
    solver: str
    order: int | None
    nfe: int
    timesteps: Tensor | None = None
    cond_timesteps: Tensor | None = None
    per_sample: Tensor | None = None
    seeds: Tensor | None = None
    predictor: torch.nn.Module | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The global schedule and the settings, for people and other tools."""
        out = {"method": self.method, "solver": self.solver, "order": self.order, "nfe": self.nfe,
               "info": self.info}
        if self.timesteps is not None:
            out["timesteps"] = self.timesteps.tolist()
        if self.cond_timesteps is not None:
            out["cond_timesteps"] = self.cond_timesteps.tolist()
        return out


def save_result(result: FitResult, path: str | Path) -> Path:
    """A torch file with every tensor of the result (predictor as its state dict and config)."""
    state = {k: v for k, v in asdict(result).items() if k != "predictor"}
    if result.predictor is not None:
        state["predictor"] = {"class": type(result.predictor).__name__,
                              "config": getattr(result.predictor, "config", {}),
                              "state_dict": result.predictor.state_dict()}
    return write_atomic(Path(path), lambda tmp: torch.save(state, tmp))


def load_result(path: str | Path) -> FitResult:
    """The inverse of ``save_result``: every tensor, and the predictor rebuilt from its class
    name, config and state dict (on the CPU, in eval mode)."""
    from .predictors import load_predictor
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    saved = state.pop("predictor", None)
    return FitResult(**state, predictor=None if saved is None else load_predictor(saved))


def save_schedule_json(result: FitResult, path: str | Path) -> Path:
    return write_atomic(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(result.to_json(), indent=2) + "\n"))


class FitDiverged(ValueError):
    """A loss became NaN or inf; the best state so far is kept by the caller."""


def check_finite(value: Tensor | float, step: int, what: str = "loss") -> float:
    v = float(value.detach()) if torch.is_tensor(value) else float(value)
    if not math.isfinite(v):
        raise FitDiverged(f"{what} is {v} at step {step}; lower the learning rate (the best schedule "
                          "so far is kept)")
    return v


def assert_monotone(timesteps: Tensor) -> None:
    if not (timesteps[..., 1:] < timesteps[..., :-1]).all():
        raise ValueError("internal error: a learned schedule is not strictly decreasing")
