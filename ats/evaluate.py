"""Evaluate a fit on fresh evaluation seeds against the fixed discretizations."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .baselines import steps_for_nfe
from .discretize import KINDS, get_timesteps
from .methods.common import FitResult
from .methods.predictors import PredictorSampler
from .metrics import frechet_distance, l2_loss
from .models.sources import ModelSource
from .solvers import sample
from .teacher import TeacherConfig, generate_teacher, split_seeds


def result_samples(source: ModelSource, result: FitResult, x: Tensor, labels: Tensor | None) -> Tensor:
    """The fit's samples from x_T: its predictor, else its global schedule (per-sample
    schedules belong to their own seeds and are evaluated by the caller there)."""
    with torch.no_grad():
        if result.predictor is not None:
            space = result.info.get("space", "lambda")
            return PredictorSampler(result.predictor, source, result.solver, result.order, space)(x, labels)[0]
        return sample(source.model_fn_for(labels), source.noise_schedule, x, result.timesteps.to(x.dtype),
                      result.solver, order=result.order,
                      cond_timesteps=None if result.cond_timesteps is None else result.cond_timesteps.to(x.dtype))


def compare_on_eval(source: ModelSource, result: FitResult, n_eval: int, teacher: TeacherConfig,
                    cache: str | Path) -> list[tuple[str, float, float]]:
    """(name, mean L2 to the teacher, FID) for every fixed discretization and the fit."""
    data = generate_teacher(source, split_seeds("eval", n_eval), teacher, cache, dtype=source.dtype)
    metric = source.make_metric()
    steps = steps_for_nfe(result.solver, result.nfe)
    rows = []
    for kind in KINDS[:4]:
        with torch.no_grad():
            out = sample(source.model_fn_for(data.labels), source.noise_schedule, data.latents,
                         get_timesteps(source.noise_schedule, kind, steps, dtype=source.dtype), result.solver,
                         order=result.order)
        rows.append((kind, l2_loss(out, data.targets).mean().item(), frechet_distance(metric, out)))
    if result.per_sample is None:
        out = result_samples(source, result, data.latents, data.labels)
        rows.append((result.method, l2_loss(out, data.targets).mean().item(), frechet_distance(metric, out)))
    return rows


def evaluate_result(source: ModelSource, result: FitResult, n_eval: int, teacher: TeacherConfig,
                    cache: str | Path):
    """A rich table of ``compare_on_eval`` with the improvement over the best fixed one."""
    from rich.table import Table
    rows = compare_on_eval(source, result, n_eval, teacher, cache)
    best_fixed = min(fid for name, _, fid in rows if name in KINDS)
    table = Table(title=f"{source.name}, {result.solver} NFE {result.nfe}: {n_eval} evaluation samples")
    for col in ("schedule", "L2 to teacher", "FID", "vs best fixed"):
        table.add_column(col, justify="right" if col != "schedule" else "left")
    for name, l2, fid in rows:
        table.add_row(name, f"{l2:.4f}", f"{fid:.4f}", f"{100 * (fid - best_fixed) / best_fixed:+.1f} %")
    if result.per_sample is not None:
        table.caption = "per-sample schedules belong to their own seeds: see the fit's losses"
    return table
