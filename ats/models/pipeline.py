"""Any diffusers model folder as a model source (dataset ``diffusers``).

Two layouts, told apart by their files:

- a ``UNet2DModel`` folder (``config.json``, weights, ``scheduler_config.json``: DDPM betas or
  flow matching; the google/ddpm-cifar10-32 layout), sampled in pixel space by
  ``ats.models.diffusers_unet``;
- a latent pipeline folder (``model_index.json``): ``unet/`` UNet2DConditionModel, ``vae/``
  AutoencoderKL, ``scheduler/`` (any scheduler built on DDPM betas: DDPM, DDIM, PNDM, Euler,
  LMS, DPM-Solver, UniPC, ...) and optionally ``text_encoder/`` CLIPTextModel + ``tokenizer/``.

A latent pipeline samples x_T of the latent shape [C, H, W] (the UNet's in_channels and
sample_size) on the discrete VP schedule of the scheduler's betas (beta_schedule, beta_start,
beta_end, num_train_timesteps, or trained_betas); its ``prediction_type`` (epsilon,
v_prediction, sample) picks the model type. Samples become images through the VAE:
image = vae.decode(z * std / scaling_factor + mean), clamped to [-1, 1], where mean, std are
the VAE's ``latents_mean``/``latents_std`` when it has them and ``shift_factor``, 1 otherwise.
Three kinds:

- text-conditional (``text_encoder/`` present): every seed is paired with a prompt of the
  prompts file (the index is uniform from the seed alone, ``ModelSource.labels``); a prompt is
  encoded once, on first use (CLIP's last hidden state of the tokens padded to the tokenizer's
  length, as diffusers' pipelines do), and classifier-free guidance
  eps_u + w (eps_c - eps_u) evaluates the empty prompt and the sample's prompt in one batch;
- class-conditional (the UNet's ``num_class_embeds``): a class label per seed;
- unconditional: a UNet with cross-attention attends to one all-zero context token.

Teacher targets live in latent space; the teacher cache's identity covers the UNet, text
encoder, tokenizer, scheduler, prompts and guidance, not the VAE. The fits' losses compare
latents, or with ``loss_space="image"`` the decoded images (``ats.losses.TeacherLoss``: the
decoder is differentiable, so the gradient reaches the schedule through it).
"""
from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as checkpoint_call

from ..discretize import AYS_PIPELINES
from ..noise import NoiseScheduleVP
from .base import ModelFn, ModelSource, digest, file_digest, loss_space_problem
from .diffusers_unet import PREDICTION_TYPES
from .wrapper import model_wrapper

INSTALL = "pip install 'ats[diffusers]'"
SUPPORTED = ("ats drives a diffusers UNet2DModel folder (config.json, scheduler_config.json on DDPM betas or flow "
             "matching) or a pipeline folder (model_index.json) with unet/ UNet2DConditionModel, vae/ AutoencoderKL, "
             "scheduler/ on DDPM betas and optionally text_encoder/ CLIPTextModel + tokenizer/ CLIPTokenizer")
UNETS, VAES, TEXT_ENCODERS = ("UNet2DConditionModel",), ("AutoencoderKL",), ("CLIPTextModel",)
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
PROMPTS_FORMAT = 'one prompt per line, or a COCO captions JSON {"annotations": [{"caption": ...}, ...]}'
DEFAULT_GUIDANCE = 7.5   # diffusers' text-to-image default
DECODE_BATCH = 16


def folder_kind(checkpoint: str | Path | None) -> str:
    """``"pipeline"`` (a ``model_index.json`` folder) or ``"unet"`` (a ``config.json`` folder);
    a one-line ValueError for anything else."""
    if not checkpoint:
        raise ValueError(f"dataset diffusers needs --checkpoint DIR; {SUPPORTED}")
    path = Path(checkpoint)
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is not a directory; {SUPPORTED}")
    if (path / "model_index.json").is_file():
        return "pipeline"
    if (path / "config.json").is_file():
        return "unet"
    raise ValueError(f"checkpoint {path} holds neither model_index.json (a pipeline) nor config.json (a UNet2DModel); "
                     f"{SUPPORTED}")


def _json(path: Path) -> dict:
    """A config file as a mapping; a one-line ValueError naming the file when it is missing or broken."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {path} is missing; {SUPPORTED}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint file {path} is not valid JSON ({' '.join(str(e).split())}); the file is "
                         "corrupt or truncated: restore it") from None
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint file {path} holds a {type(data).__name__}, not a config mapping; restore it")
    return data


@dataclass(frozen=True)
class Layout:
    """What a pipeline folder holds, read from its JSON files only (no weights, no imports)."""
    path: Path
    unet: dict                 # unet/config.json
    vae: dict                  # vae/config.json
    scheduler: dict            # scheduler/scheduler_config.json
    text_encoder: str | None   # the text encoder's and tokenizer's classes (text-to-image pipelines)
    tokenizer: str | None
    pipeline: str | None = None   # model_index.json's _class_name (e.g. StableDiffusionPipeline)

    @property
    def text(self) -> bool:
        return self.text_encoder is not None

    @property
    def num_classes(self) -> int:
        return int(self.unet.get("num_class_embeds") or 0)


def _component(index: dict, name: str) -> str | None:
    """The class name ``model_index.json`` gives component ``name`` (None when absent or null)."""
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return str(entry[1])
    return None


def read_layout(checkpoint: str | Path) -> Layout:
    """The pipeline folder's layout, checked: one-line ValueErrors for a pipeline ats cannot
    drive (a transformer denoiser, no VAE, two text encoders, image-conditioned UNets, ...),
    naming what it supports."""
    path = Path(checkpoint)
    index = _json(path / "model_index.json")
    what = f"pipeline {path} ({index.get('_class_name', 'no _class_name')})"
    denoiser = _component(index, "transformer")
    if denoiser is not None:
        raise ValueError(f"{what}: its denoiser is a {denoiser} (transformer/), which ats cannot drive; {SUPPORTED}")
    for name, allowed in (("unet", UNETS), ("vae", VAES)):
        cls = _component(index, name)
        if cls not in allowed:
            have = ", ".join(k for k in index if not k.startswith("_") and _component(index, k))
            got = f"a {cls} as {name}/" if cls else f"no {name}/ (it has {have or 'no components'})"
            raise ValueError(f"{what} has {got}; {SUPPORTED}")
    if _component(index, "text_encoder_2") is not None:
        raise ValueError(f"{what} has two text encoders (an SDXL-class pipeline), which ats cannot drive; {SUPPORTED}")
    encoder, tokenizer = _component(index, "text_encoder"), _component(index, "tokenizer")
    if encoder is not None and (encoder not in TEXT_ENCODERS or tokenizer not in TOKENIZERS):
        raise ValueError(f"{what} has a {encoder} text encoder with a {tokenizer} tokenizer; {SUPPORTED}")
    if _component(index, "scheduler") is None:
        raise ValueError(f"{what} has no scheduler/; {SUPPORTED}")
    unet = _json(path / "unet" / "config.json")
    vae = _json(path / "vae" / "config.json")
    scheduler = _json(path / "scheduler" / "scheduler_config.json")
    _check_unet(what, unet, vae, encoder is not None)
    return Layout(path, unet, vae, scheduler, encoder, tokenizer if encoder else None, index.get("_class_name"))


def _check_unet(what: str, unet: dict, vae: dict, text: bool) -> None:
    """The UNet takes latents of the VAE and only conditions ats can give it."""
    latent = vae.get("latent_channels", 4)
    if unet.get("in_channels") != latent or unet.get("out_channels") not in (latent, 2 * latent):
        raise ValueError(f"{what}: its UNet takes {unet.get('in_channels')} channels for the VAE's {latent} latent "
                         "channels (an image-conditioned pipeline: inpainting, upscaling, ...), which ats cannot drive")
    for key in ("addition_embed_type", "class_embed_type"):
        if unet.get(key) is not None:
            raise ValueError(f"{what}: its UNet has {key} {unet[key]!r}, a condition ats cannot give; {SUPPORTED}")
    if unet.get("encoder_hid_dim_type") not in (None, "text_proj"):
        raise ValueError(f"{what}: its UNet takes {unet['encoder_hid_dim_type']} conditions, which ats cannot give")
    if text and unet.get("num_class_embeds"):
        raise ValueError(f"{what}: its UNet takes class labels besides the text, which ats cannot give both of")


def scheduler_schedule(config: dict, where: str | Path) -> tuple[NoiseScheduleVP, str]:
    """(NoiseScheduleVP('discrete') of the scheduler config's betas, ats model type of its
    prediction_type). The betas are diffusers' own (``DDPMScheduler`` from the beta fields)."""
    cls = config.get("_class_name", "the scheduler")
    if "FlowMatch" in str(cls) or config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        raise ValueError(f"{where}: {cls} is a flow-matching scheduler; ats drives pipelines whose scheduler has "
                         "DDPM betas (DDPM, DDIM, PNDM, Euler, DPM-Solver, UniPC, ...), and flow matching in "
                         "UNet2DModel folders only")
    if "beta_schedule" not in config and config.get("trained_betas") is None:
        raise ValueError(f"{where}: {cls} has no beta_schedule or trained_betas; ats drives schedulers on DDPM betas "
                         "(DDPM, DDIM, PNDM, Euler, DPM-Solver, UniPC, ...)")
    if config.get("rescale_betas_zero_snr"):
        raise ValueError(f"{where}: rescale_betas_zero_snr makes the last step pure noise (zero SNR, infinite "
                         "log-SNR), which ats's schedules cannot reach; set it to false")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{where}: prediction_type {prediction!r} is not one of {', '.join(PREDICTION_TYPES)}")
    diffusers = _import("diffusers")
    beta_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    try:
        betas = diffusers.DDPMScheduler.from_config({k: config[k] for k in beta_keys if k in config}).betas
    except (NotImplementedError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: cannot build its betas ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "beta_schedule must be linear, scaled_linear or squaredcos_cap_v2") from None
    return NoiseScheduleVP("discrete", betas=betas.to(torch.float64)), PREDICTION_TYPES[prediction]


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(f"dataset diffusers needs {name}: {INSTALL}") from None


def read_prompts(path: str | Path | None) -> list[str]:
    """The prompts of ``path``: a text file with one prompt per line (blank lines skipped), a
    COCO captions JSON (``{"annotations": [{"caption": ...}, ...]}``, in file order) or a JSON
    list of strings. One-line ValueErrors name the file and the formats."""
    if not path:
        raise ValueError(f"a text-to-image pipeline needs --prompts FILE ({PROMPTS_FORMAT})")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist; give a file with {PROMPTS_FORMAT}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"prompts file {path} is not readable UTF-8 text ({type(e).__name__}); give a file with "
                         f"{PROMPTS_FORMAT}") from None
    if path.suffix.lower() != ".json":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts file {path} is not valid JSON ({e.msg}, line {e.lineno}); give "
                             f"{PROMPTS_FORMAT}") from None
        items = data.get("annotations") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError(f"prompts file {path} has no \"annotations\" list; give {PROMPTS_FORMAT}")
        prompts = []
        for i, item in enumerate(items):
            caption = item.get("caption") if isinstance(item, dict) else item
            if not isinstance(caption, str):
                raise ValueError(f"prompts file {path}: entry {i} has no caption string; give {PROMPTS_FORMAT}")
            prompts.append(caption.strip())
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts; give {PROMPTS_FORMAT}")
    return prompts


class PromptEmbeddings:
    """Text embeddings [L, D] of the prompts, each computed once (on first use, in batches) and
    kept on the CPU; ``empty`` is the empty prompt's (the unconditional branch of guidance)."""

    def __init__(self, prompts: list[str], tokenizer: Any, text_encoder: torch.nn.Module, batch: int = 64) -> None:
        self.prompts, self.tokenizer, self.text_encoder, self.batch = prompts, tokenizer, text_encoder, batch
        self.cache: dict[int, Tensor] = {}
        self._empty: Tensor | None = None

    def encode(self, texts: list[str]) -> Tensor:
        """[len(texts), L, D]: the encoder's last hidden state of the tokens padded (or cut) to the
        tokenizer's ``model_max_length``, with the attention mask where the encoder asks for one."""
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) \
            else None
        with torch.no_grad():
            return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].cpu()

    @property
    def empty(self) -> Tensor:
        if self._empty is None:
            self._empty = self.encode([""])[0]
        return self._empty

    def __call__(self, indices: Tensor) -> Tensor:
        """[B, L, D] for prompt indices [B], on the indices' device."""
        wanted = [int(i) for i in indices.tolist()]
        missing = sorted(set(wanted) - set(self.cache))
        for start in range(0, len(missing), self.batch):
            chunk = missing[start:start + self.batch]
            for i, e in zip(chunk, self.encode([self.prompts[i] for i in chunk])):
                self.cache[i] = e
        return torch.stack([self.cache[i] for i in wanted]).to(indices.device)


@functools.lru_cache(maxsize=256)
def _cached_digest(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(Path(path))


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of ``folder`` by name (computed once per process for an unchanged file)."""
    out = {}
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            out[p.name] = _cached_digest(str(p), st.st_size, st.st_mtime_ns)
    return out


def _load(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)`` from local files; a one-line ValueError when it fails."""
    try:
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception as e:
        raise ValueError(f"cannot load {what} from {folder} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "the files are missing, corrupt or of another architecture") from None


def vae_decoder(vae: torch.nn.Module, batch: int = DECODE_BATCH) -> Callable[..., Tensor]:
    """Latents [B, C, h, w] -> images in [-1, 1] [B, 3, H, W], ``batch`` at a time, on the VAE's
    device, returned on the latents' device and dtype. Differentiable: where the latents require
    gradients they flow back through the decoder (an image-space loss); ``checkpoint=True``
    then recomputes each batch's decoder activations in the backward pass instead of keeping
    them."""
    cfg = vae.config
    scale = float(cfg.scaling_factor)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    else:
        mean_t, std_t = torch.tensor(float(getattr(cfg, "shift_factor", None) or 0.)), torch.tensor(1.)

    def run(z: Tensor) -> Tensor:
        return vae.decode(z).sample

    def decode(latents: Tensor, checkpoint: bool = False) -> Tensor:
        p = next(vae.parameters())
        outs = []
        for z in latents.split(batch):
            z = (z.to(p.device, torch.float32) * std_t.to(p.device) / scale + mean_t.to(p.device)).to(p.dtype)
            image = checkpoint_call(run, z, use_reentrant=False) if checkpoint and z.requires_grad else run(z)
            outs.append(image.clamp(-1, 1).to(latents.device, latents.dtype))
        return torch.cat(outs)

    return decode


def _metric_factory(inception_weights: str | Path | None, fid_reference: str | Path | None) -> Callable[[], Any]:
    """InceptionV3 FID against ``fid_reference``, or without one the distance to the teacher."""
    from ..metrics import TeacherDistance, inception_metric, load_reference
    if fid_reference is not None and not Path(fid_reference).exists():
        raise ValueError(f"FID reference {fid_reference} does not exist; pass a .npz with mu/sigma or a folder of "
                         "images, or leave --fid-reference out to rank by the L2 to the teacher")

    def make_metric():
        if fid_reference is None:
            return TeacherDistance()
        metric = inception_metric(inception_weights)
        load_reference(metric, fid_reference)
        return metric

    return make_metric


def pipeline_source(checkpoint: str | Path, prompts: str | Path | None = None, guidance_scale: float | None = None,
                    inception_weights: str | Path | None = None, fid_reference: str | Path | None = None,
                    loss_space: str = "latent") -> ModelSource:
    """A latent pipeline folder as a model source (see the module docstring); ``loss_space``
    ``image``: the fits' losses compare decoded images."""
    layout = read_layout(checkpoint)
    path = layout.path
    what = f"pipeline {path}"
    if not layout.text and prompts is not None:
        raise ValueError(f"--prompts is for text-to-image pipelines; {what} has no text_encoder/: leave it out")
    if not layout.text and guidance_scale is not None:
        raise ValueError(f"--guidance-scale needs a text-to-image pipeline (classifier-free guidance against the empty "
                         f"prompt); {what} has no text_encoder/: leave it out")
    prompt_list = read_prompts(prompts) if layout.text else []
    make_metric = _metric_factory(inception_weights, fid_reference)
    ns, model_type = scheduler_schedule(layout.scheduler, path / "scheduler" / "scheduler_config.json")
    diffusers = _import("diffusers")
    # without accelerate, diffusers falls back to a full-memory load anyway, with a warning each time
    quiet = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
    unet = _load(diffusers.UNet2DConditionModel, path / "unet", "the UNet", **quiet).eval().requires_grad_(False)
    vae = _load(diffusers.AutoencoderKL, path / "vae", "the VAE", **quiet).eval().requires_grad_(False)
    cfg = unet.config
    cross = cfg.encoder_hid_dim or cfg.cross_attention_dim
    context_dim = cross if isinstance(cross, int) else cross[0]
    in_channels = cfg.in_channels
    networks: tuple[torch.nn.Module, ...] = (unet, vae)
    embeddings = None
    if layout.text:
        transformers = _import("transformers")
        encoder = _load(getattr(transformers, layout.text_encoder), path / "text_encoder",
                        "the text encoder").eval().requires_grad_(False)
        tokenizer = _load(getattr(transformers, layout.tokenizer), path / "tokenizer", "the tokenizer")
        if encoder.config.hidden_size != context_dim:
            raise ValueError(f"{what}: the text encoder gives {encoder.config.hidden_size}-d embeddings, the UNet "
                             f"attends to {context_dim}-d ones; the folder mixes models")
        embeddings = PromptEmbeddings(prompt_list, tokenizer, encoder)
        networks += (encoder,)

    def network(x: Tensor, t_input: Tensor, cond: Tensor | None = None) -> Tensor:
        """eps (or x0, v) of the UNet; ``cond`` is a text embedding [B or 1, L, D] or class labels [B]."""
        context, labels = cond, None
        if cond is None or cond.ndim == 1:
            context, labels = torch.zeros(1, 1, context_dim), cond
        context = context.to(x.device, unet.dtype).expand(len(x), *context.shape[1:])
        out = unet(x.to(unet.dtype), t_input, encoder_hidden_states=context, class_labels=labels).sample
        return out[:, :in_channels].to(x.dtype)   # learned-variance UNets return [eps, variance]

    scale = DEFAULT_GUIDANCE if guidance_scale is None and layout.text else (guidance_scale or 1.)

    def model_fn_for(labels: Tensor | None) -> ModelFn:
        if labels is None and embeddings is None:
            return model_wrapper(network, ns, model_type=model_type)
        if embeddings is None:   # class labels
            return model_wrapper(network, ns, model_type=model_type, guidance_type="classifier-free", condition=labels)
        empty = embeddings.empty[None]
        if labels is None:   # the empty prompt, unguided
            return model_wrapper(network, ns, model_type=model_type, guidance_type="classifier-free", condition=empty)
        uncond = empty.to(labels.device).expand(len(labels), *empty.shape[1:])
        return model_wrapper(network, ns, model_type=model_type, guidance_type="classifier-free",
                             condition=embeddings(labels), unconditional_condition=uncond, guidance_scale=scale)

    sizes = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size, cfg.sample_size)
    shape = (in_channels, *sizes)
    identity = digest({"kind": "pipeline", "unet": folder_digest(path / "unet"),
                       "text_encoder": folder_digest(path / "text_encoder"), "tokenizer": folder_digest(path / "tokenizer"),
                       "scheduler": layout.scheduler, "prompts": digest(prompt_list), "guidance_scale": scale})
    kind = "text" if layout.text else "class" if layout.num_classes else "unconditional"
    name = f"pipeline:{path.name}" + (f"-cfg{scale:g}" if layout.text and scale != 1 else "")
    info = {"checkpoint": str(path), "model_type": model_type, "conditioning": kind, "latent": True,
            **({"ays_family": AYS_PIPELINES[layout.pipeline]} if layout.pipeline in AYS_PIPELINES else {})}
    if layout.text:
        info.update(prompts=str(prompts), num_prompts=len(prompt_list), guidance_scale=scale)
    if loss_space != "latent":
        info["loss_space"] = loss_space
    return ModelSource(name, model_fn_for, ns, shape, identity, make_metric, num_classes=layout.num_classes,
                       info=info, networks=networks, num_prompts=len(prompt_list), decode=vae_decoder(vae),
                       loss_space=loss_space)


def unet_folder_source(checkpoint: str | Path, prompts: str | Path | None = None, guidance_scale: float | None = None,
                       inception_weights: str | Path | None = None, fid_reference: str | Path | None = None,
                       loss_space: str = "latent") -> ModelSource:
    """A UNet2DModel folder (pixel space, ``ats.models.diffusers_unet``); without an FID
    reference it ranks by the distance to the teacher. Its losses are on its samples, which
    are images: ``loss_space`` ``image`` (a VAE's) is refused."""
    from .diffusers_unet import cifar10_source
    for flag, value in (("--prompts", prompts), ("--guidance-scale", guidance_scale)):
        if value is not None:
            raise ValueError(f"{flag} is for text-to-image pipelines; {checkpoint} is an unconditional UNet2DModel "
                             "folder: leave it out")
    problem = loss_space_problem(f"the UNet2DModel folder {checkpoint}", loss_space, has_decoder=False)
    if problem:
        raise ValueError(problem)
    make_metric = _metric_factory(inception_weights, fid_reference)
    return replace(cifar10_source(checkpoint, inception_weights, fid_reference), make_metric=make_metric)


def diffusers_source(checkpoint: str | Path | None = None, prompts: str | Path | None = None,
                     guidance_scale: float | None = None, inception_weights: str | Path | None = None,
                     fid_reference: str | Path | None = None, loss_space: str = "latent") -> ModelSource:
    """Any supported diffusers folder as a model source, by its layout."""
    build = pipeline_source if folder_kind(checkpoint) == "pipeline" else unet_folder_source
    return build(checkpoint, prompts, guidance_scale, inception_weights, fid_reference, loss_space)


def diffusers_noise_schedule(checkpoint: str | Path | None = None, **options: Any) -> NoiseScheduleVP:
    """The folder's noise schedule, without loading (or needing) the networks."""
    if folder_kind(checkpoint) == "unet":
        from .diffusers_unet import checkpoint_noise_schedule
        return checkpoint_noise_schedule(checkpoint)
    layout = read_layout(checkpoint)
    return scheduler_schedule(layout.scheduler, layout.path / "scheduler" / "scheduler_config.json")[0]


def diffusers_problems(checkpoint: str | Path | None = None, prompts: str | Path | None = None,
                       guidance_scale: float | None = None, inception_weights: str | Path | None = None,
                       fid_reference: str | Path | None = None, loss_space: str = "latent") -> list[str]:
    """What is missing or wrong on disk, one line each, before anything loads."""
    from ..metrics import find_inception_weights
    problems = []
    try:
        kind = folder_kind(checkpoint)
        if kind == "unet":
            from .diffusers_unet import check_checkpoint_dir
            check_checkpoint_dir(checkpoint)
            problem = loss_space_problem(f"the UNet2DModel folder {checkpoint}", loss_space, has_decoder=False)
            if problem:
                problems.append(problem)
        elif read_layout(checkpoint).text:
            read_prompts(prompts)
    except ValueError as e:
        problems.append(str(e))
    if fid_reference is not None:
        if not Path(fid_reference).exists():
            problems.append(f"FID reference {fid_reference} does not exist; pass a .npz with mu/sigma or a folder of "
                            "images, or leave --fid-reference out to rank by the L2 to the teacher")
        try:
            find_inception_weights(inception_weights)
        except FileNotFoundError as e:
            problems.append(str(e))
    return problems
