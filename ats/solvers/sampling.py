"""``sample``: run a solver over a global or per-sample discretization."""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from ..discretize import check_time_range
from ..noise import NoiseSchedule
from .calls import NetworkCalls
from .loop import BoundSolver, NextTime, Step
from .steps import (Generators, ModelFn, StepFn, coeffs, ddim_step, dpm_solver_pp_step, euler_step, grid_coeffs,
                    heun_step, ipndm_step, uni_pc_step)


class SolverSpec(NamedTuple):
    step: StepFn
    orders: tuple[int, ...]
    default_order: int
    multistep: bool           # warms up with lower orders while its history fills
    lower_final_below: float  # lower_order_final applies when steps < this (0: never)
    calls_per_step: int = 1   # network calls of a step; the last step makes one call (Heun's is Euler)
    options: tuple[str, ...] = ()  # keyword options of ``step`` that ``bind`` fills in

    def nfe(self, steps: int) -> int:
        """Network calls of ``steps`` steps: calls_per_step * (N - 1) + 1 (Heun: 2N - 1)."""
        return self.calls_per_step * (steps - 1) + 1 if steps >= 1 else 0

    def steps(self, nfe: int) -> int | None:
        """The number of steps that makes exactly ``nfe`` calls, or None where none does."""
        steps, rest = divmod(nfe - 1, self.calls_per_step)
        return steps + 1 if nfe >= 1 and rest == 0 else None

    def bind(self, **options: Any) -> StepFn:
        """``step`` with the options it takes among ``options`` bound."""
        return partial(self.step, **{k: options[k] for k in self.options}) if self.options else self.step


SOLVERS: dict[str, SolverSpec] = {
    "ddim": SolverSpec(ddim_step, (1,), 1, False, 0, options=("eta", "generator")),
    "euler": SolverSpec(euler_step, (1,), 1, False, 0),
    "heun": SolverSpec(heun_step, (2,), 2, False, 0, calls_per_step=2),
    "dpm_solver++": SolverSpec(dpm_solver_pp_step, (1, 2, 3), 2, True, 10),                   # as DPM-Solver
    "uni_pc": SolverSpec(uni_pc_step, (1, 2, 3), 3, True, math.inf, options=("variant",)),   # as UniPC
    "ipndm": SolverSpec(ipndm_step, (1, 2, 3, 4), 4, True, 0),                                # as GITS
}
VARIANTS = ("bh1", "bh2")


def solver_spec(solver: str, order: int | None = None) -> tuple[SolverSpec, int]:
    """The solver's spec and its resolved order; a clear error for unknown ones."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    spec = SOLVERS[solver]
    order = spec.default_order if order is None else order
    if isinstance(order, bool) or not isinstance(order, int) or order not in spec.orders:
        raise ValueError(f"solver {solver!r} supports order {', '.join(map(str, spec.orders))}, got {order!r}")
    return spec, order


MAX_NFE = 1000   # network calls per sample any command or study accepts (a few-step tool; the teacher uses 20)


def near_nfes(solver: str, nfe: int) -> str:
    """The network-call counts next to ``nfe`` that ``solver`` can spend ("3 or 5"), for errors."""
    return " or ".join(str(m) for m in (nfe - 1, nfe + 1) if m >= 1 and steps_for_nfe(solver, m) is not None)


def nfe(solver: str, steps: int) -> int:
    """Network calls of ``steps`` steps of ``solver`` (``SolverSpec.nfe``)."""
    return solver_spec(solver)[0].nfe(steps)


def steps_for_nfe(solver: str, nfe: int) -> int | None:
    """Steps of ``solver`` with exactly ``nfe`` network calls, or None (Heun needs odd NFE)."""
    return solver_spec(solver)[0].steps(nfe)


def step_orders(solver: str, steps: int, order: int | None = None, lower_order_final: bool = True) -> list[int]:
    """Order used at each step. Multistep solvers warm up (step i uses at most i + 1); with
    ``lower_order_final`` the last steps use at most steps - i, as the reference code of
    each solver does: DPM-Solver++ below 10 steps, UniPC always, iPNDM never."""
    spec, order = solver_spec(solver, order)
    if not spec.multistep:
        return [order] * steps
    orders = [min(order, i + 1) for i in range(steps)]
    if lower_order_final and steps < spec.lower_final_below:
        orders = [min(o, steps - i) for i, o in enumerate(orders)]
    return orders


def get_step_fn(solver: str, eta: float = 0., variant: str = "bh1", generator: Generators = None) -> StepFn:
    """The one-step function of ``solver`` with its options bound (see ``ats.solvers.steps``)."""
    spec, _ = solver_spec(solver)
    if variant not in VARIANTS:
        raise ValueError(f"unknown uni_pc variant {variant!r}; choose 'bh1' or 'bh2'")
    if eta != 0. and "eta" not in spec.options:
        takers = ", ".join(repr(name) for name, s in SOLVERS.items() if "eta" in s.options)
        raise ValueError(f"eta applies to solver {takers} only, not {solver!r}")
    if not 0. <= eta <= 1.:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    return spec.bind(eta=float(eta), variant=variant, generator=generator)


def bind_solver(model_fn: ModelFn, noise_schedule: NoiseSchedule, solver: str, steps: int, order: int | None = None,
                lower_order_final: bool = True, checkpoint: bool = False, precision: str = "fp32",
                **options: Any) -> BoundSolver:
    """``get_step_fn(solver, **options)`` bound to the network, with the orders of ``steps``
    steps; ``checkpoint`` and ``precision``: how the network is called (``NetworkCalls``)."""
    step_fn = get_step_fn(solver, **options)
    return BoundSolver(step_fn, model_fn, noise_schedule, step_orders(solver, steps, order, lower_order_final),
                       NetworkCalls(checkpoint, precision))


def _as_batch_times(name: str, ts: Tensor, batch: int, x: Tensor) -> Tensor:
    """[N+1] -> [1, N+1] (one schedule for the batch); [B, N+1] stays per sample."""
    if not torch.is_tensor(ts):
        ts = torch.as_tensor(ts, dtype=x.dtype)
    if ts.ndim not in (1, 2) or (ts.ndim == 2 and ts.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must have shape [N+1] or [B, N+1] with B = {batch}, "
                         f"got {tuple(ts.shape)}")
    if ts.shape[-1] < 2:
        raise ValueError(f"{name} needs at least 2 entries (N >= 1 steps), got {ts.shape[-1]}")
    return ts.to(device=x.device, dtype=x.dtype).reshape(-1, ts.shape[-1])


def _cond_times(cond_timesteps: Tensor, ts: Tensor, x: Tensor, noise_schedule: NoiseSchedule) -> Tensor:
    """cond_timesteps as [b, N+1], checked against the timesteps ``ts``."""
    cond = _as_batch_times("cond_timesteps", cond_timesteps, x.shape[0], x)
    if cond.shape[1] != ts.shape[1]:
        raise ValueError(f"cond_timesteps has {cond.shape[1]} entries per sample, timesteps {ts.shape[1]}")
    with torch.no_grad():
        check_time_range(noise_schedule, cond, "cond_timesteps")
    return cond


def sample(model_fn: ModelFn, noise_schedule: NoiseSchedule, x: Tensor, timesteps: Tensor, solver: str = "uni_pc",
           order: int | None = None, cond_timesteps: Tensor | None = None, lower_order_final: bool = True,
           eta: float = 0., variant: str = "bh1", generator: Generators = None, return_intermediates: bool = False,
           callback: Callable[[Step], None] | None = None, next_time: NextTime | None = None,
           checkpoint: bool = False, precision: str = "fp32") -> Tensor | tuple[Tensor, Tensor]:
    """Integrate from x at ``timesteps[..., 0]`` to ``timesteps[..., -1]`` with ``solver``.

    ``timesteps``: strictly decreasing, [N+1] (one schedule) or [B, N+1] (one per sample).
    ``cond_timesteps``: same shape; the times the network sees (decoupled conditioning).
    Differentiable in x, timesteps and cond_timesteps. ``generator``: one generator, or
    one per sample (DDIM with eta > 0). ``callback(step)``: called after every step with
    its ``Step`` (i, x, coefficients at the time reached, solver state). ``next_time(i, x,
    c)``: picks t_{i+1} from x at t_i (``c`` its coefficients) in place of timesteps[..., i + 1],
    so only t_0 and N come from ``timesteps``. Returns x at the end, and with
    ``return_intermediates`` also the states at every time, [N+1, B, ...].
    ``checkpoint``: keep only each network call's inputs and output for the backward pass and
    recompute its activations there (less memory through many steps of a big network, about
    one more forward pass of compute). ``precision``: "fp32", or "bf16" / "fp16" to run the
    network under autocast (fp16 on CUDA only); the solver's arithmetic stays in x's dtype.
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError("x must be a floating-point tensor of shape [B, ...]")
    ts = _as_batch_times("timesteps", timesteps, x.shape[0], x)
    run = bind_solver(model_fn, noise_schedule, solver, ts.shape[1] - 1, order, lower_order_final, checkpoint,
                      precision, eta=eta, variant=variant, generator=generator)
    run.calls.check(x.device)
    with torch.no_grad():
        check_time_range(noise_schedule, ts, "timesteps")
        if not (ts[:, 1:] < ts[:, :-1]).all():
            raise ValueError("timesteps must be strictly decreasing (t_0 > t_1 > ... > t_N) for every sample")
    cond = None
    if cond_timesteps is not None:
        ts, cond = torch.broadcast_tensors(ts, _cond_times(cond_timesteps, ts, x, noise_schedule))
    grid = grid_coeffs(noise_schedule, ts, x.ndim) if next_time is None else [coeffs(noise_schedule, ts[:, 0], x.ndim)]
    trajectory = [x]
    for step in run.iter_steps(x, grid, cond, next_time):
        x = step.x
        if callback is not None:
            callback(step)
        if return_intermediates:
            trajectory.append(x)
    return (x, torch.stack(trajectory)) if return_intermediates else x
