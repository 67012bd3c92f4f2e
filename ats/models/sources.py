"""Named model sources: a network wrapped as ``model_fn`` with its noise schedule, the
shape of one sample, a stable identity (for caches) and the FID that fits its data."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..noise import NoiseSchedule, NoiseScheduleVP
from ..solvers import ModelFn
from .gmm import GaussianMixture
from .wrapper import model_wrapper

DATASETS = ("gmm", "digits", "cifar10")


@dataclass
class ModelSource:
    """What a sampler needs: ``model_fn_for(labels)`` -> ``model_fn(x, t)`` (eps), the
    schedule, one sample's shape, and for conditional models the number of classes."""
    name: str
    model_fn_for: Callable[[Tensor | None], ModelFn]
    noise_schedule: NoiseSchedule
    shape: tuple[int, ...]
    identity: str                                   # hash of everything that defines the model
    make_metric: Callable[[], Any]                  # torchmetrics FID with its real side loaded
    num_classes: int = 0
    dtype: torch.dtype = torch.float32              # what sampling runs in
    info: dict = field(default_factory=dict)
    networks: tuple[torch.nn.Module, ...] = ()      # what ``to`` moves

    def to(self, device: torch.device | str) -> "ModelSource":
        """Move the networks (in place) to ``device``; samplers follow their inputs' device."""
        for net in self.networks:
            net.to(device)
        return self

    @property
    def model_fn(self) -> ModelFn:
        """The unconditional model."""
        return self.model_fn_for(None)

    def latents(self, seeds: Sequence[int], dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> Tensor:
        """x_T for each seed: sigma_T * N(0, I) drawn on the CPU from the seed's own
        generator (so sample i can be regenerated alone, on any device), then moved to
        ``device``. sigma_T = marginal_std(T): about 1 for VP schedules, sigma_max for EDM."""
        std = float(self.noise_schedule.marginal_std(torch.tensor(self.noise_schedule.T)))
        x = torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(int(s)),
                                     dtype=dtype) for s in seeds]) * std
        return x.to(device)

    def labels(self, seeds: Sequence[int]) -> Tensor | None:
        """A class label per seed for conditional models (uniform, from the seed), else None."""
        if not self.num_classes:
            return None
        return torch.tensor([int(torch.randint(self.num_classes, (1,),
                                               generator=torch.Generator().manual_seed(int(s) + 7919)))
                             for s in seeds])


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


GMM_PRESETS = {"2d": dict(dim=2, components=8), "16d": dict(dim=16, components=8),
               "64d": dict(dim=64, components=16)}


def gmm_source(dim: int = 16, components: int = 8, seed: int = 0,
               noise_schedule: NoiseSchedule | None = None) -> ModelSource:
    """A random Gaussian mixture (``GaussianMixture.random``) with its exact denoiser, on the
    VP linear schedule unless another is given; FID is the Frechet distance on coordinates."""
    from ..metrics import gmm_metric
    ns = noise_schedule or NoiseScheduleVP("linear")
    gmm = GaussianMixture.random(dim, components, seed=seed)
    identity = _digest({"gmm": [gmm.means.tolist(), gmm.stds.tolist(), gmm.log_weights.tolist()],
                        "schedule": repr(ns)})
    return ModelSource(f"gmm-{dim}d-{components}k-s{seed}", lambda labels: model_wrapper(gmm, ns, model_type="edm"),
                       ns, (dim,), identity, lambda: gmm_metric(gmm), dtype=torch.float64, info={"gmm": gmm},
                       networks=(gmm,))


def digits_source(weights: str | Path | None = None, conditional: bool = False,
                  guidance_scale: float = 1.) -> ModelSource:
    """The shipped digits U-Net (or ``weights``). Unconditional (the null label) unless
    ``conditional``: then every seed gets a class label and the model classifier-free
    guidance at ``guidance_scale``."""
    from ..metrics import digits_metric
    from .digits import DIGITS_UNET, digits_noise_schedule, load_digits_unet
    path = Path(weights) if weights else DIGITS_UNET
    net = load_digits_unet(path)
    ns = digits_noise_schedule()
    null = torch.tensor(net.num_classes)

    def model_fn_for(labels: Tensor | None) -> ModelFn:
        if labels is None:
            return model_wrapper(net, ns)
        return model_wrapper(net, ns, guidance_type="classifier-free", condition=labels,
                             unconditional_condition=null.to(labels.device).expand(len(labels)),
                            guidance_scale=guidance_scale)

    identity = _digest({"weights": file_digest(path), "conditional": conditional, "guidance_scale": guidance_scale})
    name = f"digits-cfg{guidance_scale:g}" if conditional else "digits"
    return ModelSource(name, model_fn_for, ns, (1, 8, 8), identity, digits_metric,
                       num_classes=net.num_classes if conditional else 0, info={"weights": str(path)},
                       networks=(net,))


def load_source(dataset: str, **options) -> ModelSource:
    """The model source named ``dataset``; unknown names get a one-line error."""
    if dataset == "gmm":
        return gmm_source(**options)
    if dataset == "digits":
        return digits_source(**options)
    if dataset == "cifar10":
        from .diffusers_unet import cifar10_source
        return cifar10_source(**options)
    raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
