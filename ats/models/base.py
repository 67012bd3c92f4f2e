"""What a sampler needs from a model: ``ModelSource`` (the network as ``model_fn``, its noise
schedule, one sample's shape, an identity for caches, its FID, its real data, and for latent
models the decoder that turns samples into images and the space the training losses compare
in), and the digests that make identities."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..noise import NoiseSchedule
from ..tensors import ModelFn

LOSS_SPACES = ("latent", "image")   # where training losses compare a student's samples with the teacher's


def loss_space_problem(name: str, loss_space: str, has_decoder: bool) -> str | None:
    """Why model ``name`` cannot train in ``loss_space`` (one line naming the fix), or None."""
    if loss_space not in LOSS_SPACES:
        return f"unknown loss space {loss_space!r}; choose one of {', '.join(LOSS_SPACES)}"
    if loss_space == "image" and not has_decoder:
        return (f"--loss-space image decodes latents with the model's VAE; {name} has none (its samples are "
                "images or points already, so its losses are on them): leave --loss-space out")
    return None


@dataclass
class ModelSource:
    """What a sampler needs: ``model_fn_for(labels)`` -> ``model_fn(x, t)`` (eps), the
    schedule, one sample's shape, and for conditional models the number of classes (or, for
    text-conditional ones, of prompts: their labels are prompt indices); what a method may need
    besides: ``real_data(n, seed)`` where the data set is at hand. Latent models sample in
    latent space (``shape`` is the latent's) and ``decode`` their samples into images
    (differentiably: gradients flow through it where its input requires them). ``loss_space``:
    where the training losses compare samples with teacher targets (``ats.losses.TeacherLoss``):
    ``latent`` as they are, ``image`` after ``decode``."""
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
    real_data: Callable[[int, int], Tensor] | None = None   # (n, seed) -> real samples (TimeTuner's data)
    num_prompts: int = 0                            # text-conditional: labels index these prompts (no classes)
    decode: Callable[..., Tensor] | None = None     # latent models: samples -> images in [-1, 1] (``checkpoint=``)
    loss_space: str = "latent"                      # one of LOSS_SPACES

    def __post_init__(self) -> None:
        problem = loss_space_problem(self.name, self.loss_space, self.decode is not None)
        if problem:
            raise ValueError(problem)

    def to(self, device: torch.device | str) -> "ModelSource":
        """Move the networks (in place) to ``device``; samplers follow their inputs' device."""
        for net in self.networks:
            net.to(device)
        return self

    def model_info(self) -> dict[str, str]:
        """What a fit records of the model it was made on (``ats.evaluate.check_fits`` compares it)."""
        return {"source": self.name, "noise_schedule": repr(self.noise_schedule)}

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
        """A class label (or prompt index) per seed for conditional models (uniform over the
        ``num_classes`` or ``num_prompts``, from the seed alone), else None."""
        count = self.num_classes or self.num_prompts
        if not count:
            return None
        return torch.tensor([int(torch.randint(count, (1,), generator=torch.Generator().manual_seed(int(s) + 7919)))
                             for s in seeds])

    def images(self, samples: Tensor) -> Tensor:
        """Samples as images in [-1, 1] (what FID and grids see): decoded for latent models,
        the samples themselves otherwise (no gradient)."""
        if self.decode is None:
            return samples
        with torch.no_grad():
            return self.decode(samples)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
