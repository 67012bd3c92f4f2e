"""``sample``: run a solver over a global or per-sample discretization."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from ..discretize import check_time_range
from ..noise import NoiseSchedule
from .steps import (SolverState, ddim_step, dpm_solver_pp_step, euler_step, grid_coeffs, heun_step,
                    ipndm_step, uni_pc_step)


class SolverSpec(NamedTuple):
    step: Callable
    orders: tuple[int, ...]
    default_order: int
    multistep: bool           # warms up with lower orders while its history fills
    lower_final_below: float  # lower_order_final applies when steps < this (0: never)
    calls_per_step: int = 1   # network calls of a step; the last step makes one call (Heun's is Euler)

    def nfe(self, steps: int) -> int:
        """Network calls of ``steps`` steps: calls_per_step * (N - 1) + 1 (Heun: 2N - 1)."""
        return self.calls_per_step * (steps - 1) + 1 if steps >= 1 else 0

    def steps(self, nfe: int) -> int | None:
        """The number of steps that makes exactly ``nfe`` calls, or None where none does."""
        steps, rest = divmod(nfe - 1, self.calls_per_step)
        return steps + 1 if nfe >= 1 and rest == 0 else None


SOLVERS: dict[str, SolverSpec] = {
    "ddim": SolverSpec(ddim_step, (1,), 1, False, 0),
    "euler": SolverSpec(euler_step, (1,), 1, False, 0),
    "heun": SolverSpec(heun_step, (2,), 2, False, 0, calls_per_step=2),
    "dpm_solver++": SolverSpec(dpm_solver_pp_step, (1, 2, 3), 2, True, 10),   # as DPM-Solver
    "uni_pc": SolverSpec(uni_pc_step, (1, 2, 3), 3, True, math.inf),         # as UniPC
    "ipndm": SolverSpec(ipndm_step, (1, 2, 3, 4), 4, True, 0),                # as GITS
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


def get_step_fn(solver: str, eta: float = 0., variant: str = "bh1",
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Callable:
    """The one-step function of ``solver`` with its options bound (see ``ats.solvers.steps``)."""
    spec, _ = solver_spec(solver)
    if variant not in VARIANTS:
        raise ValueError(f"unknown uni_pc variant {variant!r}; choose 'bh1' or 'bh2'")
    if eta != 0. and solver != "ddim":
        raise ValueError(f"eta applies to solver 'ddim' only, not {solver!r}")
    if solver == "ddim":
        if not 0. <= eta <= 1.:
            raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
        return partial(ddim_step, eta=float(eta), generator=generator)
    if solver == "uni_pc":
        return partial(uni_pc_step, variant=variant)
    return spec.step


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


def sample(model_fn: Callable[[Tensor, Tensor], Tensor], noise_schedule: NoiseSchedule, x: Tensor,
           timesteps: Tensor, solver: str = "uni_pc", order: int | None = None,
           cond_timesteps: Tensor | None = None, lower_order_final: bool = True, eta: float = 0.,
           variant: str = "bh1", generator: torch.Generator | Sequence[torch.Generator] | None = None,
           return_intermediates: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate from x at ``timesteps[..., 0]`` to ``timesteps[..., -1]`` with ``solver``.

    ``timesteps``: strictly decreasing, [N+1] (one schedule) or [B, N+1] (one per sample).
    ``cond_timesteps``: same shape; the times the network sees (decoupled conditioning).
    Differentiable in x, timesteps and cond_timesteps. ``generator``: one generator, or
    one per sample (DDIM with eta > 0). Returns x at the end, and with
    ``return_intermediates`` also the states at every time, [N+1, B, ...].
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError("x must be a floating-point tensor of shape [B, ...]")
    step_fn = get_step_fn(solver, eta, variant, generator)
    ts = _as_batch_times("timesteps", timesteps, x.shape[0], x)
    steps = ts.shape[1] - 1
    orders = step_orders(solver, steps, order, lower_order_final)
    with torch.no_grad():
        check_time_range(noise_schedule, ts, "timesteps")
        if not (ts[:, 1:] < ts[:, :-1]).all():
            raise ValueError("timesteps must be strictly decreasing (t_0 > t_1 > ... > t_N) for every sample")
    cs = [None] * (steps + 1)
    if cond_timesteps is not None:
        cond = _as_batch_times("cond_timesteps", cond_timesteps, x.shape[0], x)
        if cond.shape[1] != ts.shape[1]:
            raise ValueError(f"cond_timesteps has {cond.shape[1]} entries per sample, timesteps {ts.shape[1]}")
        with torch.no_grad():
            check_time_range(noise_schedule, cond, "cond_timesteps")
        ts, cond = torch.broadcast_tensors(ts, cond)
        cs = cond.unbind(1)
    grid = grid_coeffs(noise_schedule, ts, x.ndim)
    state = SolverState()
    trajectory = [x]
    for i in range(steps):
        x, state = step_fn(model_fn, x, grid[i], grid[i + 1], state, order=orders[i],
                           cond_t=cs[i], cond_next=cs[i + 1], last=i == steps - 1)
        if return_intermediates:
            trajectory.append(x)
    return (x, torch.stack(trajectory)) if return_intermediates else x
