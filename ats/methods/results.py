"""Using a FitResult: saving and loading it, and sampling with it, whatever it holds (a global
schedule, per-sample schedules, or a predictor)."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import write_atomic
from ..compare import EVAL_BATCH, sample_batched
from ..models.base import ModelSource
from .common import FitResult
from .predictors import PredictorSampler, load_predictor


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
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    saved = state.pop("predictor", None)
    return FitResult.from_dict(state, predictor=None if saved is None else load_predictor(saved))


def save_schedule_json(result: FitResult, path: str | Path) -> Path:
    return write_atomic(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(result.to_json(), indent=2) + "\n"))


def sample_result(source: ModelSource, result: FitResult, x: Tensor, labels: Tensor | None = None,
                  batch: int = EVAL_BATCH) -> tuple[Tensor, Tensor | None]:
    """Samples from x_T [B, ...] with the fit, ``batch`` at a time without gradient, and the
    per-sample schedules [B, N+1] used (None for a global schedule). A predictor chooses each
    sample's schedule; per-sample schedules (the oracle's) belong to their own samples, so ``x``
    must be the latents of the result's first B seeds."""
    if result.predictor is not None:
        sampler = PredictorSampler(result.predictor, source, result.solver, result.order,
                                   result.info.get("space", "lambda"))
        outs, schedules = [], []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                out, ts = sampler(x[i:i + batch], None if labels is None else labels[i:i + batch])
                outs.append(out)
                schedules.append(ts)
        return torch.cat(outs), torch.cat(schedules)
    if result.per_sample is not None:
        if len(result.per_sample) < len(x):
            raise ValueError(f"the result holds {len(result.per_sample)} per-sample schedules, not {len(x)}: they "
                             "belong to the samples they were fitted on")
        schedules = result.per_sample[:len(x)].to(x.dtype)
        outs = [sample_batched(source, x[i:i + batch], None if labels is None else labels[i:i + batch],
                               schedules[i:i + batch], result.solver, batch, order=result.order)
                for i in range(0, len(x), batch)]
        return torch.cat(outs), schedules
    cond = None if result.cond_timesteps is None else result.cond_timesteps.to(x.dtype)
    return sample_batched(source, x, labels, result.timesteps.to(x.dtype), result.solver, batch,
                          order=result.order, cond_timesteps=cond), None


def with_schedules(result: FitResult, schedules: Tensor) -> FitResult:
    """The result with per-sample ``schedules`` in place of what it holds (for sampling them)."""
    return replace(result, per_sample=schedules, predictor=None, timesteps=None, cond_timesteps=None)
