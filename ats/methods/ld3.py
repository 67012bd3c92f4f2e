"""LD3: learn one global discretization from a few teacher samples (Tong et al., ICLR 2025).

Student: the solver with N steps on t = timesteps_from_logits(theta) and network times
s = t + xi (decoupled conditioning). Loss: mean distance between the student's output from
x'_T and the teacher's x0* from x_T, where each training sample's latent x'_T may move
inside a small ball ||x'_T - x_T|| <= r (in unit-noise space), one projected gradient step
per iteration, kept only where the sample's loss dropped; this slack keeps the schedule from
overfitting to a handful of samples. theta: RMSprop (lr 5e-3, momentum 0.9, gradient norm
clipped to 1); xi: SGD (lr 0.1 / N). Validation after every epoch; after ``patience`` epochs
without improvement the best state is reloaded and both learning rates shrink by 0.8
(torch's ReduceLROnPlateau).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..discretize import FIXED, get_timesteps
from ..losses import LOSS_NAMES, TeacherLoss, teacher_loss
from ..models.base import ModelSource
from ..params import SPACES, carried_cond_timesteps, logits_from_timesteps, offset_cond_timesteps, timesteps_from_logits
from ..solvers import NetworkCalls, sample, solver_spec
from ..teacher import TeacherData
from ..options import declare
from .base import NETWORK_OPTIONS, FitContext, Method, Progress
from .common import FitDiverged, FitResult, assert_monotone, check_finite

OPTIMIZERS = ("rmsprop", "adam")


def default_ball_radius(dim: int, steps: int) -> float:
    """LD3's default: r = 0.001 * dim / N^2 (unit-noise space)."""
    return 0.001 * dim / steps ** 2


class Student:
    """theta (and xi) -> the solver's output; shared by LD3 and the per-sample methods.
    ``calls``: how the solver calls the network (checkpointing, precision)."""

    def __init__(self, source: ModelSource, solver: str, order: int | None, space: str = "lambda",
                 offsets: Tensor | None = None, calls: NetworkCalls = NetworkCalls()) -> None:
        solver_spec(solver, order)
        self.source, self.solver, self.order, self.space, self.calls = source, solver, order, space, calls
        self.offsets = offsets   # a global schedule's s - t, carried to every schedule without its own xi
        self.sigma_T = float(source.noise_schedule.marginal_std(torch.tensor(source.noise_schedule.T)))

    def timesteps(self, theta: Tensor) -> Tensor:
        return timesteps_from_logits(theta, self.source.noise_schedule, space=self.space)

    def __call__(self, theta: Tensor, xi: Tensor | None, unit_latents: Tensor, labels: Tensor | None) -> Tensor:
        ts = self.timesteps(theta)
        if xi is not None:
            cs = offset_cond_timesteps(ts.expand(*xi.shape[:-1], -1) if xi.ndim > ts.ndim else ts, xi)
        else:
            cs = None if self.offsets is None else carried_cond_timesteps(ts, self.offsets.to(ts))
        return sample(self.source.model_fn_for(labels), self.source.noise_schedule, unit_latents * self.sigma_T,
                      ts, self.solver, order=self.order, cond_timesteps=cs, **self.calls.kwargs)


def best_fixed_logits(student: Student, loss_fn: TeacherLoss, data: TeacherData, steps: int) -> Tensor:
    """Logits of the fixed discretization with the lowest mean loss on ``data`` (its targets in
    the loss's space: ``loss_fn.targets``)."""
    ns = student.source.noise_schedule
    best, best_loss = None, float("inf")
    for kind in FIXED:
        theta = logits_from_timesteps(get_timesteps(ns, kind, steps, dtype=data.latents.dtype), ns, student.space)
        with torch.no_grad():
            value = loss_fn(student(theta, None, data.latents / student.sigma_T, data.labels), data.targets).mean().item()
        if value < best_loss:
            best, best_loss = theta, value
    return best


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


def fit_ld3(source: ModelSource, train: TeacherData, valid: TeacherData, solver: str, steps: int,
            order: int | None = None, space: str = "lambda", loss: str = "l2", epochs: int = 150,
            batch_size: int = 50, lr: float = 5e-3, optimizer: str = "rmsprop", xi_lr: float | None = None,
            learn_xi: bool = True,
            ball_radius: float | None = None, patience: int = 5, decay: float = 0.8, seed: int = 0,
            init: Tensor | None = None, start: str = "best",
            progress: Progress | None = None, calls: NetworkCalls = NetworkCalls()) -> FitResult:
    """Fit theta (and xi) on ``train``, select on ``valid``; returns the best validation state.
    ``init``: starting logits [N+1]; else ``start``: a fixed discretization (time_uniform,
    logSNR, time_quadratic, edm), or "best", the one with the lowest validation loss, so the
    fit never starts behind it (a search can choose ``start`` by the validation FID instead:
    teacher loss and FID can rank the fixed schedules differently).
    ``progress("ld3", epoch, valid_loss)`` after every epoch. Ctrl-C returns the best state
    so far (``info['interrupted']``); a non-finite loss raises FitDiverged with the best
    state so far as ``.result``. ``calls``: how the solver calls the network (checkpointing,
    precision; ``NetworkCalls``). The loss compares in the source's ``loss_space``
    (``teacher_loss``)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1 or epochs < 0:
        raise ValueError(f"batch_size must be >= 1 and epochs >= 0, got {batch_size} and {epochs}")
    loss_fn = teacher_loss(loss, source, calls)
    train, valid = loss_fn.targets(train), loss_fn.targets(valid)
    student = Student(source, solver, order, space, calls=calls)
    dtype, device = train.latents.dtype, train.latents.device
    g = torch.Generator().manual_seed(seed)
    if init is None and start == "best":
        init = best_fixed_logits(student, loss_fn, valid, steps)
    elif init is None:
        if start not in FIXED:
            raise ValueError(f"start must be 'best' or one of {', '.join(FIXED)}, got {start!r}")
        init = logits_from_timesteps(get_timesteps(source.noise_schedule, start, steps, dtype=dtype),
                                     source.noise_schedule, space)
    theta = torch.as_tensor(init).detach().clone().to(dtype=dtype, device=device)
    if theta.shape != (steps + 1,):
        raise ValueError(f"init must be logits of shape [{steps + 1}], got {tuple(theta.shape)}")
    theta.requires_grad_(True)
    xi = torch.zeros(steps + 1, dtype=dtype, device=device, requires_grad=True) if learn_xi else None
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'rmsprop' (LD3's) or 'adam'")
    opt = torch.optim.RMSprop([theta], lr=lr, momentum=0.9) if optimizer == "rmsprop" else torch.optim.Adam([theta], lr=lr)
    xi_opt = torch.optim.SGD([xi], lr=0.1 / steps if xi_lr is None else xi_lr) if learn_xi else None
    plateau = [torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=decay, patience=patience)
               for o in (opt, xi_opt) if o is not None]
    u0 = train.latents / student.sigma_T
    u = u0.clone()
    radius = default_ball_radius(u0[0].numel(), steps) if ball_radius is None else ball_radius
    history = {"train_loss": [], "valid_loss": []}
    best = {"valid": float("inf"), "theta": theta.detach().clone(), "xi": None if xi is None else xi.detach().clone()}

    def validate() -> float:
        with torch.no_grad():
            out = student(theta, xi, valid.latents / student.sigma_T, valid.labels)
            return loss_fn(out, valid.targets).mean().item()

    def result(**info) -> FitResult:
        ts = student.timesteps(best["theta"]).detach()
        assert_monotone(ts)
        cs = None if best["xi"] is None else offset_cond_timesteps(ts, best["xi"]).detach()
        return FitResult("ld3", solver, order, steps, timesteps=ts, cond_timesteps=cs, history=history,
                         info={"theta": best["theta"].tolist(), "space": space, "loss": loss,
                               "best_valid_loss": best["valid"], "ball_radius": radius, **info})

    start_valid = float("nan")

    epoch = -1
    try:
        best["valid"] = start_valid = validate()
        for epoch in range(epochs):
            losses = []
            for idx in _batches(len(u), batch_size, g):
                labels = None if train.labels is None else train.labels[idx]
                latent = u[idx].clone().requires_grad_(True)
                per_sample = loss_fn(student(theta, xi, latent, labels), train.targets[idx])
                value = check_finite(per_sample.mean(), epoch)
                opt.zero_grad(set_to_none=True)
                if xi_opt is not None:
                    xi_opt.zero_grad(set_to_none=True)
                per_sample.mean().backward()
                check_finite(torch.nn.utils.clip_grad_norm_([theta], 1.), epoch, "gradient norm")
                opt.step()
                if xi_opt is not None:
                    xi_opt.step()
                losses.append(value)
                with torch.no_grad():  # one projected step of the latents, kept where it helps
                    grad = latent.grad.flatten(1)
                    move = (u[idx] - u0[idx]).flatten(1) - radius * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
                    move = move * (radius / move.norm(dim=1, keepdim=True).clamp_min(radius))
                    candidate = u0[idx] + move.view_as(latent)
                    # Current and moved latents under the updated schedule, in one solver call.
                    both = loss_fn(student(theta, xi, torch.cat([latent.detach(), candidate]),
                                           None if labels is None else torch.cat([labels, labels])),
                                   torch.cat([train.targets[idx]] * 2))
                    better = both[len(idx):] < both[:len(idx)]
                    u[idx[better]] = candidate[better]
            val = check_finite(validate(), epoch, "validation loss")
            history["train_loss"].append(sum(losses) / len(losses))
            history["valid_loss"].append(val)
            if val < best["valid"]:
                best.update(valid=val, theta=theta.detach().clone(),
                            xi=None if xi is None else xi.detach().clone())
            lr_before = opt.param_groups[0]["lr"]
            for p in plateau:
                p.step(val)
            if opt.param_groups[0]["lr"] < lr_before:  # plateau: restart from the best state
                with torch.no_grad():
                    theta.copy_(best["theta"])
                    if xi is not None:
                        xi.copy_(best["xi"])
            if progress is not None:
                progress("ld3", epoch, val)
    except FitDiverged as e:
        e.result = result(diverged=str(e), epochs=epoch)
        raise
    except KeyboardInterrupt:
        return result(interrupted=True, epochs=epoch)
    return result(epochs=epochs, start_valid_loss=start_valid)


class LD3(Method):
    """One global schedule learned from teacher samples (``fit_ld3``)."""
    name = "ld3"
    options = declare(fit_ld3, ("source", "train", "valid", "solver", "steps", "order", "seed", "init", "progress",
                                "calls"),
                      choices={"space": SPACES, "loss": LOSS_NAMES, "optimizer": OPTIMIZERS,
                               "start": ("best",) + FIXED},
                      low={"epochs": 0, "batch_size": 1, "patience": 0, "ball_radius": 0},
                      positive=("lr", "xi_lr", "decay"), extra=NETWORK_OPTIONS.values())

    def fit(self, ctx: FitContext, **options: Any) -> FitResult:
        return fit_ld3(ctx.source, ctx.train, ctx.valid, ctx.solver, ctx.steps, ctx.order, seed=ctx.seed,
                       progress=ctx.progress, calls=ctx.calls, **options)


def ld3_start(ctx: FitContext, options: dict[str, Any], samples: int) -> FitResult:
    """LD3 on the first ``samples`` training samples: the global schedule that the per-sample
    methods start from (its ``info["theta"]``), fitted once per cell and shared by its trials
    (``FitContext.shared``). Stopped by Ctrl-C, its best state is marked ``info["interrupted_in"]
    = "ld3_start"``: the caller returns it as the best state there is."""
    result = ctx.shared("ld3_start", {"options": options, "samples": samples}, lambda: fit_ld3(
        ctx.source, ctx.train.first(samples), ctx.valid, ctx.solver, ctx.steps, ctx.order, seed=ctx.seed,
        progress=ctx.progress, calls=ctx.calls, **options))
    if result.info.get("interrupted"):
        result.info["interrupted_in"] = "ld3_start"
    return result
