"""GITS: the N-step subsequence of a fine grid that a first-order step follows best.

Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling" (GITS,
geometry-inspired time scheduling), ICML 2024; reference code zju-pi/diff-sampler, gits-main.

1. A fine grid t_0 > ... > t_M (default M = 60, EDM/poly rho = 7) and teacher trajectories
   x*_0, ..., x*_M on it from a batch of x_T. GITS runs its teacher (iPNDM) on the fine
   grid itself; here every fine interval is split into ``teacher_substeps`` steps uniform
   in lambda and solved with UniPC-3, a far more accurate teacher.
2. Cost C[i, j], i < j: one Euler step (DDIM, eta = 0, which equals Euler in EDM's
   variables) from x*_i at t_i to t_j with the model output at (x*_i, t_i), against the
   teacher: C[i, j] = mean_b ||x^_j - x*_j||_2 (``metric="l2"``; also "l1" and GITS's
   default "dev", the change of the distance from the straight line x_T -> x*_M:
   mean_b dev(x^_j) - mean_b dev(x*_j)). The model is called once per fine point.
3. Dynamic programming: V_1(i) = C[i, M], V_k(i) = min_{i < j < M} C[i, j] + coeff V_{k-1}(j);
   the path from 0 with exactly N steps that attains V_N(0) is the schedule. With coeff = 1
   it minimises the total cost; GITS's released setting is coeff = 1.15 with metric "dev".

The cost uses a first-order step whatever the solver that later runs the schedule, as in
GITS; its adaptive first step (AFS) is not reproduced.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..discretize import get_timesteps
from ..models.base import ModelSource
from ..noise import NoiseSchedule
from ..solvers import ModelFn, coeffs, get_step_fn, sample, solver_spec
from ..options import declare
from ..teacher import split_seeds
from .base import FitContext, Method
from .common import FitResult, assert_monotone

METRICS = ("l2", "l1", "dev")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def refine_grid(noise_schedule: NoiseSchedule, grid: Tensor, substeps: int) -> Tensor:
    """``grid`` [M+1] with every interval split into ``substeps`` steps uniform in lambda;
    grid[i] is exactly entry i * substeps of the result."""
    lam = noise_schedule.marginal_lambda(grid)
    u = torch.arange(substeps, dtype=grid.dtype, device=grid.device) / substeps
    fine = noise_schedule.inverse_lambda(lam[:-1, None] + (lam[1:] - lam[:-1])[:, None] * u)
    fine[:, 0] = grid[:-1]
    return torch.cat([fine.reshape(-1), grid[-1:]])


def teacher_trajectory(model_fn: ModelFn, noise_schedule: NoiseSchedule, x_T: Tensor, grid: Tensor,
                       substeps: int = 4) -> Tensor:
    """States [M+1, B, ...] at every time of ``grid``: UniPC-3 (bh1) over the grid refined by
    ``substeps`` steps per interval (uniform in lambda), from x_T at grid[0]."""
    fine = refine_grid(noise_schedule, grid, _positive_int(substeps, "teacher_substeps"))
    with torch.no_grad():
        _, states = sample(model_fn, noise_schedule, x_T, fine, "uni_pc", order=3, return_intermediates=True)
    return states[::substeps]


def _deviation(x: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Distance of each x [..., B, D] from the line through start and end [B, D]."""
    axis = (end - start) / (end - start).norm(dim=-1, keepdim=True)
    v = end - x
    return (v - (v * axis).sum(-1, keepdim=True) * axis).norm(dim=-1)


def _cost_sums(model_fn: ModelFn, noise_schedule: NoiseSchedule, traj: Tensor, grid: Tensor,
               metric: str) -> Tensor:
    """Sums over the batch of C[i, j]'s per-sample terms, [M+1, M+1], zero where i >= j."""
    step = get_step_fn("ddim")
    m, b = traj.shape[0], traj.shape[1]
    flat = traj.flatten(2)                                            # [M+1, B, D]
    if metric == "dev":
        dev_teacher = _deviation(flat, flat[0], flat[-1]).sum(1)      # [M+1]
    sums = torch.zeros(m, m, dtype=torch.float64, device=traj.device)
    with torch.no_grad():
        for i in range(m - 1):
            later = grid[i + 1:]
            eps = model_fn(traj[i], grid[i:i + 1])
            x = traj[i].repeat((m - 1 - i,) + (1,) * (traj.ndim - 2))  # [(M-i) B, ...], j-major
            c = coeffs(noise_schedule, grid[i:i + 1], x.ndim)
            cn = coeffs(noise_schedule, later.repeat_interleave(b), x.ndim)
            x_hat, _ = step(lambda *_: eps.repeat((m - 1 - i,) + (1,) * (eps.ndim - 1)), x, c, cn)
            x_hat = x_hat.reshape(m - 1 - i, b, -1)
            if metric == "dev":
                sums[i, i + 1:] = (_deviation(x_hat, flat[0], flat[-1]).sum(1) - dev_teacher[i + 1:]).double()
            else:
                p = 2 if metric == "l2" else 1
                sums[i, i + 1:] = (x_hat - flat[i + 1:]).norm(p=p, dim=-1).sum(1).double()
    return sums


def gits_cost_matrix(model_fn: ModelFn, noise_schedule: NoiseSchedule, x_T: Tensor, grid: Tensor | None = None,
                     fine_steps: int = 60, teacher_substeps: int = 4, metric: str = "l2",
                     batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(cost [M+1, M+1] float64 with +inf where i >= j, grid [M+1]). ``grid`` defaults to
    ``get_timesteps(ns, "edm", fine_steps)``; the batch x_T is processed ``batch_size``
    samples at a time and the cost averaged over all of them (module docstring)."""
    if metric not in METRICS:
        raise ValueError(f"unknown GITS metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not torch.is_tensor(x_T) or not x_T.is_floating_point() or x_T.ndim < 2 or len(x_T) < 1:
        raise ValueError("x_T must be a floating-point tensor of shape [B, ...] with B >= 1")
    batch_size = _positive_int(batch_size, "batch_size")
    if grid is None:
        grid = get_timesteps(noise_schedule, "edm", _positive_int(fine_steps, "fine_steps"))
    grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
    if grid.ndim != 1 or len(grid) < 2 or not (grid[1:] < grid[:-1]).all():
        raise ValueError("the fine grid must be a strictly decreasing 1-D tensor of 2+ times")
    work_grid = grid.to(device=x_T.device, dtype=x_T.dtype)
    sums = torch.zeros(len(grid), len(grid), dtype=torch.float64)
    for chunk in x_T.split(batch_size):
        traj = teacher_trajectory(model_fn, noise_schedule, chunk, work_grid, teacher_substeps)
        sums += _cost_sums(model_fn, noise_schedule, traj, work_grid, metric).cpu()
    cost = sums / len(x_T)
    return cost.masked_fill(~torch.ones_like(cost, dtype=torch.bool).triu(1), torch.inf), grid


def best_path(cost: Tensor | np.ndarray, steps: int, coeff: float = 1.) -> list[int]:
    """Indices 0 = p_0 < p_1 < ... < p_N = M of the path with exactly N = ``steps`` steps that
    minimises sum_k coeff^k cost[p_k, p_{k+1}] (GITS's recursion; coeff = 1: total cost).
    ``cost`` is [M+1, M+1]; only entries i < j are read. Ties go to the smaller index."""
    c = cost.detach().cpu().double().numpy().copy() if torch.is_tensor(cost) else np.array(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise ValueError(f"cost must be a square matrix [M+1, M+1] with M >= 1, got shape {c.shape}")
    m = c.shape[0] - 1
    steps = _positive_int(steps, "steps")
    if steps > m:
        raise ValueError(f"steps ({steps}) cannot exceed the fine grid's {m} intervals")
    if np.isnan(c[np.triu_indices(m + 1, 1)]).any():
        raise ValueError("cost contains NaN above the diagonal")
    c[np.tril_indices(m + 1)] = np.inf
    value = np.full((steps + 1, m + 1), np.inf)   # value[k, i]: from i to M in exactly k steps
    value[0, m] = 0.
    choice = np.zeros((steps + 1, m + 1), dtype=int)
    for k in range(1, steps + 1):
        total = c + coeff * value[k - 1][None, :]  # total[i, j]: first step i -> j
        choice[k] = total.argmin(1)
        value[k] = total[np.arange(m + 1), choice[k]]
    path = [0]
    for k in range(steps, 0, -1):
        path.append(int(choice[k, path[-1]]))
    if not np.isfinite(value[steps, 0]):
        raise ValueError("no finite path: the cost matrix has inf above the diagonal")
    return path


def gits_timesteps(model_fn: ModelFn, noise_schedule: NoiseSchedule, x_T: Tensor, steps: int,
                   solver: str = "dpm_solver++", fine_steps: int = 60, teacher_substeps: int = 4,
                   metric: str = "l2", coeff: float = 1., batch_size: int = 256, grid: Tensor | None = None,
                   return_info: bool = False) -> Tensor | tuple[Tensor, dict]:
    """GITS schedule: N+1 decreasing times of the fine grid (exact ends), float64, chosen by
    dynamic programming on the first-order cost matrix of teacher trajectories from x_T.
    ``solver`` is only checked: the cost is the same for every solver (module docstring).
    Deterministic given x_T. ``return_info`` adds the cost matrix, grid and path."""
    solver_spec(solver)
    steps = _positive_int(steps, "steps")
    if grid is None and steps > _positive_int(fine_steps, "fine_steps"):
        raise ValueError(f"steps ({steps}) cannot exceed fine_steps ({fine_steps})")
    cost, grid = gits_cost_matrix(model_fn, noise_schedule, x_T, grid, fine_steps, teacher_substeps,
                                  metric, batch_size)
    if not torch.isfinite(cost[torch.ones_like(cost, dtype=torch.bool).triu(1)]).all():
        raise ValueError("the GITS cost matrix has NaN or inf above the diagonal; the model or teacher diverged")
    path = best_path(cost, steps, coeff)
    t = grid[path]
    assert_monotone(t)
    if return_info:
        return t, {"cost": cost, "grid": grid, "path": path}
    return t


def fit_gits(source: ModelSource, solver: str, steps: int, seeds, order: int | None = None,
             device: torch.device | str | None = None, **options) -> FitResult:
    """``gits_timesteps`` on ``source`` from the latents of ``seeds`` (use training seeds, never
    evaluation ones) on ``device``, with ``steps`` steps of ``solver``, as a FitResult."""
    began = time.perf_counter()
    x_T = source.latents(seeds, dtype=source.dtype, device=device)
    t, info = gits_timesteps(source.model_fn, source.noise_schedule, x_T, steps, solver, return_info=True, **options)
    info = {"path": info["path"], "samples": len(x_T), "seconds": time.perf_counter() - began}
    return FitResult("gits", solver, order, steps, timesteps=t, info=info)


class GITS(Method):
    """A baseline: the dynamic-programming schedule on teacher trajectories of training latents."""
    name = "gits"
    searchable = False
    options = declare(gits_timesteps, ("model_fn", "noise_schedule", "x_T", "steps", "solver", "grid", "return_info"),
                      choices={"metric": METRICS}, low={"fine_steps": 1, "teacher_substeps": 1, "batch_size": 1,
                                                        "coeff": 0})

    def unsupported(self, solvers: Sequence[str], steps: Sequence[int], has_real_data: bool) -> str | None:
        """Also: more steps than the default fine grid has intervals (GITS picks a subsequence of it)."""
        fine = self.options["fine_steps"].default
        if max(steps) > fine:
            return (f"gits picks its steps from a fine grid of {fine} intervals, so it takes at most {fine} steps, "
                    f"not {max(steps)}; lower the NFE")
        return super().unsupported(solvers, steps, has_real_data)

    def fit(self, ctx: FitContext, **options: Any) -> FitResult:
        return fit_gits(ctx.source, ctx.solver, ctx.steps, split_seeds("train", ctx.n_train), ctx.order,
                        device=ctx.device, **options)
