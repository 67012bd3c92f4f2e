"""Losses between a student's samples and the teacher's, one value per sample."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


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
