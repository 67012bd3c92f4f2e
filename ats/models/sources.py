"""The dataset registry: each named model source with its options, its real data, the files it
reads, and a cheap noise schedule, in one place.

``DATASETS[name]`` is a ``Dataset``: ``options`` (``ats.options.Option``, with defaults; study
files take them under ``model:``, the CLI as flags), ``source(**options)`` builds the
``ModelSource``, ``problems(**options)`` lists missing files before anything runs, and
``noise_schedule(**options)`` gives the schedule without loading the network (for plots).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..intervals import FID, TEACHER_L2
from ..noise import NoiseSchedule, NoiseScheduleVP
from ..options import Option, did_you_mean, parse_options
from .base import LOSS_SPACES, ModelSource

GMM_PRESETS = {"2d": dict(dim=2, components=8), "16d": dict(dim=16, components=8),
               "64d": dict(dim=64, components=16)}
_INT_OR_NONE, _STR_OR_NONE = frozenset({"int", "None"}), frozenset({"str", "None"})


@dataclass(frozen=True)
class Dataset:
    """A named model source and what ats needs to know about it."""
    name: str
    options: dict[str, Option]
    build: Callable[..., ModelSource]
    schedule: Callable[..., NoiseSchedule]
    has_real_data: bool
    check_files: Callable[..., list[str]] = field(default=lambda **options: [])
    flags: dict[str, str] = field(default_factory=dict)   # CLI flag names that differ from the option's
    score: Callable[..., str] = field(default=lambda **options: FID)   # what ranks schedules: FID or TEACHER_L2

    def parse(self, options: dict[str, Any] | None, path: str = "model") -> dict[str, Any]:
        """The model options with defaults filled in, checked (``OptionError`` on a bad one)."""
        given = parse_options(self.options, options or {}, path)
        return {**{k: o.default for k, o in self.options.items()}, **given}

    def source(self, **options: Any) -> ModelSource:
        return self.build(**self.parse(options))

    def noise_schedule(self, **options: Any) -> NoiseSchedule:
        """The noise schedule, without loading the network."""
        return self.schedule(**self.parse(options))

    def score_name(self, **options: Any) -> str:
        """What ranks schedules of the model with these options: ``FID``, or without an FID
        reference ``TEACHER_L2`` (``ats.metrics.TeacherDistance``)."""
        return self.score(**self.parse(options))

    def problems(self, **options: Any) -> list[str]:
        """What is missing on disk for these options, one line each (empty: ready to run)."""
        return self.check_files(**self.parse(options))


def _gmm(preset: str | None = "16d", dim: int | None = None, components: int | None = None,
         seed: int = 0) -> ModelSource:
    from .gmm import gmm_source
    sizes = {**(GMM_PRESETS[preset] if preset else GMM_PRESETS["16d"]),
             **{k: v for k, v in (("dim", dim), ("components", components)) if v is not None}}
    return gmm_source(seed=seed, **sizes)


def _digits(guidance_scale: float | None = None) -> ModelSource:
    from .digits import digits_source
    return digits_source() if guidance_scale is None else digits_source(conditional=True, guidance_scale=guidance_scale)


def _digits_schedule(**options: Any) -> NoiseSchedule:
    from .digits import digits_noise_schedule
    return digits_noise_schedule()


def _cifar10(**options: Any) -> ModelSource:
    from .diffusers_unet import cifar10_source
    return cifar10_source(**options)


def _cifar10_schedule(checkpoint: str | None = None, **options: Any) -> NoiseSchedule:
    from .diffusers_unet import checkpoint_noise_schedule
    return checkpoint_noise_schedule(checkpoint)


def _cifar10_problems(checkpoint: str | None = None, inception_weights: str | None = None,
                      fid_reference: str | None = None) -> list[str]:
    from ..metrics import find_inception_weights
    from .diffusers_unet import check_checkpoint_dir
    problems = []
    for check in (lambda: check_checkpoint_dir(checkpoint), lambda: find_inception_weights(inception_weights)):
        try:
            check()
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e))
    if not fid_reference:
        problems.append("cifar10 FID needs --fid-reference: a .npz with mu/sigma of the real images "
                        "(or a folder of real images)")
    return problems


def _diffusers(**options: Any) -> ModelSource:
    from .pipeline import diffusers_source
    return diffusers_source(**options)


def _diffusers_schedule(**options: Any) -> NoiseSchedule:
    from .pipeline import diffusers_noise_schedule
    return diffusers_noise_schedule(**options)


def _diffusers_problems(**options: Any) -> list[str]:
    from .pipeline import diffusers_problems
    return diffusers_problems(**options)


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("gmm", {
        "preset": Option("preset", _STR_OR_NONE, "16d", tuple(GMM_PRESETS),
                         help="gmm: a named size (2d: 2 dims 8 components, 16d: 16/8, 64d: 64/16)."),
        "dim": Option("dim", _INT_OR_NONE, None, low=1, high=1024,
                      help="gmm: dimension, at most 1024 (overrides the preset's)."),
        "components": Option("components", _INT_OR_NONE, None, low=1, high=1024,
                             help="gmm: number of components, at most 1024 (overrides the preset's)."),
        "seed": Option("seed", frozenset({"int"}), 0, low=0, help="gmm: seed of the random mixture."),
    }, _gmm, lambda **options: NoiseScheduleVP("linear"), has_real_data=True, flags={"seed": "mixture-seed"}),
    Dataset("digits", {
        "guidance_scale": Option("guidance_scale", frozenset({"float", "None"}), None,
                                 help="digits: sample class-conditionally (a label per seed) with this "
                                      "classifier-free guidance scale; unconditional when absent."),
    }, _digits, _digits_schedule, has_real_data=True),
    Dataset("cifar10", {
        "checkpoint": Option("checkpoint", _STR_OR_NONE, None,
                             help="cifar10: a diffusers UNet2DModel directory (google/ddpm-cifar10-32 layout)."),
        "inception_weights": Option("inception_weights", _STR_OR_NONE, None,
                                    help="cifar10: weights-inception-2015-12-05-6726825d.pth (else "
                                         "$ATS_INCEPTION_WEIGHTS or the torch hub cache)."),
        "fid_reference": Option("fid_reference", _STR_OR_NONE, None,
                                help="cifar10: real-image statistics (.npz with mu, sigma) or a folder of images."),
    }, _cifar10, _cifar10_schedule, has_real_data=False, check_files=_cifar10_problems),
    Dataset("diffusers", {
        "checkpoint": Option("checkpoint", _STR_OR_NONE, None,
                             help="diffusers: any diffusers model folder: a UNet2DModel folder, or a latent pipeline "
                                  "(model_index.json with unet/, vae/, scheduler/, optional text_encoder/ + "
                                  "tokenizer/)."),
        "prompts": Option("prompts", _STR_OR_NONE, None,
                          help="diffusers: text-to-image pipelines: a file of prompts, one per line, or COCO captions "
                               "JSON; each seed gets one (from the seed)."),
        "guidance_scale": Option("guidance_scale", frozenset({"float", "None"}), None, low=0.,
                                 help="diffusers: the classifier-free guidance scale of text-to-image pipelines "
                                      "(default 7.5; 1: no guidance)."),
        "inception_weights": Option("inception_weights", _STR_OR_NONE, None,
                                    help="diffusers: InceptionV3 weights for FID (with --fid-reference)."),
        "fid_reference": Option("fid_reference", _STR_OR_NONE, None,
                                help="diffusers: real-image statistics (.npz with mu, sigma) or a folder of images; "
                                     "without one, schedules are ranked by the L2 to the teacher."),
        "loss_space": Option("loss_space", frozenset({"str"}), "latent", LOSS_SPACES,
                             help="diffusers: latent pipelines: where the fits' losses compare samples with the "
                                  "teacher's: latent (default), or image: on VAE-decoded images, with gradients "
                                  "through the decoder (teacher targets stay cached latents)."),
    }, _diffusers, _diffusers_schedule, has_real_data=False, check_files=_diffusers_problems,
        score=lambda fid_reference=None, **options: FID if fid_reference else TEACHER_L2),
)}


def get_dataset(name: str) -> Dataset:
    """The registered dataset ``name``; unknown names get a one-line error."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; available: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_source(dataset: str, **options: Any) -> ModelSource:
    """The model source named ``dataset`` built with its ``options``; bad names and options get
    a one-line error."""
    return get_dataset(dataset).source(**options)


__all__ = ["DATASETS", "Dataset", "GMM_PRESETS", "ModelSource", "get_dataset", "load_source"]
