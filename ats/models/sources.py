"""Named model sources: a network wrapped as ``model_fn`` with its noise schedule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..noise import NoiseSchedule, NoiseScheduleVP
from .gmm import GaussianMixture
from .wrapper import model_wrapper

DATASETS = ("gmm",)


@dataclass
class ModelSource:
    """What a sampler needs: ``model_fn(x, t)`` -> eps, its schedule and one sample's shape."""
    name: str
    model_fn: Callable[[Tensor, Tensor], Tensor]
    noise_schedule: NoiseSchedule
    shape: tuple[int, ...]

    def latents(self, seeds: Sequence[int], dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> Tensor:
        """x_T for each seed: sigma_T * N(0, I) drawn on the CPU from the seed's own
        generator (so sample i can be regenerated alone, on any device), then moved to
        ``device``. sigma_T = marginal_std(T): about 1 for VP schedules, sigma_max for EDM."""
        std = float(self.noise_schedule.marginal_std(torch.tensor(self.noise_schedule.T)))
        x = torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(int(s)),
                                     dtype=dtype) for s in seeds]) * std
        return x.to(device)


def gmm_source(dim: int = 16, components: int = 8, seed: int = 0,
               noise_schedule: NoiseSchedule | None = None) -> ModelSource:
    """A random Gaussian mixture (``GaussianMixture.random``) with its exact denoiser,
    on the VP linear schedule unless another is given."""
    ns = noise_schedule or NoiseScheduleVP("linear")
    gmm = GaussianMixture.random(dim, components, seed=seed)
    return ModelSource(f"gmm-{dim}d-{components}k-s{seed}", model_wrapper(gmm, ns, model_type="edm"), ns, (dim,))


def load_source(dataset: str, **options) -> ModelSource:
    """The model source named ``dataset``; unknown names get a one-line error."""
    if dataset == "gmm":
        return gmm_source(**options)
    raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
