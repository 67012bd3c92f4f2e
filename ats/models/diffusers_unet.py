"""Pretrained diffusers ``UNet2DModel`` checkpoints (the google/ddpm-cifar10-32 layout).

A checkpoint directory holds ``config.json`` (the UNet2DModel config),
``diffusion_pytorch_model.safetensors`` (or ``.bin``) and ``scheduler_config.json``. A DDPM-family
scheduler gives the noise schedule from its own betas, and its ``prediction_type`` (epsilon,
sample, v_prediction) picks the model type; a ``FlowMatchEulerDiscreteScheduler`` makes it a
flow-matching model (``RectifiedFlowSchedule`` with the config's shift, velocity prediction).
Reading the schedule never touches the network.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..noise import NoiseSchedule, NoiseScheduleVP, RectifiedFlowSchedule
from .base import ModelSource, digest, file_digest
from .wrapper import model_wrapper

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PREDICTION_TYPES = {"epsilon": "noise", "sample": "x_start", "v_prediction": "v"}
# Schedulers of discrete VP models (DDPM betas); FLOW_SCHEDULERS: flow matching (rectified flow).
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
                 "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                 "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                 "DEISMultistepScheduler", "UniPCMultistepScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
WHERE = ("download google/ddpm-cifar10-32 from the Hugging Face Hub on a machine with internet "
         "(huggingface-cli download google/ddpm-cifar10-32 --local-dir ./ddpm-cifar10-32) and pass "
         "--checkpoint ./ddpm-cifar10-32")


def check_checkpoint_dir(path: str | Path | None) -> tuple[Path, Path]:
    """The directory and its weights file; a one-line error naming what is missing or broken."""
    if not path:
        raise ValueError(f"dataset cifar10 needs --checkpoint DIR (a diffusers UNet2DModel directory); {WHERE}")
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is not a directory; {WHERE}")
    missing = [name for name in ("config.json", "scheduler_config.json") if not (path / name).is_file()]
    weights = next((path / w for w in WEIGHT_FILES if (path / w).is_file()), None)
    if weights is None:
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}; {WHERE}")
    for name in ("config.json", "scheduler_config.json"):
        read_json(path / name)
    return path, weights


def read_json(path: Path) -> dict:
    """A checkpoint's JSON config as a mapping; a one-line error naming the file when it is broken."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint file {path} is not valid JSON ({' '.join(str(e).split())}); the file is "
                         f"corrupt or truncated: restore it; {WHERE}") from None
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint file {path} holds a {type(data).__name__}, not a config mapping; {WHERE}")
    return data


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("loading diffusers checkpoints needs diffusers: pip install 'ats[cifar10]'") from None
    return diffusers


def scheduler_noise_schedule(config: dict, where: str | Path) -> tuple[NoiseSchedule, str]:
    """(noise schedule, model type) that a diffusers scheduler config (``scheduler_config.json``
    as a mapping) describes; ``where`` names the file in errors.

    - ``FlowMatchEulerDiscreteScheduler`` (and UniPC / DPM-Solver configs with
      ``use_flow_sigmas``): ``RectifiedFlowSchedule(shift, num_train_timesteps)``, model type
      ``flow`` (the network predicts the velocity). Only a static shift: a resolution-dependent
      one (``use_dynamic_shifting``) is refused. Options that only change the default inference
      schedule (karras/exponential/beta sigmas, shift_terminal) do not change the model.
    - The DDPM family (``VP_SCHEDULERS``, or no ``_class_name``): ``NoiseScheduleVP('discrete')``
      from the scheduler's betas, model type from ``prediction_type``.
    """
    name = config.get("_class_name", "DDPMScheduler")
    flow_sigmas = name in ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler") and config.get("use_flow_sigmas")
    if name not in VP_SCHEDULERS + FLOW_SCHEDULERS:
        raise ValueError(f"{where}: scheduler {name!r} is not supported; ats reads {', '.join(FLOW_SCHEDULERS)} "
                         f"(flow matching) and the DDPM family ({', '.join(VP_SCHEDULERS)})")
    diffusers = _import_diffusers()
    flow = name in FLOW_SCHEDULERS or flow_sigmas
    try:   # the scheduler fills in its defaults; the DDPM family's betas all follow DDPMScheduler's rule
        scheduler = (getattr(diffusers, name) if flow else diffusers.DDPMScheduler).from_config(config)
    except Exception as e:
        raise ValueError(f"cannot read the scheduler config {where} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())}); the file is corrupt; {WHERE}") from None
    cfg = scheduler.config
    if flow:
        if cfg.get("use_dynamic_shifting"):
            raise ValueError(f"{where}: use_dynamic_shifting=True (a shift that depends on the image size) is not "
                             "supported; set use_dynamic_shifting to false and shift to the value for your "
                             "resolution (exp(mu) of the pipeline)")
        if cfg.get("invert_sigmas"):
            raise ValueError(f"{where}: invert_sigmas=True (sigma 1 is data) is not supported; ats reads flow "
                             "schedulers where sigma 1 is pure noise")
        if flow_sigmas and cfg.get("prediction_type") != "flow_prediction":
            raise ValueError(f"{where}: use_flow_sigmas needs prediction_type 'flow_prediction', "
                             f"got {cfg.get('prediction_type')!r}")
        shift = cfg.get("shift" if name in FLOW_SCHEDULERS else "flow_shift", 1.)
        try:
            return RectifiedFlowSchedule(float(shift), int(cfg.num_train_timesteps)), "flow"
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}; fix the scheduler config") from None
    prediction = cfg.prediction_type
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{where}: prediction_type {prediction!r} is not one of {', '.join(PREDICTION_TYPES)}")
    return NoiseScheduleVP("discrete", betas=scheduler.betas.to(torch.float64)), PREDICTION_TYPES[prediction]


def checkpoint_noise_schedule(path: str | Path | None) -> NoiseSchedule:
    """The checkpoint's noise schedule from its ``scheduler_config.json`` (the DDPM family's betas,
    or a flow-matching scheduler's shift), without loading (or needing) the network."""
    if not path or not (Path(path) / "scheduler_config.json").is_file():
        raise ValueError(f"checkpoint {path} lacks scheduler_config.json; {WHERE}")
    path = Path(path) / "scheduler_config.json"
    return scheduler_noise_schedule(read_json(path), path)[0]


def load_unet_checkpoint(path: str | Path | None) -> tuple[Any, NoiseSchedule, str]:
    """(UNet2DModel in eval mode, its noise schedule, model_type) from a directory: a DDPM-family
    scheduler gives ``NoiseScheduleVP('discrete')`` from its betas and the model type of its
    ``prediction_type``; ``FlowMatchEulerDiscreteScheduler`` gives ``RectifiedFlowSchedule``
    and ``flow`` (see ``scheduler_noise_schedule``)."""
    path, _ = check_checkpoint_dir(path)
    config = read_json(path / "config.json")
    ns, model_type = scheduler_noise_schedule(read_json(path / "scheduler_config.json"), path / "scheduler_config.json")
    from diffusers import UNet2DModel
    if config.get("_class_name") != "UNet2DModel":
        raise ValueError(f"checkpoint {path} holds a {config.get('_class_name')!r}, not a UNet2DModel; {WHERE}")
    try:
        unet = UNet2DModel.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"cannot load the checkpoint in {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"the files are corrupt or of another architecture; {WHERE}") from None
    return unet.eval().requires_grad_(False), ns, model_type


def cifar10_source(checkpoint: str | Path | None = None, inception_weights: str | Path | None = None,
                   fid_reference: str | Path | None = None) -> ModelSource:
    """A diffusers UNet2DModel checkpoint as a model source. Its FID is the InceptionV3 metric
    (``inception_weights``) against ``fid_reference`` (a .npz with mu/sigma or a folder of
    images); ``make_metric`` checks both, so callers that need FID call it before sampling."""
    from ..metrics import inception_metric, load_reference
    path, weights = check_checkpoint_dir(checkpoint)
    if fid_reference is not None and not Path(fid_reference).exists():
        raise ValueError(f"FID reference {fid_reference} does not exist; pass a .npz with mu/sigma or a folder of images")
    unet, ns, model_type = load_unet_checkpoint(path)

    def network(x, t_input):
        return unet(x.to(unet.dtype), t_input).sample.to(x.dtype)

    def make_metric():
        if fid_reference is None:
            raise ValueError("cifar10 FID needs --fid-reference (a .npz with mu/sigma, or a folder of real images)")
        metric = inception_metric(inception_weights)
        load_reference(metric, fid_reference)
        return metric

    cfg = unet.config
    identity = digest({"weights": file_digest(weights), "config": read_json(path / "config.json"),
                        "scheduler": read_json(path / "scheduler_config.json")})
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return ModelSource(f"unet:{path.name}", lambda labels: model_wrapper(network, ns, model_type=model_type),
                       ns, shape, identity, make_metric, info={"checkpoint": str(path), "model_type": model_type}, networks=(unet,))
