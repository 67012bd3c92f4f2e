"""The one solver loop: a step function bound to a network, walked over a discretization."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterator, NamedTuple, Sequence

from torch import Tensor

from ..noise import NoiseSchedule
from .calls import NetworkCalls
from .steps import Coeffs, ModelFn, SolverState, StepFn, coeffs

NextTime = Callable[[int, Tensor, Coeffs], Tensor]
"""``next_time(i, x_i, c_i) -> t_{i+1}``: picks the end of step i from x at t_i = c_i.t ([b] or [1])."""
CondTime = Callable[[int, Tensor, Tensor], Tensor]
"""``cond_time(j, t_j, t_{j-1}) -> s_j``: the time the network sees at inner time j (0 < j < N),
for schedules chosen on the way; the first and last times are never offset."""


class Step(NamedTuple):
    """The loop after step i: x at time ``c.t`` (coefficients ``c``) and the solver state."""
    i: int
    x: Tensor
    c: Coeffs
    state: SolverState


@dataclass(frozen=True)
class BoundSolver:
    """A step function bound to a network, its noise schedule and the order of each of the
    N = len(orders) steps (``step_orders``); ``calls``: how the network is called
    (checkpointed, autocast; ``ats.solvers.calls``)."""
    step_fn: StepFn
    model_fn: ModelFn
    noise_schedule: NoiseSchedule
    orders: Sequence[int]
    calls: NetworkCalls = NetworkCalls()

    @cached_property
    def network(self) -> ModelFn:
        """``model_fn`` as the steps call it (``calls`` applied)."""
        return self.calls.wrap(self.model_fn)

    @property
    def steps(self) -> int:
        return len(self.orders)

    def step(self, i: int, x: Tensor, c: Coeffs, cn: Coeffs, state: SolverState, cond_t: Tensor | None = None,
             cond_next: Tensor | None = None, *, order: int | None = None,
             last: bool | None = None) -> tuple[Tensor, SolverState]:
        """Step i, x at c.t -> x at cn.t, at order ``orders[i]`` and ``last`` on step N-1
        unless given."""
        return self.step_fn(self.network, x, c, cn, state, order=self.orders[i] if order is None else order,
                            cond_t=cond_t, cond_next=cond_next, last=i == self.steps - 1 if last is None else last)

    def iter_steps(self, x: Tensor, grid: Sequence[Coeffs], cond: Tensor | CondTime | None = None,
                   next_time: NextTime | None = None, state: SolverState = SolverState()) -> Iterator[Step]:
        """x_{i+1} = step_i(x_i; c_i -> c_{i+1}) for i = 0 .. N-1, yielding each ``Step``.

        ``grid``: the coefficients c_0 .. c_N; with ``next_time`` only c_0 is read and
        c_{i+1} = coeffs(t_{i+1} = next_time(i, x_i, c_i)). ``cond``: [b, N+1] times the
        network sees, or a ``CondTime`` that gives each as its time is reached (None: the
        solver's)."""
        fixed = cond.unbind(1) if isinstance(cond, Tensor) else None
        c = grid[0]
        s = None if fixed is None else fixed[0]
        for i in range(self.steps):
            cn = grid[i + 1] if next_time is None else coeffs(self.noise_schedule, next_time(i, x, c), x.ndim)
            if fixed is not None:
                s_next = fixed[i + 1]
            else:
                s_next = cond(i + 1, cn.t.reshape(-1), c.t.reshape(-1)) if cond is not None and i + 1 < self.steps \
                    else None
            x, state = self.step(i, x, c, cn, state, s, s_next)
            yield Step(i, x, cn, state)
            c, s = cn, s_next
