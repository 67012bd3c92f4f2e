"""Learnable schedule parameterizations (LD3, Tong et al., ICLR 2025) and conditioning offsets.

Simplex parameterization: logits theta [..., N+1], p = softmax(theta), c = cumsum(p),

    u_i = (c_i - c_0) / (c_N - c_0),   lambda_i = lambda_start + (lambda_end - lambda_start) u_i,

and t_i = inverse_lambda(lambda_i) (``space="lambda"``) or t_i = t_start + (t_end - t_start) u_i
(``space="time"``). The ends are exact, the steps strictly monotone for any finite theta,
and all-equal logits give the logSNR (resp. time-uniform) schedule. theta_0 cancels out
(u depends on p_1..p_N only); it is kept so a schedule's logits have its N+1 entries.
Shapes: [N+1] for one global schedule, [B, N+1] for one schedule per sample.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .discretize import time_ends
from .noise import NoiseSchedule

SPACES = ("lambda", "time")


def _check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"unknown parameterization space {space!r}; choose 'lambda' or 'time'")


def timesteps_from_logits(theta: Tensor, noise_schedule: NoiseSchedule, t_start: float | None = None,
                          t_end: float | None = None, space: str = "lambda") -> Tensor:
    """Decreasing times [..., N+1] from logits [..., N+1] (see module docstring)."""
    _check_space(space)
    if theta.shape[-1] < 2:
        raise ValueError(f"theta needs N+1 >= 2 entries in its last dimension, got {theta.shape[-1]}")
    if not torch.isfinite(theta).all():
        raise ValueError("theta contains NaN or inf; the schedule would not be monotone")
    c = torch.cumsum(torch.softmax(theta, dim=-1), dim=-1)
    u = (c - c[..., :1]) / (c[..., -1:] - c[..., :1])
    ends = time_ends(noise_schedule, t_start, t_end, theta.dtype, theta.device)
    if space == "time":
        t = ends[0] + (ends[1] - ends[0]) * u
    else:
        lam = noise_schedule.marginal_lambda(ends)
        t = noise_schedule.inverse_lambda(lam[0] + (lam[1] - lam[0]) * u)
    interior = t[..., 1:-1]
    shape = t.shape[:-1] + (1,)
    return torch.cat([ends[0].expand(shape), interior, ends[1].expand(shape)], dim=-1)


def logits_from_timesteps(timesteps: Tensor, noise_schedule: NoiseSchedule, space: str = "lambda") -> Tensor:
    """Logits whose schedule is ``timesteps`` (with its own ends): theta_i = log of the i-th
    gap in lambda (or t), theta_0 = 0. Use it to start a fit from any discretization."""
    _check_space(space)
    v = noise_schedule.marginal_lambda(timesteps) if space == "lambda" else -timesteps
    gaps = v[..., 1:] - v[..., :-1]
    if not (gaps > 0).all():
        raise ValueError("timesteps must be strictly decreasing to be turned into logits")
    logits = torch.log(gaps / gaps.sum(-1, keepdim=True))
    return torch.cat([torch.zeros_like(logits[..., :1]), logits], dim=-1)


def offset_cond_timesteps(timesteps: Tensor, xi: Tensor) -> Tensor:
    """LD3's decoupled conditioning: s_i = t_i + xi_i, with xi clipped to half the
    smallest step of the schedule and zero at both ends. ``xi`` has the shape of
    ``timesteps`` ([N+1] or [B, N+1])."""
    if xi.shape != timesteps.shape:
        raise ValueError(f"xi must have the shape of timesteps {tuple(timesteps.shape)}, got {tuple(xi.shape)}")
    bound = 0.5 * (timesteps[..., :-1] - timesteps[..., 1:]).min(dim=-1, keepdim=True).values
    xi = torch.maximum(torch.minimum(xi, bound), -bound)
    mask = torch.ones_like(xi)
    mask[..., 0] = 0.
    mask[..., -1] = 0.
    return timesteps + xi * mask


def carried_cond_time(t: Tensor, t_prev: Tensor, t_end: Tensor | float, xi: Tensor | float) -> Tensor:
    """A global schedule's conditioning offset ``xi`` (its s_j - t_j, already clipped) carried
    to another time t_j at index j: s_j = t_j + clamp(xi, -(t_j - t_end) / 2, (t_{j-1} - t_j) / 2).
    It needs only the step before and the end, so a schedule chosen step by step can apply it;
    on the global schedule itself it changes nothing (its offsets lie within half its smallest
    step), and s_j stays strictly between t_end and t_{j-1}."""
    xi = torch.as_tensor(xi, dtype=t.dtype, device=t.device)
    return t + torch.maximum(torch.minimum(xi, 0.5 * (t_prev - t)), -0.5 * (t - t_end))


def carried_cond_timesteps(timesteps: Tensor, xi: Tensor) -> Tensor:
    """``carried_cond_time`` at every inner time of ``timesteps`` ([N+1] or [B, N+1]); ``xi``
    [N+1] (its ends are ignored: the first and last times are never offset)."""
    inner = carried_cond_time(timesteps[..., 1:-1], timesteps[..., :-2], timesteps[..., -1:], xi[1:-1])
    return torch.cat([timesteps[..., :1], inner, timesteps[..., -1:]], dim=-1)


def ratio_cond_timesteps(timesteps: Tensor, ratios: Tensor) -> Tensor:
    """TimeTuner's decoupled conditioning: the network at step i sees s_i = r_i * t_i.
    ``ratios`` has one entry per step, [N] or [B, N], the last one held at 1 (whatever
    is passed there); the final time t_N is never changed."""
    if ratios.shape[:-1] != timesteps.shape[:-1] or ratios.shape[-1] != timesteps.shape[-1] - 1:
        raise ValueError(f"ratios must have shape [..., N] = {tuple(timesteps.shape[:-1]) + (timesteps.shape[-1] - 1,)}, "
                         f"got {tuple(ratios.shape)}")
    ones = torch.ones_like(ratios[..., :1])
    r = torch.cat([ratios[..., :-1], ones, ones], dim=-1)
    return timesteps * r
