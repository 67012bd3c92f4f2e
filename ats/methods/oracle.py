"""The per-sample optimum ("oracle"): one schedule for every sample, found in one batch.

All B samples are optimised at once: one [B, N+1] logit tensor, one solver call per
iteration, the loss summed over samples (so B schedules cost about what one costs), and
the best iterate of each sample kept, not the last. The landscape is non-convex and plain
gradient descent from the global schedule tends to stay in its basin, so the fit runs in
rounds from different starts:
- restarts: the global schedule's logits plus Gaussian noise of growing scale;
- an optional black-box exploration (``explore_trials``): one Optuna study per sample over
  the N gap logits, driven by batched ask/tell (each round of B asks is one solver call),
  whose best candidates then seed a gradient refinement.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..losses import LOSS_NAMES, TeacherLoss, teacher_loss
from ..models.base import ModelSource
from ..options import Option, declare
from ..params import SPACES
from ..solvers import NetworkCalls
from ..teacher import TeacherData
from .base import NETWORK_OPTIONS, FitContext, Method, Progress
from .common import FitDiverged, FitResult, assert_monotone, check_finite
from .ld3 import Student, ld3_start

EXPLORE_SAMPLERS = ("tpe", "cmaes")
START_SAMPLES = Option("start_samples", frozenset({"int"}), 50, low=1,
                       help="training samples LD3 fits the starting global schedule on")


class _Best:
    """Best loss and logits per sample over every evaluation seen."""

    def __init__(self, theta: Tensor) -> None:
        self.loss = torch.full(theta.shape[:1], float("inf"), dtype=theta.dtype, device=theta.device)
        self.theta = theta.detach().clone()

    def update(self, loss: Tensor, theta: Tensor) -> None:
        better = loss.detach() < self.loss
        self.loss = torch.where(better, loss.detach(), self.loss)
        self.theta[better] = theta.detach()[better]


def _descend(student: Student, loss_fn: TeacherLoss, data: TeacherData, theta0: Tensor, iterations: int, lr: float,
             best: _Best, history: list, progress, round_name: str) -> None:
    """Adam on the per-sample logits from ``theta0``; every iterate updates ``best``."""
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    unit = data.latents / student.sigma_T
    for it in range(iterations):
        per_sample = loss_fn(student(theta, None, unit, data.labels), data.targets)
        check_finite(per_sample.sum(), it, f"{round_name} loss")
        best.update(per_sample, theta)
        opt.zero_grad(set_to_none=True)
        per_sample.sum().backward()
        check_finite(theta.grad.abs().sum(), it, f"{round_name} gradient")
        opt.step()
        history.append(per_sample.mean().item())
        if progress is not None:
            progress(round_name, it, best.loss.mean().item())
    with torch.no_grad():
        best.update(loss_fn(student(theta, None, unit, data.labels), data.targets), theta)


def _explore(student: Student, loss_fn: TeacherLoss, data: TeacherData, init: Tensor, trials: int, sampler: str,
             seed: int, best: _Best, spread: float = 1.5) -> Tensor:
    """One Optuna study per sample over the N gap logits (theta_1..theta_N, centred on the
    global schedule's); each round asks all B studies once and answers them with one batched
    solver call. Returns every sample's best explored logits."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    b, n1 = data.latents.shape[0], init.shape[-1]
    make = {"tpe": lambda i: optuna.samplers.TPESampler(seed=seed + i),
            "cmaes": lambda i: optuna.samplers.CmaEsSampler(seed=seed + i)}
    if sampler not in make:
        raise ValueError(f"unknown explore sampler {sampler!r}; choose 'cmaes' or 'tpe'")
    studies = [optuna.create_study(sampler=make[sampler](i)) for i in range(b)]
    unit = data.latents / student.sigma_T
    for _ in range(trials):
        asked = [s.ask() for s in studies]
        delta = torch.tensor([[t.suggest_float(f"g{k}", -spread, spread) for k in range(1, n1)] for t in asked],
                             dtype=init.dtype)
        theta = init.expand(b, n1).clone()
        theta[:, 1:] += delta
        with torch.no_grad():
            loss = loss_fn(student(theta, None, unit, data.labels), data.targets)
        for s, t, v in zip(studies, asked, loss.tolist()):
            s.tell(t, v if v == v else float("inf"))
        best.update(torch.nan_to_num(loss, nan=float("inf")), theta)
    out = init.expand(b, n1).clone()
    for i, s in enumerate(studies):
        out[i, 1:] += torch.tensor([s.best_params[f"g{k}"] for k in range(1, n1)], dtype=init.dtype)
    return out


def fit_oracle(source: ModelSource, data: TeacherData, solver: str, steps: int, order: int | None = None,
               space: str = "lambda", loss: str = "l2", init: Tensor | None = None, iterations: int = 200,
               lr: float = 0.05, restarts: int = 2, restart_scale: float = 0.5, explore_trials: int = 0,
               explore_sampler: str = "tpe", seed: int = 0, offsets: Tensor | None = None,
               progress: Progress | None = None, calls: NetworkCalls = NetworkCalls()) -> FitResult:
    """Per-sample schedules for every sample of ``data`` (latents and teacher targets).
    ``init``: the global logits to start from (e.g. LD3's; default the logSNR/time-uniform
    zeros); ``offsets``: its conditioning offsets s - t [N+1], carried to every sample's
    schedule (``carried_cond_timesteps``; kept in ``info["offsets"]``). Rounds: gradient descent from ``init``, then ``restarts`` rounds from ``init`` plus
    noise of scale restart_scale * k, then (``explore_trials`` > 0) Optuna exploration and a
    gradient refinement of its best candidates. Returns ``per_sample`` times [B, N+1] with
    ``info['loss']`` per sample (in the source's ``loss_space``). ``calls``: how the solver calls
    the network."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    loss_fn = teacher_loss(loss, source, calls)
    data = loss_fn.targets(data)
    student = Student(source, solver, order, space, offsets, calls)
    b, dtype, device = data.latents.shape[0], data.latents.dtype, data.latents.device
    init = torch.zeros(steps + 1, dtype=dtype, device=device) if init is None \
        else torch.as_tensor(init).detach().to(dtype=dtype, device=device)
    if init.shape != (steps + 1,):
        raise ValueError(f"init must be global logits of shape [{steps + 1}], got {tuple(init.shape)}")
    g = torch.Generator().manual_seed(seed)
    start = init.expand(b, steps + 1).clone()
    best = _Best(start)
    history: dict[str, list[float]] = {}
    rounds = [("descent", start)] + [
        (f"restart{k}", start + restart_scale * k * torch.randn(start.shape, generator=g, dtype=dtype).to(device))
        for k in range(1, restarts + 1)]
    try:
        with torch.no_grad():
            best.update(loss_fn(student(start, None, data.latents / student.sigma_T, data.labels), data.targets), start)
        start_loss = best.loss.clone()
        for name, theta0 in rounds:
            _descend(student, loss_fn, data, theta0, iterations, lr, best, history.setdefault(name, []), progress, name)
        if explore_trials > 0:
            explored = _explore(student, loss_fn, data, init, explore_trials, explore_sampler, seed, best)
            _descend(student, loss_fn, data, explored, iterations, lr, best, history.setdefault("explore", []),
                     progress, "explore")
    except FitDiverged as e:
        e.result = _result(student, best, data, solver, order, steps, history, space, loss, diverged=str(e))
        raise
    except KeyboardInterrupt:
        return _result(student, best, data, solver, order, steps, history, space, loss, interrupted=True)
    return _result(student, best, data, solver, order, steps, history, space, loss,
                   start_loss=start_loss.tolist())


def offsets_of(start: FitResult) -> Tensor | None:
    """A global schedule's conditioning offsets s - t [N+1] (None without)."""
    return None if start.cond_timesteps is None else start.cond_timesteps - start.timesteps


def _result(student: Student, best: _Best, data: TeacherData, solver, order, steps, history, space, loss,
            **info) -> FitResult:
    ts = student.timesteps(best.theta).detach()
    assert_monotone(ts)
    offsets = {} if student.offsets is None else {"offsets": student.offsets.tolist()}
    return FitResult("oracle", solver, order, steps, per_sample=ts, seeds=data.seeds, history=history,
                     info={"loss": best.loss.tolist(), "theta": best.theta.tolist(), "space": space,
                           "loss_name": loss, **offsets, **info})


def training_optimum(ctx: FitContext, start: FitResult, options: dict[str, Any]) -> FitResult:
    """The optimum of every training sample from the global schedule ``start`` (its logits and
    offsets; ``fit_oracle`` with ``options``), fitted once per cell: the oracle's trials and the
    predictors trained on it share it (``FitContext.shared``)."""
    init, offsets = torch.tensor(start.info["theta"]), offsets_of(start)
    settings = {"init": init.tolist(), "offsets": None if offsets is None else offsets.tolist(), "options": options}
    return ctx.shared("optimum", settings, lambda: fit_oracle(
        ctx.source, ctx.train, ctx.solver, ctx.steps, ctx.order, init=init, seed=ctx.seed, offsets=offsets,
        progress=ctx.progress, calls=ctx.calls, **options))


class Oracle(Method):
    """Per-sample optimal schedules (``fit_oracle``), starting from LD3's global schedule."""
    name = "oracle"
    nested = ("ld3",)
    options = declare(fit_oracle, ("source", "data", "solver", "steps", "order", "init", "seed", "offsets",
                                   "progress", "calls"),
                      choices={"space": SPACES, "loss": LOSS_NAMES, "explore_sampler": EXPLORE_SAMPLERS},
                      low={"iterations": 0, "restarts": 0, "restart_scale": 0, "explore_trials": 0},
                      positive=("lr",), extra=(START_SAMPLES, *NETWORK_OPTIONS.values()))

    def fit(self, ctx: FitContext, ld3: dict | None = None, start_samples: int = 50, **options: Any) -> FitResult:
        start = ld3_start(ctx, ld3 or {}, start_samples)
        if start.info.get("interrupted"):
            return start   # stopped while fitting the starting schedule: that is the best state there is
        result = training_optimum(ctx, start, options)
        result.info["init_theta"] = start.info["theta"]   # LD3's logits: where a refit on other samples starts
        return result

    def schedules_for(self, ctx: FitContext, result: FitResult, options: dict[str, Any],
                      data: TeacherData) -> Tensor:
        """The oracle's schedules belong to their own samples: refit on ``data`` with the same
        settings, from the same starting schedule."""
        init = torch.tensor(result.info["init_theta"]) if "init_theta" in result.info else None
        offsets = torch.tensor(result.info["offsets"]) if "offsets" in result.info else None
        own = {k: v for k, v in options.items() if k not in ("ld3", "start_samples")}
        return fit_oracle(ctx.source, data, result.solver, result.steps, result.order, init=init, seed=ctx.seed,
                          offsets=offsets, calls=ctx.calls, **own).per_sample

