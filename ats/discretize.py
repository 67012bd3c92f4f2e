"""Fixed discretizations (baselines): N+1 decreasing times from t_start to t_end.

- ``time_uniform``: linspace(t_start, t_end, N+1).
- ``logSNR``: uniform in lambda_t = log(alpha_t / sigma_t) (DPM-Solver's default).
- ``time_quadratic``: linspace(sqrt(t_start), sqrt(t_end), N+1) ** 2.
- ``edm`` / ``poly``: polynomial in the EDM noise level sigma = sigma_t / alpha_t,
  sigma_i = (smax^(1/rho) + i/N (smin^(1/rho) - smax^(1/rho)))^rho, with rho = 7 for
  ``edm`` (Karras et al., 2022) and the given ``rho`` for ``poly``.
- ``ays_timesteps``: the Align Your Steps reference schedules diffusers ships (SD 1.5, SDXL,
  SVD), interpolated log-linearly in sigma to other step counts; only for those families.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from .noise import EDMSchedule, NoiseSchedule, NoiseScheduleVP, interp

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


def step_count(steps: object) -> int:
    """``steps`` as an int >= 1; a one-line ValueError otherwise."""
    try:
        n = operator.index(steps)
    except TypeError:
        n = 0
    if n < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return n


def get_timesteps(noise_schedule: NoiseSchedule, kind: str, steps: int,
                  t_start: float | None = None, t_end: float | None = None, rho: float = 7.,
                  dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """N+1 decreasing times from ``t_start`` (default T) to ``t_end`` (default eps), exact ends."""
    if kind not in KINDS:
        raise ValueError(f"unknown discretization kind {kind!r}; choose one of {', '.join(KINDS)}")
    steps = step_count(steps)
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


# Align Your Steps (Sabour et al., 2024): diffusers ships the 10-step lists (``AysSchedules``).
AYS_FAMILIES = {"sd15": "StableDiffusionTimesteps", "sdxl": "StableDiffusionXLTimesteps",
                "svd": "StableDiffusionVideoSigmas"}
AYS = "ays"   # the Align Your Steps reference schedules, a baseline for the pipelines of AYS_PIPELINES
AYS_PIPELINES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl",
                 "StableVideoDiffusionPipeline": "svd"}   # a pipeline's class -> its AYS family
_SD_SIGMA_MAX, _SVD_SIGMA_MAX = 14.6146, 700.   # the families' largest sigma_t / alpha_t


def _check_ays_family(noise_schedule: NoiseSchedule, family: str) -> None:
    if family not in AYS_FAMILIES:
        raise ValueError(f"no AYS reference schedule for family {family!r}; diffusers ships "
                         f"{', '.join(AYS_FAMILIES)} (Stable Diffusion 1.5, SDXL, Stable Video Diffusion)")
    top = float(noise_schedule.edm_sigma(torch.tensor(noise_schedule.T, dtype=torch.float64)))
    if family == "svd":
        fits = isinstance(noise_schedule, EDMSchedule) and abs(top / _SVD_SIGMA_MAX - 1) < 1e-3
        want = "an EDM schedule with sigma_max 700 (Stable Video Diffusion)"
    else:
        fits = isinstance(noise_schedule, NoiseScheduleVP) and noise_schedule.schedule == "discrete" \
            and noise_schedule.total_N == 1000 and abs(top / _SD_SIGMA_MAX - 1) < 1e-3
        want = "the Stable Diffusion schedule (1000 scaled_linear DDPM steps, sigma_max 14.6146)"
    if not fits:
        raise ValueError(f"the AYS {family} schedule is tuned for {want}, not {noise_schedule!r} "
                         f"(sigma_max {top:.6g}); it is offered only for the models of its family")


def ays_timesteps(noise_schedule: NoiseSchedule, steps: int, family: str, dtype: torch.dtype = torch.float64,
                  device: torch.device | str | None = None) -> Tensor:
    """The Align Your Steps reference schedule (Sabour et al., 2024) of ``family`` (``sd15``,
    ``sdxl``, ``svd``) with ``steps`` steps: N+1 decreasing times.

    Reference: diffusers' ``AysSchedules`` 10-step list (the network's 10 training steps k for
    SD 1.5 / SDXL, t = (k + 1) / 1000; the 10 nonzero sigmas for SVD, t = sigma), then the
    schedule's end eps (ats ends there, where AYS lists append sigma 0). Other step counts
    interpolate log sigma (sigma = sigma_t / alpha_t) linearly over the normalised step index,
    as AYS does: log sigma_i = interp(i / N, j / 10, log sigma_ref_j); 10 steps are the list itself.
    The schedule must be of the family (``ValueError`` otherwise).
    """
    _check_ays_family(noise_schedule, family)
    n = step_count(steps)
    try:
        from diffusers.schedulers import AysSchedules
    except ImportError:
        raise ImportError("the AYS reference schedules come from diffusers: pip install diffusers") from None
    ref = torch.tensor(AysSchedules[AYS_FAMILIES[family]], dtype=torch.float64)
    if family == "svd":
        ref_t = noise_schedule.inverse_edm_sigma(ref[ref > 0])
    else:
        ref_t = (ref + 1) / noise_schedule.total_N
    ref_t = torch.cat([ref_t, torch.tensor([noise_schedule.eps], dtype=torch.float64)])
    if n == len(ref_t) - 1:
        t = ref_t
    else:
        log_sigma = torch.log(noise_schedule.edm_sigma(ref_t))
        u = torch.linspace(0., 1., n + 1, dtype=torch.float64)
        ref_u = torch.linspace(0., 1., len(ref_t), dtype=torch.float64)
        t = noise_schedule.inverse_edm_sigma(torch.exp(interp(u, ref_u, log_sigma)))
        t[0], t[-1] = ref_t[0], ref_t[-1]
    return t.to(dtype=dtype, device=device)
