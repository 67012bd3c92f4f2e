"""TimeTuner (Xia et al., CVPR 2024): one conditioning-time ratio per step, learned on real data.

The solver keeps its coefficients at t_i; only the network at step i sees s_i = r_i * t_i
(``ats.params.ratio_cond_timesteps``). The last ratio is held at 1. Each ratio r_i is fitted
with Adam on the self-consistency loss of the official implementation
(THU-LYJ-Lab/time-tuner, ``TimeTuner.optimize_timesteps``):

    x_{i+1} = step_i(x_i; network at r_i t_i)
    L_i(r_i) = mean_b sum_pixels ( eps(x_i, t_i) - eps(x_{i+1}, t_{i+1}) )^2

with eps(x_i, t_i) computed without gradient (the untuned network direction at the start of
the step) and the gradient flowing through x_{i+1} into r_i: the step should end where the
network's noise prediction agrees with the one it started from.

Where x_i comes from (``strategy``):

- ``"sequential"``: real data x0 (through ``encode_fn``) noised to T, x_T = alpha_T x0 + sigma_T
  eps, then run through the steps already tuned; r_0, r_1, ... are fitted one after the other.
- ``"parallel"``: the forward process at t_i, x_i = alpha_i x0 + sigma_i eps; every step is
  fitted on its own (ignoring the ratios of the others).

Any solver of ``ats.solvers`` works, through its one-step function:

- Multistep history. Sequential: the history is the one the sampler builds with the tuned
  earlier steps. Parallel: the previous ``order - 1`` steps are run (without gradient, ratio 1)
  from the forward-process points x_j = alpha_j x0 + sigma_j eps of the same (x0, eps): the
  history along the path an exact solver would follow, from the same network outputs the
  sampler would use there. Warm-up and lower_order_final use the orders of
  ``step_orders``, exactly as ``sample`` does.
- Solvers that call the network at t_{i+1} inside step i (UniPC's corrector, whose output is
  reused as step i+1's model output; Heun's second stage) let r_{i+1} act on step i too. In
  sequential mode that is found by autograd (does step i's output depend on its
  ``cond_next``?), and then the fit of r_i re-runs step i-1 with ``cond_next = r_i t_i`` as
  well, so the fitted ratio acts on exactly the calls it acts on when sampling. In parallel
  mode x_i comes from the forward process, so only the network call at x_i sees r_i (for
  UniPC the reused corrector output is recomputed at x_i).

Data pool (where this differs from the reference, whose every iteration draws fresh data and
noise and, in sequential mode, re-runs all the tuned steps before step i on them): a pool of
``pool_size`` (x0, eps) pairs is drawn once, pushed through the tuned steps once per step
(sequential) or noised to t_i (parallel), with the targets eps(x_i, t_i) computed once; each
Adam iteration then takes a minibatch of ``batch_size`` from the pool. The loss and its
gradient are the same; with the default pool (``iterations * batch_size``, at most 4096)
each pair is used about once per step, as in the reference, and a sequential fit costs
about what a parallel one does. Gradients are taken with ``torch.autograd.grad`` with
respect to the ratio only, so the network's parameters (and their ``.grad``) are never
touched.

Safe range (the reference leaves r unconstrained): after each Adam update r_i is projected
onto [lo_i, hi_i], the intersection of ``ratio_range`` with the schedule's valid times
(t_min <= r_i t_i <= t_max; on VP schedules r_0 <= 1 when t_0 = T), so every conditioning
time is valid. DDIM is fitted deterministic (eta = 0), as ``sample`` runs it by default.

Measured quality: ``docs/quality.md`` and ``bench/results/``.

Divergence: a NaN/inf loss raises ``FitDiverged`` naming the step and iteration; the
exception's ``result`` attribute is a ``FitResult`` with the ratios so far (steps already
fitted keep theirs, the diverged step keeps its last ratio whose loss was finite, later
steps stay at 1), so a caller can save or use it.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch import Tensor

from ..discretize import KINDS, check_time_range, get_timesteps
from ..noise import NoiseSchedule
from ..params import ratio_cond_timesteps
from ..solvers import BoundSolver, Coeffs, ModelFn, SolverState, bind_solver, solver_spec
from ..solvers.steps import grid_coeffs
from ..options import Option, declare
from .base import FitContext, Method, Progress
from .common import FitDiverged, FitResult, check_finite
STRATEGIES = ("sequential", "parallel")


# ----------------------------------------------------------------------------- helpers

def _finite(value: Tensor, step: int, what: str, last_good: Tensor) -> float:
    """``check_finite``; a ``FitDiverged`` carries ``last_good``, the step's last ratio whose
    loss was finite."""
    try:
        return check_finite(value, step, what)
    except FitDiverged as err:
        err.last_good = last_good
        raise


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Squared L2 distance per sample, averaged over the batch (the reference's mean_flat)."""
    return (a - b).square().flatten(1).sum(1).mean()


class _Problem:
    """The fixed parts of one fit: the bound solver, the schedule ts [N+1] with its grid, and
    the chunk size of pool-wide passes."""

    def __init__(self, run: BoundSolver, ts: Tensor, grid: list[Coeffs], chunk: int) -> None:
        self.run, self.ts, self.grid, self.chunk = run, ts, grid, chunk

    def run_step(self, i: int, x: Tensor, state: SolverState, cond_t: Tensor | None, cond_next: Tensor | None,
                 order: int | None = None, last: bool | None = None) -> tuple[Tensor, SolverState]:
        """Step i of the schedule (``BoundSolver.step``)."""
        return self.run.step(i, x, self.grid[i], self.grid[i + 1], state, cond_t, cond_next, order=order, last=last)

    @torch.no_grad()
    def chunked(self, i: int, x: Tensor, state: SolverState, cond_t: Tensor | None, cond_next: Tensor | None,
                order: int | None = None, last: bool | None = None) -> tuple[Tensor, SolverState]:
        """``run_step`` over the whole pool, in chunks."""
        outs = [self.run_step(i, xc, state.take(slice(k, k + len(xc))), cond_t, cond_next, order, last)
                for k, xc in zip(range(0, len(x), self.chunk), x.split(self.chunk))]
        return torch.cat([o[0] for o in outs]), SolverState.cat([o[1] for o in outs])

    def advance(self, i: int, x: Tensor, state: SolverState, cond: Tensor) -> tuple[Tensor, SolverState]:
        """Step i over the whole pool, with conditioning times ``cond`` [N+1]."""
        return self.chunked(i, x, state, cond[i:i + 1], cond[i + 1:i + 2])

    @torch.no_grad()
    def eps(self, x: Tensor, i: int) -> Tensor:
        """The untuned network output eps(x, t_i) over the pool, in chunks."""
        t = self.ts[i:i + 1]
        return torch.cat([self.run.model_fn(xc, t) for xc in x.split(self.chunk)])

    def depends_on_next(self, i: int, x: Tensor, state: SolverState, cond: Tensor) -> bool:
        """Whether step i's output depends on the time its network sees at t_{i+1} (UniPC's
        corrector, Heun's second stage): asked of autograd on one sample."""
        probe = cond[i + 1:i + 2].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out, _ = self.run_step(i, x[:1], state.take(slice(0, 1)), cond[i:i + 1], probe)
        return out.requires_grad


def _ratio_bounds(noise_schedule: NoiseSchedule, ts: Tensor, ratio_range: tuple[float, float]) -> list[tuple[float, float]]:
    """[lo_i, hi_i] per step: ratio_range intersected with t_min <= r t_i <= t_max."""
    bounds = []
    for t in ts[:-1].tolist():
        lo, hi = ratio_range
        if noise_schedule.t_min > 0:
            lo = max(lo, noise_schedule.t_min / t)
        if math.isfinite(noise_schedule.t_max):
            hi = min(hi, noise_schedule.t_max / t)
        bounds.append((lo, hi))
    return bounds


def _check_inputs(noise_schedule: NoiseSchedule, data: Tensor, timesteps: Tensor, strategy: str,
                  iterations: int, lr: float, batch_size: int, pool_size: int | None,
                  ratio_range: tuple[float, float]) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown timetuner strategy {strategy!r}; choose 'sequential' or 'parallel'")
    if not torch.is_tensor(data) or not data.is_floating_point() or data.ndim < 2 or len(data) < 1:
        raise ValueError("data must be a floating-point tensor of real samples, shape [M, ...] with M >= 1")
    if not torch.isfinite(data).all():
        raise ValueError("data contains NaN or inf")
    if not torch.is_tensor(timesteps) or timesteps.ndim != 1 or len(timesteps) < 3:
        shape = tuple(timesteps.shape) if torch.is_tensor(timesteps) else type(timesteps).__name__
        raise ValueError(f"timesteps must be one global schedule of shape [N+1] with N >= 2 steps "
                         f"(the last ratio is fixed at 1), got {shape}")
    check_time_range(noise_schedule, timesteps, "timesteps")
    if not (timesteps[1:] < timesteps[:-1]).all():
        raise ValueError("timesteps must be strictly decreasing (t_0 > t_1 > ... > t_N)")
    for name, value in (("iterations", iterations), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if pool_size is not None and (isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1):
        raise ValueError(f"pool_size must be an integer >= 1 or None, got {pool_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    lo, hi = ratio_range
    if not 0 < lo <= 1 <= hi:
        raise ValueError(f"ratio_range must satisfy 0 < low <= 1 <= high, got {ratio_range!r}")


# ----------------------------------------------------------------------------- the fit

def fit_timetuner(model_fn: ModelFn, noise_schedule: NoiseSchedule, data: Tensor, timesteps: Tensor,
                  solver: str = "ddim", order: int | None = None, strategy: str = "sequential",
                  iterations: int = 200, lr: float = 2e-3, batch_size: int = 64, seed: int = 0,
                  encode_fn: Callable[[Tensor], Tensor] | None = None, progress: Progress | None = None,
                  pool_size: int | None = None, ratio_range: tuple[float, float] = (0.5, 2.0),
                  lower_order_final: bool = True, variant: str = "bh1") -> FitResult:
    """Fit TimeTuner's ratios for ``solver`` on the schedule ``timesteps`` (see the module doc).

    ``data``: real samples x0 [M, ...] in the data space; ``encode_fn`` maps a batch of them to
    the model's space (latent models), identity by default; the encoded data's dtype and
    device are the fit's. ``iterations`` Adam steps of
    ``batch_size`` per tuned step (``lr`` as published: 2e-3). ``order``, ``lower_order_final``
    and ``variant`` must match what ``ats.solvers.sample`` will be called with. ``progress("step
    i", iteration, loss)`` is called after every iteration. Seeded by ``seed``: on the CPU the same
    call returns the same ratios bit for bit.

    Returns a ``FitResult`` (method ``"timetuner"``) whose ``timesteps`` is the given schedule
    and ``cond_timesteps`` = ``ratio_cond_timesteps(timesteps, ratios)``; ``info["ratios"]``
    has the N ratios (last 1), ``history["step_i"]`` the loss curve of step i and
    ``history["ratio_i"]`` its ratio after each iteration. Raises ``FitDiverged`` (with
    ``.result``) on a non-finite loss. Ctrl-C returns the ratios of the steps tuned so far (the
    others 1) with ``info["interrupted"]`` and ``info["steps_tuned"]``.
    """
    _, order = solver_spec(solver, order)
    _check_inputs(noise_schedule, data, timesteps, strategy, iterations, lr, batch_size, pool_size, ratio_range)
    started = time.perf_counter()
    steps = len(timesteps) - 1
    run = bind_solver(model_fn, noise_schedule, solver, steps, order, lower_order_final, variant=variant)
    gen = torch.Generator().manual_seed(int(seed))

    # The pool of (x0, eps) pairs: every datum in turn, in a seeded order, fresh noise each.
    pool_size = pool_size or min(iterations * batch_size, 4096)
    order_idx = torch.cat([torch.randperm(len(data), generator=gen) for _ in range(-(-pool_size // len(data)))])
    x0 = data[order_idx[:pool_size]]
    if encode_fn is not None:
        with torch.no_grad():
            x0 = torch.cat([encode_fn(chunk) for chunk in x0.split(batch_size)])
    noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
    ts = timesteps.detach().to(device=x0.device, dtype=x0.dtype)
    grid = grid_coeffs(noise_schedule, ts[None], x0.ndim)
    prob = _Problem(run, ts, grid, chunk=max(batch_size, 256))
    bounds = _ratio_bounds(noise_schedule, ts, ratio_range)

    ratios = torch.ones(steps, dtype=x0.dtype, device=x0.device)
    history: dict[str, list[float]] = {}

    def result(extra: dict | None = None) -> FitResult:
        r = ratios.detach().to(timesteps.dtype).cpu()
        cond = ratio_cond_timesteps(timesteps.detach().cpu(), r)
        info = {"ratios": r.tolist(), "strategy": strategy, "iterations": iterations, "lr": lr,
                "batch_size": batch_size, "pool_size": pool_size, "seed": seed,
                "ratio_range": list(ratio_range), "lower_order_final": lower_order_final,
                "variant": variant, "wall_time_s": time.perf_counter() - started,
                "loss": "mean_b ||eps(x_i, t_i) - eps(step_i(x_i; r_i t_i), t_{i+1})||^2"}
        info.update(extra or {})
        return FitResult("timetuner", solver, order, steps,
                         timesteps=timesteps.detach().cpu().clone(), cond_timesteps=cond,
                         history=history, info=info)

    # Pool states: x before step `at`, with its solver state.
    if strategy == "sequential":
        a_T, s_T = (v.reshape(()) for v in noise_schedule.marginal_coeffs(ts[0])[:2])
        pool_x, pool_state, at = a_T * x0 + s_T * noise, SolverState(), 0

    done = 0   # steps whose ratio is tuned; Ctrl-C keeps them (the rest stay 1)
    try:
        for i in range(steps - 1):
            window = False
            if strategy == "sequential":
                cond = ratio_cond_timesteps(ts, ratios)
                while at < i - 1:
                    pool_x, pool_state = prob.advance(at, pool_x, pool_state, cond)
                    at += 1
                window = i >= 1 and prob.depends_on_next(i - 1, pool_x, pool_state, cond)
                if i >= 1 and not window:
                    pool_x, pool_state = prob.advance(at, pool_x, pool_state, cond)
                    at += 1
                x_i, state_i = pool_x, pool_state
            else:
                x_i, state_i = _forward_with_history(prob, noise_schedule, x0, noise, i)
            target = None if window else prob.eps(x_i, i)
            try:
                ratios[i] = _fit_ratio(prob, i, x_i, state_i, target, window, ratios, bounds[i], iterations,
                                       lr, batch_size, gen, history, progress)
            except FitDiverged as err:
                ratios[i] = err.last_good
                err.result = result({"diverged_at_step": i})
                raise
            done = i + 1
    except KeyboardInterrupt:
        return result({"interrupted": True, "steps_tuned": done})
    return result()


def _forward_with_history(prob: _Problem, noise_schedule: NoiseSchedule, x0: Tensor, noise: Tensor,
                          i: int) -> tuple[Tensor, SolverState]:
    """Parallel mode: x_i from the forward process, and for multistep solvers the history of
    the previous ``order - 1`` steps run (ratio 1, no gradient) from forward-process points of
    the same pairs. Only the history they push is kept, so they run at order 1 and with
    ``last=True`` (UniPC then skips its corrector, whose output would be discarded); a
    pending output is never carried into step i."""
    def forward(j: int) -> Tensor:
        alpha, sigma = noise_schedule.marginal_coeffs(prob.ts[j])[:2]
        return alpha * x0 + sigma * noise

    state = SolverState()
    with torch.no_grad():
        for j in range(max(0, i - prob.run.orders[i] + 1), i):
            state = prob.chunked(j, forward(j), state, None, None, last=True, order=1)[1]._replace(pending=None)
    return forward(i), state


def _fit_ratio(prob: _Problem, i: int, x_i: Tensor, state_i: SolverState, target: Tensor | None,
               window: bool, ratios: Tensor, bound: tuple[float, float], iterations: int, lr: float,
               batch_size: int, gen: torch.Generator, history: dict[str, list[float]],
               progress: Progress | None) -> Tensor:
    """Adam on r_i with projection onto ``bound``. ``x_i``/``state_i`` is the pool before step
    i, or before step i-1 when ``window`` (step i-1's network call at t_i sees r_i too)."""
    r = torch.ones((), dtype=x_i.dtype, device=x_i.device, requires_grad=True)
    opt = torch.optim.Adam([r], lr=lr, betas=(0.9, 0.999))
    losses, trace = history.setdefault(f"step_{i}", []), history.setdefault(f"ratio_{i}", [])
    ts = prob.ts
    last_good = r.detach().clone()
    for it in range(iterations):
        idx = torch.randint(len(x_i), (min(batch_size, len(x_i)),), generator=gen).to(x_i.device)
        xb, sb = x_i[idx], state_i.take(idx)
        s_i = (r * ts[i]).reshape(1)
        if window:
            prev_cond = (ratios[i - 1] * ts[i - 1]).reshape(1)
            xb, sb = prob.run_step(i - 1, xb, sb, prev_cond, s_i)
            with torch.no_grad():
                eps_t = prob.run.model_fn(xb.detach(), ts[i:i + 1])
        else:
            eps_t = target[idx]
        x_next, _ = prob.run_step(i, xb, sb, s_i, ts[i + 1:i + 2])
        loss = _sq_dist(eps_t, prob.run.model_fn(x_next, ts[i + 1:i + 2]))
        value = _finite(loss.detach(), i, f"timetuner loss (iteration {it})", last_good)
        grad = torch.autograd.grad(loss, [r], allow_unused=True)[0] if loss.requires_grad else None
        if grad is None:
            raise ValueError(f"step {i} never calls the network at its conditioning time cond_t, so "
                             "TimeTuner has nothing to tune there")
        _finite(grad, i, f"timetuner gradient (iteration {it})", last_good)
        last_good = r.detach().clone()
        r.grad = grad
        opt.step()
        with torch.no_grad():
            r.clamp_(*bound)
        losses.append(value)
        trace.append(float(r.detach()))
        if progress is not None:
            progress(f"step {i}", it, value)
    return r.detach()


class TimeTuner(Method):
    """Conditioning times tuned on real data for a fixed discretization (``fit_timetuner``)."""
    name = "timetuner"
    needs_real_data = True
    options = declare(fit_timetuner, ("model_fn", "noise_schedule", "data", "timesteps", "solver", "order", "seed",
                                      "encode_fn", "progress", "lower_order_final", "variant"),
                      choices={"strategy": STRATEGIES}, low={"iterations": 1, "batch_size": 1, "pool_size": 1},
                      positive=("lr",),
                      extra=(Option("discretization", frozenset({"str"}), "time_uniform", KINDS,
                                    help="the fixed discretization whose conditioning times are tuned"),
                             Option("n_data", frozenset({"int"}), 1024, low=1, help="real samples to train on")))

    def fit(self, ctx: FitContext, discretization: str = "time_uniform", n_data: int = 1024,
            **options: Any) -> FitResult:
        ts = get_timesteps(ctx.source.noise_schedule, discretization, ctx.steps, dtype=ctx.source.dtype)
        return fit_timetuner(ctx.source.model_fn, ctx.source.noise_schedule, ctx.real_data(n_data), ts, ctx.solver,
                             ctx.order, seed=ctx.seed, progress=ctx.progress, **options)
