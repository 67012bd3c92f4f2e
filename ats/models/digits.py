"""The embedded digits model: scikit-learn's 8x8 handwritten digits and a small U-Net.

Data: ``sklearn.datasets.load_digits`` (1797 images shipped inside scikit-learn, values
0..16) scaled to [-1, 1], shape [1, 8, 8]. Model: ``DigitsUNet`` trained for noise
prediction on DDPM's discrete VP schedule (linear betas 1e-4..0.02, 1000 steps), class-
conditional with a null label dropped in 10 % of the time (classifier-free guidance).
``ats train-model --dataset digits`` retrains it; the package ships the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..atomic import write_atomic
from ..metrics import QuantizedFeatures, frechet_metric, to_uint8
from ..noise import NoiseScheduleVP
from .base import ModelFn, ModelSource, digest, file_digest
from .unet import DigitsUNet
from .wrapper import model_wrapper

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIGITS_UNET = WEIGHTS_DIR / "digits_unet.pt"
TRAIN_STEPS = 1000


def digits_betas() -> Tensor:
    """DDPM's linear betas, 1e-4 to 0.02 over 1000 steps."""
    return torch.linspace(1e-4, 0.02, TRAIN_STEPS, dtype=torch.float64)


def digits_noise_schedule() -> NoiseScheduleVP:
    return NoiseScheduleVP("discrete", betas=digits_betas())


def load_digits_data() -> tuple[Tensor, Tensor]:
    """All 1797 digits as float32 images in [-1, 1], [N, 1, 8, 8], and their labels [N]."""
    from sklearn.datasets import load_digits
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8. - 1.
    return images, torch.tensor(data.target, dtype=torch.long)


def save_atomic(obj, path: Path) -> None:
    """torch.save, written atomically."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def train_digits_unet(steps: int = 12000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                      label_dropout: float = 0.1, ema_decay: float = 0.999,
                      progress: Callable[[int, float], None] | None = None) -> DigitsUNet:
    """Train the digits U-Net from scratch (seeded): eps-prediction MSE at uniform training
    steps, Adam with cosine learning-rate decay, exponential moving average of the weights
    (the returned model)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits_data()
    alphas_cumprod = torch.cumprod(1 - digits_betas(), 0).float()
    model = DigitsUNet()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=g) < label_dropout] = model.num_classes
        k = torch.randint(0, TRAIN_STEPS, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas_cumprod[k].sqrt()[:, None, None, None]
        s = (1 - alphas_cumprod[k]).sqrt()[:, None, None, None]
        loss = (model(a * x0 + s * noise, k, y) - noise).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update_parameters(model)
        if progress is not None:
            progress(step, loss.item())
    return ema.module.eval()


def save_digits_unet(model: DigitsUNet, path: Path = DIGITS_UNET, **meta) -> None:
    save_atomic({"config": model.config, "state_dict": model.state_dict(), "meta": meta}, path)


def load_digits_unet(path: Path | str = DIGITS_UNET) -> DigitsUNet:
    """The shipped (or a retrained) digits U-Net, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digits model weights not found at {path}; "
                                "run `ats train-model --dataset digits` to create them")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitsUNet(tuple(ckpt["config"]["channels"]), ckpt["config"]["num_classes"],
                           ckpt["config"]["in_channels"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # corrupt file, another architecture, truncated download
        raise ValueError(f"cannot load digits model weights from {path} ({type(e).__name__}: {e}); "
                         "retrain them with `ats train-model --dataset digits`") from None
    return model.eval()


DIGITS_CLASSIFIER = WEIGHTS_DIR / "digits_classifier.pt"


class DigitsClassifier(torch.nn.Module):
    """A small CNN on 8x8 digits; ``features`` (the 128-d penultimate layer) is what the
    digits FID compares, as InceptionV3's pool features are for natural images."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.GroupNorm(8, 128), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = torch.nn.Linear(self.num_features, 10)

    def features(self, images: Tensor) -> Tensor:
        """Images in [-1, 1], [B, 1, 8, 8] -> [B, 128] (in the weights' dtype)."""
        return self.body(images.to(self.head.weight.dtype))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def digits_split(seed: int = 0, held_out: int = 300) -> tuple[Tensor, Tensor]:
    """Indices of a seeded train / held-out split of the 1797 digits."""
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(seed))
    return perm[held_out:], perm[:held_out]


def train_digits_classifier(epochs: int = 40, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Train on the train split (AdamW, cosine decay, small shifts as augmentation);
    returns the model and its accuracy on the held-out split."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits_data()
    train, test = digits_split(seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    batches = (len(train) + 63) // 64
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * batches)
    for _ in range(epochs):
        for idx in train[torch.randperm(len(train), generator=g)].split(64):
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(images[idx], shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    return model, accuracy


def load_digits_classifier(path: Path | str = DIGITS_CLASSIFIER) -> DigitsClassifier:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digits classifier weights not found at {path}; "
                                "run `ats train-model --dataset digits --classifier` to create them")
    try:
        model = DigitsClassifier()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    except Exception as e:
        raise ValueError(f"cannot load digits classifier weights from {path} ({type(e).__name__}: {e}); "
                         "retrain them with `ats train-model --dataset digits --classifier`") from None
    return model.eval()


def digits_metric(classifier: torch.nn.Module | None = None):
    """FID on the shipped digits classifier's features against all 1797 real digits."""
    classifier = classifier or load_digits_classifier()
    metric = frechet_metric(QuantizedFeatures(classifier.features, classifier.num_features))
    images, _ = load_digits_data()
    metric.update(to_uint8(images), real=True)
    return metric


def digits_source(weights: str | Path | None = None, conditional: bool = False,
                  guidance_scale: float = 1.) -> ModelSource:
    """The shipped digits U-Net (or ``weights``). Unconditional (the null label) unless
    ``conditional``: then every seed gets a class label and the model classifier-free
    guidance at ``guidance_scale``."""
    path = Path(weights) if weights else DIGITS_UNET
    net = load_digits_unet(path).requires_grad_(False)   # a fit learns schedules, never the weights
    ns = digits_noise_schedule()
    null = torch.tensor(net.num_classes)

    def model_fn_for(labels: Tensor | None) -> ModelFn:
        if labels is None:
            return model_wrapper(net, ns)
        return model_wrapper(net, ns, guidance_type="classifier-free", condition=labels,
                             unconditional_condition=null.to(labels.device).expand(len(labels)),
                            guidance_scale=guidance_scale)

    identity = digest({"weights": file_digest(path), "conditional": conditional, "guidance_scale": guidance_scale})
    name = f"digits-cfg{guidance_scale:g}" if conditional else "digits"
    return ModelSource(name, model_fn_for, ns, (1, 8, 8), identity, digits_metric,
                       num_classes=net.num_classes if conditional else 0, info={"weights": str(path)},
                       networks=(net,), real_data=digits_real_data)


def digits_real_data(n: int, seed: int = 0) -> Tensor:
    """The first ``n`` digits of the training part of the seeded split (at most 1497)."""
    images, _ = load_digits_data()
    train, _ = digits_split()
    return images[train][:n]
