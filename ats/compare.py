"""The `ats compare` table: fixed discretizations per solver and NFE, scored by distance to a
reference or by FID; and batched sampling for scoring."""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor

from .discretize import get_timesteps
from .intervals import Z95, FidEstimate
from .metrics import frechet_estimate
from .models.base import ModelSource
from .solvers import steps_for_nfe
from .solvers import sample


class Row(NamedTuple):
    solver: str
    nfe: int
    discretization: str
    value: float       # mean ||x - x_ref||_2 over samples, or FID; NaN where the solver diverged
    low: float         # 95 % interval: mean +- 1.96 standard errors, or the FID's bootstrap one
    high: float
    fid: FidEstimate | None = None   # the FID's bootstrap (pairs rows on the same seeds)


def reference_solution(source: ModelSource, x: Tensor, labels: Tensor | None = None, steps: int = 1000) -> Tensor:
    """UniPC-3 on 1000 logSNR steps: an error far below any few-step solver's."""
    ts = get_timesteps(source.noise_schedule, "logSNR", steps)
    with torch.no_grad():
        return sample(source.model_fn_for(labels), source.noise_schedule, x, ts, "uni_pc", order=3)


EVAL_BATCH = 256   # samples per solver call when scoring: batches of thousands run ~2x slower per sample on a CPU


def sample_batched(source: ModelSource, x: Tensor, labels: Tensor | None, timesteps: Tensor, solver: str,
                   batch: int = EVAL_BATCH, **options: Any) -> Tensor:
    """``ats.solvers.sample`` over ``x`` (and its labels) ``batch`` samples at a time, no gradient."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            lb = None if labels is None else labels[i:i + batch]
            outs.append(sample(source.model_fn_for(lb), source.noise_schedule, x[i:i + batch], timesteps, solver,
                               **options))
    return torch.cat(outs)


def evaluate_table(source: ModelSource, x: Tensor, labels: Tensor | None, score: Tensor | Any,
                   solvers: Iterable[str], nfes: Iterable[int], kinds: Iterable[str],
                   seeds: str = "") -> Iterator[Row]:
    """One row per (solver, NFE, discretization) with a valid step count. ``score`` is a
    reference solution (rows give the mean L2 distance to it) or a Frechet metric (FID of the
    samples as images, ``source.images``; its bootstrap on the seed set named ``seeds``)."""
    for solver in solvers:
        for n in nfes:
            steps = steps_for_nfe(solver, n)
            if steps is None:
                continue
            for kind in kinds:
                ts = get_timesteps(source.noise_schedule, kind, steps)
                out = sample_batched(source, x, labels, ts, solver)
                if not torch.isfinite(out).all():   # the solver diverged on this schedule
                    yield Row(solver, n, kind, math.nan, math.nan, math.nan)
                elif torch.is_tensor(score):
                    d = (out - score).flatten(1).norm(dim=1)
                    half = Z95 * d.std().item() / math.sqrt(len(d)) if len(d) > 1 else math.nan
                    yield Row(solver, n, kind, d.mean().item(), d.mean().item() - half, d.mean().item() + half)
                else:
                    est = frechet_estimate(score, source.images(out), seeds)
                    yield Row(solver, n, kind, est.fid, est.low, est.high, est)
