"""Fixed discretizations (baselines): N+1 decreasing times from t_start to t_end.

- ``time_uniform``: linspace(t_start, t_end, N+1).
- ``logSNR``: uniform in lambda_t = log(alpha_t / sigma_t) (DPM-Solver's default).
- ``time_quadratic``: linspace(sqrt(t_start), sqrt(t_end), N+1) ** 2.
- ``edm`` / ``poly``: polynomial in the EDM noise level sigma = sigma_t / alpha_t,
  sigma_i = (smax^(1/rho) + i/N (smin^(1/rho) - smax^(1/rho)))^rho, with rho = 7 for
  ``edm`` (Karras et al., 2022) and the given ``rho`` for ``poly``.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from .noise import NoiseSchedule

KINDS = ("time_uniform", "logSNR", "time_quadratic", "edm", "poly")
FIXED = KINDS[:4]   # the fixed discretizations every comparison shows (poly needs a degree)


def check_time_range(noise_schedule: NoiseSchedule, t: Tensor, name: str) -> None:
    """Raise a one-line ValueError unless every t is finite and inside the schedule's range."""
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    lo, hi = noise_schedule.t_min, noise_schedule.t_max
    tol = 1e-6 * max(1., abs(hi) if hi != float("inf") else 1.)
    low_ok = (t >= lo - tol).all() if noise_schedule.t_min > 0 else (t > 0).all()
    if not low_ok or not (t <= hi + tol).all():
        bound = f"[{lo:g}, {hi:g}]" if lo > 0 else f"(0, {hi:g}]"
        raise ValueError(f"{name} out of range: values in [{t.min().item():g}, {t.max().item():g}], "
                         f"but {noise_schedule!r} accepts {bound}")


def time_ends(noise_schedule: NoiseSchedule, t_start: float | None = None, t_end: float | None = None,
              dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """[t_start, t_end] (defaults T and eps), checked to lie in range with t_start > t_end."""
    ends = torch.tensor([noise_schedule.T if t_start is None else float(t_start),
                         noise_schedule.eps if t_end is None else float(t_end)], dtype=dtype, device=device)
    check_time_range(noise_schedule, ends, "t_start/t_end")
    if not ends[0] > ends[1]:
        raise ValueError(f"t_start ({ends[0].item():g}) must be greater than t_end ({ends[1].item():g})")
    return ends


def get_timesteps(noise_schedule: NoiseSchedule, kind: str, steps: int,
                  t_start: float | None = None, t_end: float | None = None, rho: float = 7.,
                  dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """N+1 decreasing times from ``t_start`` (default T) to ``t_end`` (default eps), exact ends."""
    if kind not in KINDS:
        raise ValueError(f"unknown discretization kind {kind!r}; choose one of {', '.join(KINDS)}")
    try:
        n = operator.index(steps)
    except TypeError:
        n = 0
    if n < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    steps = n
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ends = time_ends(noise_schedule, t_start, t_end, dtype, device)
    t_start, t_end = ends.tolist()
    u = torch.linspace(0., 1., steps + 1, dtype=dtype, device=device)
    if kind == "time_uniform":
        t = t_start + (t_end - t_start) * u
    elif kind == "time_quadratic":
        t = (t_start ** 0.5 + (t_end ** 0.5 - t_start ** 0.5) * u) ** 2
    elif kind == "logSNR":
        lam_start, lam_end = noise_schedule.marginal_lambda(ends)
        t = noise_schedule.inverse_lambda(lam_start + (lam_end - lam_start) * u)
    else:
        r = 7. if kind == "edm" else float(rho)
        smax, smin = noise_schedule.edm_sigma(ends)
        sigma = (smax ** (1 / r) + u * (smin ** (1 / r) - smax ** (1 / r))) ** r
        t = noise_schedule.inverse_edm_sigma(sigma)
    t[0], t[-1] = t_start, t_end
    return t
