"""An analytic Gaussian mixture: data distribution and its exact denoiser.

p(x0) = sum_k w_k N(x0; mu_k, diag(s_k^2)). For y = x0 + sigma * eps (EDM's scaled
variable y = x_t / alpha_t, sigma = sigma_t / alpha_t), y | k ~ N(mu_k, s_k^2 + sigma^2), so

    E[x0 | y] = sum_k gamma_k(y) (mu_k + s_k^2 / (s_k^2 + sigma^2) (y - mu_k)),

with gamma_k the posterior responsibilities. The module is an EDM denoiser D(y; sigma):
wrap it with ``model_wrapper(gmm, noise_schedule, model_type="edm")`` for any VP or EDM
schedule, and it is the exact model of its own data.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..metrics import Coordinates, frechet_metric
from ..noise import NoiseSchedule, NoiseScheduleVP
from .base import ModelSource, digest
from .wrapper import model_wrapper


class GaussianMixture(nn.Module):
    """Mixture of K diagonal Gaussians in D dimensions (``means`` [K, D], ``stds`` [K] or
    [K, D], ``weights`` [K], normalised here)."""

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"GaussianMixture: means must be [K, D], got shape {tuple(means.shape)}")
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        stds = (stds[:, None] if stds.ndim == 1 else stds).expand(k, d).clone()
        weights = torch.full((k,), 1. / k, dtype=torch.float64) if weights is None \
            else torch.as_tensor(weights, dtype=torch.float64)
        if (stds <= 0).any() or (weights <= 0).any() or weights.shape != (k,):
            raise ValueError("GaussianMixture: stds and weights must be positive, weights of shape [K]")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))

    @classmethod
    def random(cls, dim: int, n_components: int, seed: int = 0, spread: float = 1.,
               std_range: tuple[float, float] = (0.05, 0.3)) -> "GaussianMixture":
        """Means ~ N(0, 4 spread^2 / dim I), per-component isotropic scales log-uniform in
        ``std_range``, weights uniform in [0.5, 1.5] before normalising; reproducible from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(n_components, dim, generator=g, dtype=torch.float64) * spread * 2 / math.sqrt(dim)
        lo, hi = math.log(std_range[0]), math.log(std_range[1])
        stds = torch.exp(lo + (hi - lo) * torch.rand(n_components, generator=g, dtype=torch.float64))
        weights = 0.5 + torch.rand(n_components, generator=g, dtype=torch.float64)
        return cls(means, stds, weights)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples of x0 (float64), drawn on the generator's device (CPU by default)
        and returned on the mixture's."""
        where = generator.device if generator is not None else torch.device("cpu")
        k = torch.multinomial(self.log_weights.exp().to(where), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=where)
        k, noise = k.to(self.means.device), noise.to(self.means.device)
        return self.means[k] + self.stds[k] * noise

    def forward(self, y: Tensor, sigma: Tensor) -> Tensor:
        """E[x0 | x0 + sigma * eps = y]; y [B, D], sigma scalar or [B]."""
        dtype = y.dtype
        means, stds, log_w = (b.to(dtype) for b in (self.means, self.stds, self.log_weights))
        sigma = torch.as_tensor(sigma, dtype=dtype, device=y.device).reshape(-1, 1, 1)
        var = stds ** 2 + sigma ** 2                                  # [B|1, K, D]
        diff = y[:, None, :] - means                                  # [B, K, D]
        log_p = log_w - 0.5 * (diff ** 2 / var + torch.log(var)).sum(-1)
        gamma = torch.softmax(log_p, dim=-1)                          # [B, K]
        post_mean = means + stds ** 2 / var * diff                    # [B, K, D]
        return torch.einsum("bk,bkd->bd", gamma, post_mean)


def gmm_metric(gmm, n_reference: int = 100000, seed: int = 12345):
    """Frechet distance on raw coordinates against a large exact sample of the mixture."""
    metric = frechet_metric(Coordinates(gmm.dim))
    ref = gmm.sample(n_reference, generator=torch.Generator().manual_seed(seed))
    for chunk in ref.split(10000):
        metric.update(chunk.to(metric.device), real=True)
    return metric


def gmm_source(dim: int = 16, components: int = 8, seed: int = 0,
               noise_schedule: NoiseSchedule | None = None) -> ModelSource:
    """A random Gaussian mixture (``GaussianMixture.random``) with its exact denoiser, on the
    VP linear schedule unless another is given; FID is the Frechet distance on coordinates."""
    ns = noise_schedule or NoiseScheduleVP("linear")
    gmm = GaussianMixture.random(dim, components, seed=seed)
    identity = digest({"gmm": [gmm.means.tolist(), gmm.stds.tolist(), gmm.log_weights.tolist()],
                        "schedule": repr(ns)})
    return ModelSource(f"gmm-{dim}d-{components}k-s{seed}", lambda labels: model_wrapper(gmm, ns, model_type="edm"),
                       ns, (dim,), identity, lambda: gmm_metric(gmm), dtype=torch.float64, info={"gmm": gmm},
                       networks=(gmm,), real_data=lambda n, seed: gmm.sample(n, generator=torch.Generator().manual_seed(seed)))
