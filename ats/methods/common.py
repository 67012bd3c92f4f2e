"""What every schedule-learning method shares: its result and guarding a fit (saving and
sampling a result: ``ats.methods.results``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from dataclasses import fields as fields_of
from typing import Any

import torch
from torch import Tensor

from ..solvers.sampling import nfe as count_nfe
from ..solvers.sampling import solver_spec, steps_for_nfe

STEP_COUNTED = ("ld3", "oracle", "oneshot", "delta")   # methods whose files before ``steps`` stored steps as nfe


@dataclass
class FitResult:
    """A learned discretization: a global schedule ``timesteps`` [N+1] (with optional
    ``cond_timesteps``, the times the network sees), or per-sample schedules [B, N+1]
    (``per_sample``, with the ``seeds`` they belong to), or a ``predictor`` module that maps
    x_T to a schedule. ``history`` holds the loss curves by step. It stores the solver's
    ``steps`` and resolved ``order``; the NFE is derived from them (Heun: 2N - 1 calls)."""
    method: str
    solver: str
    order: int | None
    steps: int
    timesteps: Tensor | None = None
    cond_timesteps: Tensor | None = None
    per_sample: Tensor | None = None
    seeds: Tensor | None = None
    predictor: torch.nn.Module | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.order = solver_spec(self.solver, self.order)[1]

    @property
    def tied_to_seeds(self) -> bool:
        """Per-sample schedules without a predictor: they exist only for the seeds they were fitted on."""
        return self.per_sample is not None and self.predictor is None

    @property
    def nfe(self) -> int:
        """Network calls per sample."""
        return count_nfe(self.solver, self.steps)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **fields: Any) -> "FitResult":
        """A result from ``to_json``/``save_result`` data, also those written before results
        stored ``steps``: their ``nfe`` held the steps for ld3, the oracle and the predictors and
        the network calls for the others (the two differ only for Heun)."""
        data = dict(data)
        if "steps" not in data:
            legacy = int(data["nfe"])
            steps = legacy if data["method"] in STEP_COUNTED else steps_for_nfe(data["solver"], legacy)
            if steps is None:
                raise ValueError(f"{data['solver']} cannot spend exactly {legacy} network calls; the file is corrupt")
            data["steps"] = steps
        names = {f.name for f in fields_of(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in names}, **fields})

    def to_json(self) -> dict:
        """The global schedule and the settings, for people and other tools."""
        out = {"method": self.method, "solver": self.solver, "order": self.order, "steps": self.steps,
               "nfe": self.nfe, "info": self.info}
        if self.timesteps is not None:
            out["timesteps"] = self.timesteps.tolist()
        if self.cond_timesteps is not None:
            out["cond_timesteps"] = self.cond_timesteps.tolist()
        return out


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
