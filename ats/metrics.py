"""Metrics: Frechet distances through torchmetrics (the losses of schedule learning are in ``ats.losses``).

Every FID here is torchmetrics' ``FrechetInceptionDistance``; only the feature extractor
changes with the data:
- natural images (cifar10): the standard 2048-d InceptionV3 of torch-fidelity, weights
  ``weights-inception-2015-12-05-6726825d.pth`` read from a local file (``pip install
  'ats[images]'``);
- digits: the 128-d features of the digits classifier the project trains and ships;
- gmm: the raw coordinates (a Frechet distance between Gaussians fitted to the points).
Images reach any extractor through one fixed clamp-and-quantize to uint8 (``to_uint8``),
never a per-image min-max rescale. A model without an FID reference (dataset ``diffusers``
without ``--fid-reference``) is scored by ``TeacherDistance`` instead: the mean L2 distance to
the teacher's samples from the same x_T, with the same paired bootstrap.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .intervals import BOOTSTRAP, TEACHER_L2, FidEstimate, bootstrap_counts, bootstrap_fids, real_statistics

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "ATS_INCEPTION_WEIGHTS"


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 by clamp and round((x + 1) * 127.5): the one quantization."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class QuantizedFeatures(nn.Module):
    """uint8 images -> ``features(images / 127.5 - 1)``: an extractor for float networks."""

    def __init__(self, features: Callable[[Tensor], Tensor], num_features: int) -> None:
        super().__init__()
        self.extract = features
        self.num_features = num_features

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise ValueError("expected uint8 images; quantize them with ats.metrics.to_uint8 first")
        with torch.no_grad():
            return self.extract(images.float() / 127.5 - 1.)


class Coordinates(nn.Module):
    """Points are their own features (Frechet distance on raw coordinates)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, points: Tensor) -> Tensor:
        return points.flatten(1).double()


def frechet_metric(extractor: nn.Module):
    """torchmetrics' FID over ``extractor`` that keeps its real statistics across resets."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    return FrechetInceptionDistance(feature=extractor, reset_real_features=False)


def set_real_statistics(metric, mu: np.ndarray | Tensor, sigma: np.ndarray | Tensor, n: int = 50000) -> None:
    """Load reference mean and covariance (the EDM/ADM .npz format) as the real side."""
    mu = torch.as_tensor(np.asarray(mu), dtype=torch.float64)
    sigma = torch.as_tensor(np.asarray(sigma), dtype=torch.float64)
    if mu.shape != metric.real_features_sum.shape or sigma.shape != metric.real_features_cov_sum.shape:
        raise ValueError(f"reference statistics have {tuple(mu.shape)} features, the extractor "
                         f"{tuple(metric.real_features_sum.shape)}; use statistics of the same network")
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n)


def fake_features(metric, fake: Tensor, batch_size: int = 500) -> Tensor:
    """The metric's features of ``fake`` (images in [-1, 1] through ``to_uint8``, or points), float64."""
    if not torch.isfinite(fake).all():
        raise ValueError("samples contain NaN or inf; the sampler diverged, so no FID is computed")
    uses_images = not isinstance(metric.inception, Coordinates)
    with torch.no_grad():
        return torch.cat([metric.inception(to_uint8(c) if uses_images else c).double()
                          for c in fake.to(metric.device).split(batch_size)])


def frechet_estimate(metric, fake: Tensor, seeds: str = "", replicates: int | None = None) -> FidEstimate:
    """FID of ``fake`` against the metric's real side (torchmetrics computes it from the fake
    features' sums, as its ``update`` would) and its bootstrap replicates (``ats.intervals``;
    default 200, or 50 for features wider than 512, where a replicate costs an n x d x d
    product: the 2048-d InceptionV3's). ``seeds`` names the seed set, so that estimates on the
    same seeds can be paired."""
    return features_estimate(metric, fake_features(metric, fake), seeds, replicates)


def features_estimate(metric, features: Tensor, seeds: str = "", replicates: int | None = None) -> FidEstimate:
    """``frechet_estimate`` from the metric's features of the samples (``fake_features``)."""
    if replicates is None:
        replicates = BOOTSTRAP if features.shape[1] <= 512 else BOOTSTRAP // 4
    metric.reset()
    metric.fake_features_sum += features.sum(0)
    metric.fake_features_cov_sum += features.T @ features
    metric.fake_features_num_samples += len(features)
    metric.orig_dtype = features.dtype   # what update() would record; a metric whose real side came from a .npz lacks it
    with warnings.catch_warnings():   # the states were filled without update(), on purpose
        warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
        fid = float(metric.compute())
    reps = np.empty(0)
    if replicates > 0:
        mu, cov = real_statistics(metric)
        reps = bootstrap_fids(features, mu, cov, replicates).cpu().numpy()
    return FidEstimate(fid, len(features), seeds, reps)


class TeacherDistance:
    """The score of a model without an FID reference: d_i = ||x_i - x0*_i||_2, the distance of
    each sample to the teacher's from the same x_T (in the space samples live in: latents for
    latent models), averaged over the seeds; bootstrap replicate b is sum_i w_bi d_i / n with
    the multiplicities ``bootstrap_counts(n)`` that FID's replicates use, so changes between
    schedules on the same seeds are paired as FID's are."""
    name = TEACHER_L2

    def estimate(self, samples: Tensor, targets: Tensor, seeds: str = "", replicates: int = BOOTSTRAP) -> FidEstimate:
        if len(samples) != len(targets):
            raise ValueError(f"{len(samples)} samples against {len(targets)} teacher targets; score the same seeds")
        if not torch.isfinite(samples).all():
            return FidEstimate.diverged(len(samples), seeds, self.name)
        d = (samples.double() - targets.to(samples.device).double()).flatten(1).norm(dim=1).cpu()
        reps = (bootstrap_counts(len(d), replicates).double() @ d / len(d)).numpy() if replicates > 0 else np.empty(0)
        return FidEstimate(float(d.mean()), len(d), seeds, reps, self.name)


def paired_distance(metric, images: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """d_i between samples and the teacher's from the same x_T, in the space the tables' score
    sees them: ||phi(images(x_i)) - phi(images(x0*_i))|| in the metric's features phi (FID), or
    for ``TeacherDistance`` the distance of the samples themselves. The per-sample, paired
    stand-in for the table's score where there are too few samples for a FID."""
    if isinstance(metric, TeacherDistance):
        return lambda x, target: (x.double() - target.to(x.device).double()).flatten(1).norm(dim=1)
    return lambda x, target: (fake_features(metric, images(x)) - fake_features(metric, images(target))).norm(dim=1)


def frechet_distance(metric, fake: Tensor) -> float:
    """FID of ``fake`` (images in [-1, 1], or points) against the metric's real side, no interval."""
    return frechet_estimate(metric, fake, replicates=0).fid


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The torch-fidelity InceptionV3 weights: ``path``, else $ATS_INCEPTION_WEIGHTS, else the
    torch hub cache (<hub dir>/checkpoints/). A clear error names the file when absent."""
    candidates = [Path(path)] if path else []
    if not path and os.environ.get(INCEPTION_ENV):
        candidates.append(Path(os.environ[INCEPTION_ENV]))
    if not path:
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"InceptionV3 weights for FID not found (looked at {', '.join(map(str, candidates))}); download "
        f"{INCEPTION_FILE} from the torch-fidelity releases on GitHub and pass --inception-weights PATH, "
        f"set {INCEPTION_ENV}, or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}")


def inception_metric(weights: str | os.PathLike | None = None):
    """The standard 2048-d InceptionV3 FID (torch-fidelity's network) from local weights."""
    path = find_inception_weights(weights)
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise ImportError("the InceptionV3 FID needs torch-fidelity: pip install 'ats[images]'") from None
    from torchmetrics.image.fid import FrechetInceptionDistance
    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path),
                                    reset_real_features=False)


def load_reference(metric, reference: str | os.PathLike) -> None:
    """Real side of ``metric`` from a .npz with ``mu`` and ``sigma``, or a folder of images."""
    ref = Path(reference)
    if ref.suffix == ".npz" and ref.is_file():
        with np.load(ref) as stats:
            if "mu" not in stats or "sigma" not in stats:
                raise ValueError(f"{ref} has no 'mu' and 'sigma' arrays (the EDM/ADM reference format)")
            set_real_statistics(metric, stats["mu"], stats["sigma"])
        return
    if not ref.is_dir():
        raise FileNotFoundError(f"FID reference {ref} is neither a .npz with mu/sigma nor a folder of images")
    from PIL import Image
    files = sorted(p for p in ref.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < 2:
        raise ValueError(f"FID reference folder {ref} holds {len(files)} images; it needs at least 2")
    for start in range(0, len(files), 500):
        batch = [np.asarray(Image.open(f).convert("RGB")) for f in files[start:start + 500]]
        metric.update(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous(), real=True)
