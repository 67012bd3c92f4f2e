"""Fixed discretizations against an accurate reference solution, per solver and NFE."""
from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import torch
from torch import Tensor

from .discretize import get_timesteps
from .models.sources import ModelSource
from .solvers import nfe as count_nfe
from .solvers import sample


class ErrorRow(NamedTuple):
    solver: str
    nfe: int
    discretization: str
    l2: float          # mean over samples of ||x - x_ref||_2


def reference_solution(source: ModelSource, x: Tensor, steps: int = 1000) -> Tensor:
    """UniPC-3 on 1000 logSNR steps: an error far below any few-step solver's."""
    ts = get_timesteps(source.noise_schedule, "logSNR", steps)
    return sample(source.model_fn, source.noise_schedule, x, ts, "uni_pc", order=3)


def steps_for_nfe(solver: str, nfe: int) -> int | None:
    """Number of steps with exactly ``nfe`` network calls, or None (Heun needs odd NFE)."""
    steps = (nfe + 1) // 2 if solver == "heun" else nfe
    return steps if steps >= 1 and count_nfe(solver, steps) == nfe else None


def error_table(source: ModelSource, x: Tensor, reference: Tensor, solvers: Iterable[str],
                nfes: Iterable[int], kinds: Iterable[str]) -> Iterator[ErrorRow]:
    """One row per (solver, NFE, discretization) with a valid step count."""
    for solver in solvers:
        for n in nfes:
            steps = steps_for_nfe(solver, n)
            if steps is None:
                continue
            for kind in kinds:
                ts = get_timesteps(source.noise_schedule, kind, steps)
                out = sample(source.model_fn, source.noise_schedule, x, ts, solver)
                yield ErrorRow(solver, n, kind, (out - reference).flatten(1).norm(dim=1).mean().item())
