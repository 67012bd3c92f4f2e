"""DMN: time steps that minimise a bound on a multistep solver's global error.

Xue et al., "Accelerating Diffusion Sampling with Optimized Time Steps", CVPR 2024
(reference code: scxue/DM-NonUniform, ``step_optim.py``). Needs only the noise schedule.

In data prediction the probability-flow ODE is solved exactly by

    x_{t_N} / sigma_{t_N} = x_{t_0} / sigma_{t_0} + int_{lambda_0}^{lambda_N} e^lam x_theta(x_lam, lam) dlam.

A multistep exponential integrator (DPM-Solver++, UniPC's predictor) replaces x_theta on
step s, [lambda_s, lambda_{s+1}] with h_s = lambda_{s+1} - lambda_s, by the Lagrange
polynomial through its last k_s outputs (k_s = the order used at step s, warm-up and
lower_order_final included), so the step adds sum_j J_{s,j} x_theta(lambda_{s-j}) with

    J_{s,j} = e^{lambda_s} int_0^{h_s} e^u l_{s,j}(lambda_s + u) du = e^{lambda_s} sum_m a_{s,j,m} H_m(h_s),

l_{s,j}(lambda_s + u) = sum_m a_{s,j,m} u^m the Lagrange basis and H_m(h) = int_0^h e^u u^m du
(H_0 = e^h - 1, H_m = e^h h^m - m H_{m-1}). The bases sum to one, so the exact integral of
a constant x_0 is reproduced and the discretization's error is sum_{s,j} J_{s,j} e_{s-j}
minus a term that does not depend on the steps, with e_p = x_theta(lambda_p) - x_0. The
paper models |e_p| by err(lambda_p) = sigma_p^2 / alpha_p (VP alpha, sigma of lambda; the
reference notes that sigma / alpha can suit pixel-space models better: ``err_power=1``)
and minimises the triangle-inequality bound

    E(lambda) = sum_{s in S} ||(J_{s,j} err_{s-j})_j||_2 + sum_p |sum_{s not in S} J_{s,p} err_p|,

where S holds the first-order steps and the steps s < ``trunc``: their terms are combined
per step (in L2, as if their errors were orthogonal) because accumulating them makes the
problem unstable at few steps; the reference uses trunc = 3 for NFE <= 7 and 0 above.
E is minimised over the interior lambdas with scipy's trust-constr under
lambda_{i+1} - lambda_i >= ``min_gap``, starting from the logSNR-uniform grid (gradient by
central differences, as the reference leaves it to scipy's finite differences).

The solver enters only through its per-step orders, so one objective serves DPM-Solver++
and UniPC (the paper uses the same objective for both; UniPC's corrector is not modelled),
and DDIM is the first-order case. Schedules other than VP are handled through lambda:
the objective is a function of the lambdas alone.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from scipy.optimize import LinearConstraint, minimize
from torch import Tensor

from ..discretize import get_timesteps, time_ends
from ..noise import NoiseSchedule
from ..solvers import solver_spec, step_orders
from ..options import declare
from .base import FitContext, Method
from .common import FitResult, assert_monotone

SOLVERS = ("dpm_solver++", "uni_pc", "ddim")


def default_trunc(steps: int) -> int:
    """The reference's setting: steps 0-2 combined per step for NFE <= 7, none above."""
    return 3 if steps <= 7 else 0


def data_error(lam: np.ndarray, err_power: float = 2.) -> np.ndarray:
    """Modelled size of the data prediction's error at lambda: sigma^p / alpha with VP
    alpha^2 = 1 / (1 + e^{-2 lambda}), sigma^2 = 1 / (1 + e^{2 lambda})."""
    log_alpha = -0.5 * np.logaddexp(0., -2. * lam)
    log_sigma = -0.5 * np.logaddexp(0., 2. * lam)
    return np.exp(err_power * log_sigma - log_alpha)


def _h_integrals(h: np.ndarray, k: int) -> np.ndarray:
    """H_m(h) = int_0^h e^u u^m du for m < k, stacked on a last axis."""
    out = [np.expm1(h)]
    for m in range(1, k):
        out.append(np.exp(h) * h ** m - m * out[-1])
    return np.stack(out, -1)


def _step_weights(lam: np.ndarray, steps_k: np.ndarray, k: int) -> np.ndarray:
    """J_{s,j} [M, len(steps_k), k] of the order-k steps ``steps_k`` of lambda grids [M, N+1]."""
    lam_s = lam[:, steps_k]
    h = lam[:, steps_k + 1] - lam_s
    hm = _h_integrals(h, k)                                           # [M, S, k]
    d = [lam[:, steps_k - j] - lam_s for j in range(k)]               # node offsets, d_0 = 0
    weights = []
    for j in range(k):
        others = [d[m] for m in range(k) if m != j]
        # coefficients of prod_{m != j} (u - d_m) in increasing powers of u (k <= 3)
        if k == 1:
            coefs = [np.ones_like(h)]
        elif k == 2:
            coefs = [-others[0], np.ones_like(h)]
        else:
            coefs = [others[0] * others[1], -(others[0] + others[1]), np.ones_like(h)]
        denom = np.prod([d[j] - o for o in others], axis=0) if others else 1.
        weights.append(sum(c * hm[..., m] for m, c in enumerate(coefs)) / denom)
    return np.exp(lam_s)[..., None] * np.stack(weights, -1)


def dmn_bound(lambdas: np.ndarray, orders: Sequence[int], trunc: int = 0, err_power: float = 2.) -> np.ndarray:
    """The DMN objective E (module docstring) of increasing lambda grids [..., N+1], where
    step s uses ``orders[s]`` points; returns one value per grid ([...])."""
    lam = np.asarray(lambdas, dtype=np.float64)
    batch = lam.shape[:-1]
    lam = lam.reshape(-1, lam.shape[-1])
    orders = np.asarray(orders)
    n = lam.shape[-1] - 1
    if len(orders) != n or (orders < 1).any() or (orders > 3).any():
        raise ValueError(f"need one order in 1..3 per step ({n} steps), got {list(orders)}")
    if (orders > np.arange(1, n + 1)).any():
        raise ValueError(f"step s can use at most s + 1 points, got orders {list(orders)}")
    err = data_error(lam, err_power)
    separate = np.zeros(lam.shape[0])
    accumulated = np.zeros_like(lam)
    for k in (1, 2, 3):
        steps_k = np.flatnonzero(orders == k)
        if not len(steps_k):
            continue
        points = steps_k[:, None] - np.arange(k)                      # [S, k]
        terms = _step_weights(lam, steps_k, k) * err[:, points]       # [M, S, k]
        alone = (steps_k < trunc) | (k == 1)
        separate += np.sqrt((terms[:, alone] ** 2).sum(-1)).sum(-1)
        for j in range(k):
            np.add.at(accumulated, (slice(None), points[~alone, j]), terms[:, ~alone, j])
    return (separate + np.abs(accumulated).sum(-1)).reshape(batch)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def dmn_lambdas(lam_start: float, lam_end: float, orders: Sequence[int], trunc: int = 0,
                err_power: float = 2., min_gap: float | None = None,
                maxiter: int = 200) -> tuple[np.ndarray, dict]:
    """Increasing lambdas [N+1] from ``lam_start`` to ``lam_end`` minimising ``dmn_bound``
    (trust-constr from the uniform grid; central differences for the gradient, evaluated
    as one batch). Returns the grid and info (bound at start and end, iterations).
    Falls back to the start grid if the optimiser does not lower the bound."""
    n = len(orders)
    init = np.linspace(lam_start, lam_end, n + 1)
    start_bound = float(dmn_bound(init, orders, trunc, err_power))
    info = {"bound_start": start_bound, "bound": start_bound, "iterations": 0}
    if n == 1:
        return init, info
    gap = (lam_end - lam_start) / n * 1e-3 if min_gap is None else float(min_gap)
    if not 0 < gap * n < lam_end - lam_start:
        raise ValueError(f"min_gap must be in (0, {(lam_end - lam_start) / n:g}), got {gap!r}")

    def full(x: np.ndarray) -> np.ndarray:
        ends = np.broadcast_to(np.array([lam_start, lam_end]), x.shape[:-1] + (2,))
        return np.concatenate([ends[..., :1], x, ends[..., 1:]], -1)

    eps = 1e-6 * max(1., abs(lam_start), abs(lam_end))
    shifts = np.concatenate([np.eye(n - 1), -np.eye(n - 1)]) * eps

    def fun_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        values = dmn_bound(full(np.concatenate([x[None], x + shifts])), orders, trunc, err_power)
        return float(values[0]), (values[1:n] - values[n:]) / (2 * eps)

    # rows: lambda_1 - lambda_0, lambda_{i+1} - lambda_i, lambda_N - lambda_{N-1} >= gap
    a = np.eye(n, n - 1) - np.eye(n, n - 1, -1)
    lb = np.full(n, gap)
    lb[0] += lam_start
    lb[-1] -= lam_end
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trust-constr's "delta_grad == 0" notes on flat steps
        res = minimize(fun_and_grad, init[1:-1], jac=True, method="trust-constr",
                       constraints=[LinearConstraint(a, lb, np.inf)], options={"maxiter": maxiter})
    lam = full(np.asarray(res.x, dtype=np.float64))
    ok = np.isfinite(lam).all() and (np.diff(lam) >= 0.5 * gap).all()
    bound = float(dmn_bound(lam, orders, trunc, err_power)) if ok else math.inf
    info["iterations"] = int(res.nit)
    if bound < start_bound:
        info["bound"] = bound
        return lam, info
    info["fallback"] = "optimiser did not lower the bound; kept the logSNR grid"
    return init, info


def dmn_timesteps(noise_schedule: NoiseSchedule, steps: int, solver: str = "dpm_solver++",
                  order: int | None = None, t_start: float | None = None, t_end: float | None = None,
                  lower_order_final: bool = True, trunc: int | None = None, err_power: float = 2.,
                  min_gap: float | None = None, maxiter: int = 200,
                  return_info: bool = False) -> Tensor | tuple[Tensor, dict]:
    """DMN schedule: N+1 decreasing float64 times from ``t_start`` (default T) to ``t_end``
    (default eps), exact ends, whose lambdas minimise the bound of the module docstring for
    ``solver`` ('dpm_solver++', 'uni_pc' or 'ddim') at ``order`` with the per-step orders
    that ``ats.solvers.sample`` uses (warm-up, ``lower_order_final``). ``trunc`` defaults
    to the reference's choice (3 for N <= 7, else 0); ``maxiter`` caps trust-constr's
    iterations (the non-smooth bound rarely meets its tolerances; 200 keep N <= 20 well
    under a second and matched 500 on the gmm benchmark). Deterministic; no model needed."""
    steps = _check_steps(steps)
    if solver not in SOLVERS:
        raise ValueError(f"dmn supports solvers {', '.join(SOLVERS)}, got {solver!r}")
    solver_spec(solver, order)
    orders = step_orders(solver, steps, order, lower_order_final)
    trunc = default_trunc(steps) if trunc is None else int(trunc)
    if err_power <= 0:
        raise ValueError(f"err_power must be positive, got {err_power!r}")
    ends = time_ends(noise_schedule, t_start, t_end)
    lam_start, lam_end = noise_schedule.marginal_lambda(ends).tolist()
    lam, info = dmn_lambdas(lam_start, lam_end, orders, trunc, err_power, min_gap, maxiter)
    if "fallback" in info:
        t = get_timesteps(noise_schedule, "logSNR", steps, *ends.tolist())
    else:
        t = noise_schedule.inverse_lambda(torch.as_tensor(lam, dtype=torch.float64))
        t[0], t[-1] = ends
    assert_monotone(t)
    info.update(orders=orders, trunc=trunc)
    return (t, info) if return_info else t


def fit_dmn(noise_schedule: NoiseSchedule, solver: str, steps: int, order: int | None = None,
            **options) -> FitResult:
    """``dmn_timesteps`` with ``steps`` steps as a FitResult."""
    began = time.perf_counter()
    t, info = dmn_timesteps(noise_schedule, steps, solver, order, return_info=True, **options)
    info["seconds"] = time.perf_counter() - began
    return FitResult("dmn", solver, order, len(t) - 1, timesteps=t, info=info)


class DMN(Method):
    """A baseline: the data-free schedule minimising the solver's error bound."""
    name = "dmn"
    searchable = False
    solvers = SOLVERS
    options = declare(dmn_timesteps, ("noise_schedule", "steps", "solver", "order", "lower_order_final",
                                      "return_info"),
                      low={"trunc": 0, "maxiter": 1}, positive=("err_power", "min_gap"))

    def fit(self, ctx: FitContext, **options: Any) -> FitResult:
        return fit_dmn(ctx.source.noise_schedule, ctx.solver, ctx.steps, ctx.order, **options)
