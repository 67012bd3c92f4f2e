"""Noise schedules of diffusion models in continuous time.

x_t = alpha_t * x_0 + sigma_t * eps and lambda_t = log(alpha_t / sigma_t). Three families:
variance preserving (``NoiseScheduleVP``), EDM / variance exploding (``EDMSchedule``) and
rectified flow / flow matching (``RectifiedFlowSchedule``). The method
names follow DPM-Solver (``marginal_log_mean_coeff``, ``marginal_std``, ...), so code
written against DPM-Solver's ``NoiseScheduleVP`` reads the same here. Every method takes
a tensor ``t`` of any shape and is differentiable in it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, extrapolating the end segments.

    ``xp`` and ``fp`` must be on x's device and dtype, ``xp`` increasing; differentiable
    in ``x``; ``x`` may have any shape.
    """
    idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


class NoiseSchedule:
    """Common interface. Subclasses define ``marginal_log_mean_coeff``, ``marginal_std``
    and ``inverse_lambda``; ``T``/``eps`` are the default start and end times and
    ``t_min``/``t_max`` the range where times are valid."""

    T: float
    eps: float
    t_min: float
    t_max: float

    def marginal_log_mean_coeff(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def marginal_std(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse_lambda(self, lam: Tensor) -> Tensor:
        raise NotImplementedError

    def marginal_alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_lambda(self, t: Tensor) -> Tensor:
        return self.marginal_log_mean_coeff(t) - torch.log(self.marginal_std(t))

    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(alpha_t, sigma_t, lambda_t) in one pass; what every solver step needs."""
        return self.marginal_alpha(t), self.marginal_std(t), self.marginal_lambda(t)

    def edm_sigma(self, t: Tensor) -> Tensor:
        """sigma_t / alpha_t = exp(-lambda_t): the noise level of EDM's x / alpha_t."""
        return torch.exp(-self.marginal_lambda(t))

    def inverse_edm_sigma(self, sigma: Tensor) -> Tensor:
        return self.inverse_lambda(-torch.log(sigma))

    def _tensor(self, t) -> Tensor:
        return t if torch.is_tensor(t) else torch.tensor(t, dtype=torch.float64)


class NoiseScheduleVP(NoiseSchedule):
    """Variance-preserving schedules (alpha_t^2 + sigma_t^2 = 1), as in DPM-Solver.

    - ``"discrete"``: from a DDPM's ``betas`` or ``alphas_cumprod`` (N entries). The
      training step k sits at t_k = (k + 1) / N with log alpha = 0.5 log(alphas_cumprod[k]),
      interpolated piecewise-linearly in t. T = 1, eps = 1 / N.
    - ``"linear"``: log alpha_t = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2. T = 1, eps = 1e-3.
    - ``"cosine"``: log alpha_t = log cos(pi/2 (t+s)/(1+s)) - log cos(pi/2 s/(1+s)),
      s = 0.008. T = 0.9946, eps = 1e-3.
    """

    def __init__(self, schedule: str = "discrete", betas: Tensor | None = None,
                 alphas_cumprod: Tensor | None = None, beta_0: float = 0.1,
                 beta_1: float = 20., dtype: torch.dtype = torch.float64) -> None:
        if schedule not in ("discrete", "linear", "cosine"):
            raise ValueError(f"NoiseScheduleVP: unknown schedule {schedule!r}; "
                             "use 'discrete', 'linear' or 'cosine'")
        self.schedule = schedule
        if schedule == "discrete":
            if (betas is None) == (alphas_cumprod is None):
                raise ValueError("NoiseScheduleVP('discrete') needs exactly one of "
                                 "betas= or alphas_cumprod=")
            if betas is not None:
                betas = torch.as_tensor(betas, dtype=torch.float64)
                log_alphas = 0.5 * torch.cumsum(torch.log1p(-betas), dim=0)
            else:
                ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
                log_alphas = 0.5 * torch.log(ac)
            if log_alphas.ndim != 1 or len(log_alphas) < 2 or not torch.isfinite(log_alphas).all() \
                    or not (log_alphas[1:] < log_alphas[:-1]).all() or log_alphas[0] >= 0:
                raise ValueError("NoiseScheduleVP('discrete'): betas must lie in (0, 1) "
                                 "(alphas_cumprod strictly decreasing in (0, 1)), 1-D, 2+ entries")
            n = len(log_alphas)
            self.total_N = n
            self.t_array = torch.linspace(0., 1., n + 1, dtype=torch.float64)[1:]
            self.log_alpha_array = log_alphas
            self._tables: dict = {}
            self.T, self.eps = 1., 1. / n
            self.t_min, self.t_max = 1. / n, 1.
        elif schedule == "linear":
            self.beta_0, self.beta_1 = float(beta_0), float(beta_1)
            if not 0 <= self.beta_0 < self.beta_1:
                raise ValueError("NoiseScheduleVP('linear'): need 0 <= beta_0 < beta_1")
            self.T, self.eps = 1., 1e-3
            self.t_min, self.t_max = 0., 1.
        else:
            self.cosine_s = 0.008
            self.cosine_log_alpha_0 = math.log(math.cos(self.cosine_s / (1. + self.cosine_s) * math.pi / 2.))
            self.T, self.eps = 0.9946, 1e-3
            self.t_min, self.t_max = 0., 0.9946

    def _table(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(t_array, log_alpha_array) on like's device and dtype, converted once."""
        key = (like.device, like.dtype)
        if key not in self._tables:
            self._tables[key] = (self.t_array.to(like), self.log_alpha_array.to(like))
        return self._tables[key]

    def marginal_log_mean_coeff(self, t: Tensor) -> Tensor:
        t = self._tensor(t)
        if self.schedule == "discrete":
            return interp(t, *self._table(t))
        if self.schedule == "linear":
            return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        s = self.cosine_s
        return torch.log(torch.cos((t + s) / (1. + s) * math.pi / 2.)) - self.cosine_log_alpha_0

    def marginal_std(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2. * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: Tensor) -> Tensor:
        log_mean = self.marginal_log_mean_coeff(t)
        return log_mean - 0.5 * torch.log(-torch.expm1(2. * log_mean))

    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        log_mean = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(-torch.expm1(2. * log_mean))
        return torch.exp(log_mean), torch.exp(log_std), log_mean - log_std

    def inverse_lambda(self, lam: Tensor) -> Tensor:
        lam = self._tensor(lam)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2. * lam)
        if self.schedule == "discrete":
            t_array, log_alpha_array = self._table(lam)
            return interp(log_alpha, log_alpha_array.flip(0), t_array.flip(0))
        if self.schedule == "linear":
            tmp = 2. * (self.beta_1 - self.beta_0) * torch.logaddexp(-2. * lam, torch.zeros_like(lam))
            delta = self.beta_0 ** 2 + tmp
            return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)
        s = self.cosine_s
        return 2. * (1. + s) / math.pi * torch.arccos(torch.exp(log_alpha + self.cosine_log_alpha_0)) - s

    def __repr__(self) -> str:
        if self.schedule == "discrete":
            return f"NoiseScheduleVP('discrete', N={self.total_N})"
        if self.schedule == "linear":
            return f"NoiseScheduleVP('linear', beta_0={self.beta_0}, beta_1={self.beta_1})"
        return "NoiseScheduleVP('cosine')"


class EDMSchedule(NoiseSchedule):
    """EDM / variance-exploding: alpha_t = 1, sigma_t = t (time is the noise level).

    T = sigma_max, eps = sigma_min (Karras et al., 2022: 80 and 0.002)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError("EDMSchedule: need 0 < sigma_min < sigma_max")
        self.T, self.eps = float(sigma_max), float(sigma_min)
        self.t_min, self.t_max = 0., math.inf

    def marginal_log_mean_coeff(self, t: Tensor) -> Tensor:
        return torch.zeros_like(self._tensor(t))

    def marginal_std(self, t: Tensor) -> Tensor:
        return self._tensor(t)

    def marginal_lambda(self, t: Tensor) -> Tensor:
        return -torch.log(self._tensor(t))

    def inverse_lambda(self, lam: Tensor) -> Tensor:
        return torch.exp(-self._tensor(lam))

    def edm_sigma(self, t: Tensor) -> Tensor:
        return self._tensor(t).clone()   # sigma is t (a copy: callers may write into the result)

    def inverse_edm_sigma(self, sigma: Tensor) -> Tensor:
        return self._tensor(sigma).clone()

    def __repr__(self) -> str:
        return f"EDMSchedule(sigma_min={self.eps}, sigma_max={self.T})"


class RectifiedFlowSchedule(NoiseSchedule):
    """Rectified flow / flow matching (SD3-, FLUX-class models; diffusers'
    ``FlowMatchEulerDiscreteScheduler``) with a static ``shift`` s.

    The model's noise level (diffusers' sigma) is sigma_t = s t / (1 + (s - 1) t) and
    x_t = (1 - sigma_t) x_0 + sigma_t eps, so

        alpha_t = 1 - sigma_t = (1 - t) / (1 + (s - 1) t),   alpha_t + sigma_t = 1,
        lambda_t = log((1 - t) / t) - log s,   inverse_lambda: t = 1 / (1 + s e^lambda),
        edm_sigma = sigma_t / alpha_t = s t / (1 - t);

    with s = 1, alpha_t = 1 - t and sigma_t = t. ats time t is the unshifted time: the values
    ``set_timesteps(sigmas=...)`` takes before it applies the shift, and the network's time
    input is diffusers' timestep sigma_t * N (N = ``num_train_timesteps``). The shift is a
    constant offset in lambda: uniform-lambda schedules are the same times for any s, while
    ``time_uniform`` is the scheduler's own kind of default (uniform before the shift).

    eps = 1 / N: the scheduler's sigma_min. T = 1 - 1 / N: the training grid's second point
    (t = 1 is pure noise, alpha = 0 and lambda = -inf, where solvers in lambda cannot start;
    diffusers starts there, ats at sigma_T = s (N - 1) / (s (N - 1) + 1), about 1 / (s N) below).
    Valid times: (0, T].
    """

    def __init__(self, shift: float = 1., num_train_timesteps: int = 1000) -> None:
        if not (isinstance(shift, (int, float)) and not isinstance(shift, bool) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"RectifiedFlowSchedule: shift must be a positive number, got {shift!r}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"RectifiedFlowSchedule: num_train_timesteps must be an integer >= 2, "
                             f"got {num_train_timesteps!r}")
        self.shift, self.total_N = float(shift), num_train_timesteps
        self.log_shift = math.log(self.shift)
        self.T, self.eps = 1. - 1. / num_train_timesteps, 1. / num_train_timesteps
        self.t_min, self.t_max = 0., self.T

    def marginal_log_mean_coeff(self, t: Tensor) -> Tensor:
        t = self._tensor(t)
        return torch.log1p(-t) - torch.log1p((self.shift - 1.) * t)

    def marginal_std(self, t: Tensor) -> Tensor:
        """The model's sigma: s t / (1 + (s - 1) t)."""
        t = self._tensor(t)
        return self.shift * t / (1. + (self.shift - 1.) * t)

    def marginal_lambda(self, t: Tensor) -> Tensor:
        t = self._tensor(t)
        return torch.log1p(-t) - torch.log(t) - self.log_shift

    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = self._tensor(t)
        denom = 1. + (self.shift - 1.) * t
        return (1. - t) / denom, self.shift * t / denom, self.marginal_lambda(t)

    def inverse_lambda(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(-self._tensor(lam) - self.log_shift)

    def edm_sigma(self, t: Tensor) -> Tensor:
        t = self._tensor(t)
        return self.shift * t / (1. - t)

    def inverse_edm_sigma(self, sigma: Tensor) -> Tensor:
        sigma = self._tensor(sigma)
        return sigma / (self.shift + sigma)

    def inverse_model_sigma(self, sigma: Tensor) -> Tensor:
        """t from the model's sigma: sigma / (s - (s - 1) sigma), the inverse of ``marginal_std``."""
        sigma = self._tensor(sigma)
        return sigma / (self.shift - (self.shift - 1.) * sigma)

    def __repr__(self) -> str:
        return f"RectifiedFlowSchedule(shift={self.shift!r}, N={self.total_N})"
