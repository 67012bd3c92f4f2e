"""Losses between a student's samples and the teacher's, one value per sample, and the space
they compare in (``TeacherLoss``, built by ``teacher_loss`` from the model's ``loss_space``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .models.base import ModelSource
from .solvers import NetworkCalls
from .teacher import TeacherData


def l2_loss(x: Tensor, target: Tensor) -> Tensor:
    """||x - target||_2 per sample."""
    return (x - target).flatten(1).norm(dim=1)


def pseudo_huber_loss(x: Tensor, target: Tensor, c: float | None = None) -> Tensor:
    """sqrt(||x - target||^2 + c^2) - c per sample, c = 0.00054 sqrt(dim) (Song & Dhariwal, 2023)."""
    d = (x - target).flatten(1)
    c = 0.00054 * d.shape[1] ** 0.5 if c is None else c
    return torch.sqrt(d.square().sum(1) + c * c) - c


LOSSES = {"l2": l2_loss, "pseudo_huber": pseudo_huber_loss}
LOSS_NAMES = tuple(LOSSES) + ("lpips",)


def get_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """A per-sample loss by name. LPIPS needs its backbone weights, which no package ships
    here; asking for it fails now, at configuration time, not mid-fit."""
    if name == "lpips":
        try:
            import lpips  # noqa: F401
        except ImportError:
            raise ValueError("loss 'lpips' needs the lpips package and its VGG/AlexNet weights on "
                             "disk (pip install lpips, then fetch the weights on a machine with "
                             "internet); use loss 'l2' or 'pseudo_huber' here") from None
        return _lpips_loss()
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}, lpips")
    return LOSSES[name]


def _lpips_loss() -> Callable[[Tensor, Tensor], Tensor]:
    import lpips
    try:
        net = lpips.LPIPS(net="vgg", verbose=False, pretrained=True)
    except Exception as e:
        raise ValueError(f"LPIPS weights are not available locally ({type(e).__name__}); "
                         "use loss 'l2' or 'pseudo_huber'") from None
    return lambda x, target: net(x, target, normalize=False).flatten()


@dataclass(frozen=True)
class TeacherLoss:
    """A per-sample loss ``distance`` between a student's samples and teacher targets in the
    model's loss space. ``decode`` None (``latent``): both compared as they are. Else
    (``image``): the student's samples are decoded with gradients (they flow through the
    decoder into the schedule; ``checkpoint`` recomputes the decoder's activations in the
    backward pass), and the targets, cached latents, are decoded once per data set by
    ``targets`` (no gradient), not once per batch: a fit compares with the same targets every
    epoch, and a decoded target is a few MB."""
    distance: Callable[[Tensor, Tensor], Tensor]
    decode: Callable[..., Tensor] | None = None
    checkpoint: bool = False

    def targets(self, data: TeacherData) -> TeacherData:
        """``data`` with its targets in the loss space (the latents stay)."""
        if self.decode is None:
            return data
        with torch.no_grad():
            return data._replace(targets=self.decode(data.targets))

    def __call__(self, x: Tensor, target: Tensor) -> Tensor:
        """The loss of samples ``x`` against ``target`` (in the loss space: from ``targets``)."""
        if self.decode is not None:
            x = self.decode(x, checkpoint=self.checkpoint)
        if x.shape != target.shape:
            raise ValueError(f"internal error: samples of shape {tuple(x.shape)} against targets of shape "
                             f"{tuple(target.shape)}; pass the teacher data through TeacherLoss.targets")
        return self.distance(x, target)


def teacher_loss(name: str, source: ModelSource, calls: NetworkCalls = NetworkCalls()) -> TeacherLoss:
    """The loss ``name`` (``get_loss``) in ``source``'s loss space; ``calls.checkpoint`` also
    checkpoints the decoder."""
    decode = source.decode if source.loss_space == "image" else None
    return TeacherLoss(get_loss(name), decode, calls.checkpoint)
