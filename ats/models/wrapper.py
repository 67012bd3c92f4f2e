"""Turn any diffusion network into ``model_fn(x, t)`` -> noise prediction.

Follows DPM-Solver's ``model_wrapper``: the solvers only ever see a noise prediction in
continuous time t, whatever the network predicts and whatever time input it expects.

Time input: discrete-time VP models (``NoiseScheduleVP('discrete')``) get
(t - 1/N) * 1000, flow models (``RectifiedFlowSchedule``) diffusers' timestep sigma_t * N
(the shifted sigma times ``num_train_timesteps``), continuous ones t, and EDM denoisers
(``model_type="edm"``) the noise level sigma = sigma_t / alpha_t together with x / alpha_t
(Karras et al., 2022).

Conversions to the noise prediction eps (x_t = alpha_t x0 + sigma_t eps):
noise: eps; x_start: (x - alpha_t x0) / sigma_t; v (= alpha_t eps - sigma_t x0):
(alpha_t v + sigma_t x) / (alpha_t^2 + sigma_t^2), which is alpha_t v + sigma_t x for VP;
score: -sigma_t * score; edm: (x - alpha_t D(x / alpha_t; sigma)) / sigma_t;
flow (the velocity v = eps - x0 of rectified flow / flow matching): x = alpha_t x0 + sigma_t eps
= (alpha_t + sigma_t) eps - alpha_t v, so eps = (x + alpha_t v) / (alpha_t + sigma_t), which is
x + alpha_t v = x + (1 - sigma_t) v when alpha_t + sigma_t = 1 (and x0 = x - sigma_t v).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..noise import NoiseSchedule, NoiseScheduleVP, RectifiedFlowSchedule
from ..tensors import expand_dims

MODEL_TYPES = ("noise", "x_start", "v", "score", "edm", "flow")
GUIDANCE_TYPES = ("uncond", "classifier", "classifier-free")


def _batch_cat(a: Any, b: Any) -> Any:
    """Concatenate two conditions along the batch: tensors, or dicts of tensors."""
    if isinstance(a, Mapping):
        return {k: _batch_cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])


def eps_coefficients(model_type: str, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) with eps = a * x + b * out: the noise prediction from the sample x and the output
    ``out`` of a ``model_type`` network at a time of coefficients alpha, sigma (the conversions
    above; for edm, x itself, not the input x / alpha)."""
    if model_type in ("x_start", "edm"):
        return 1 / sigma, -alpha / sigma
    if model_type == "v":
        norm = alpha ** 2 + sigma ** 2
        return sigma / norm, alpha / norm
    if model_type == "flow":
        return 1 / (alpha + sigma), alpha / (alpha + sigma)
    if model_type == "score":
        return torch.zeros_like(sigma), -sigma
    if model_type == "noise":
        return torch.zeros_like(sigma), torch.ones_like(sigma)
    raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")


def model_wrapper(model: Callable, noise_schedule: NoiseSchedule, model_type: str = "noise",
                  guidance_type: str = "uncond", guidance_scale: float = 1.,
                  condition: Any = None, unconditional_condition: Any = None,
                  classifier_fn: Callable | None = None, classifier_kwargs: dict | None = None,
                  model_kwargs: dict | None = None,
                  cond_process_fn: Callable[[Any], Any] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap ``model`` into ``model_fn(x, t)`` returning the noise prediction at time t.

    ``model`` is called as ``model(x, t_input, **model_kwargs)``, or
    ``model(x, t_input, cond, **model_kwargs)`` when a condition is given.
    Guidance (DPM-Solver's conventions):
    - ``classifier``: eps - guidance_scale * sigma_t * grad_x classifier_fn(x, t_input, condition).
      ``classifier_fn`` returns log p(condition | x_t) per sample.
    - ``classifier-free``: eps_u + guidance_scale * (eps_c - eps_u), one batched call on
      [x, x] with [unconditional_condition, condition]; tensors in ``model_kwargs`` whose
      first dimension is the batch size are repeated to match.
    ``cond_process_fn`` maps the condition (and the unconditional one) before it reaches the
    network, or ``classifier_fn`` under classifier guidance, e.g. a label or text encoder;
    it runs once here, not at every call.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    if guidance_type not in GUIDANCE_TYPES:
        raise ValueError(f"unknown guidance_type {guidance_type!r}; choose one of {', '.join(GUIDANCE_TYPES)}")
    if guidance_type == "classifier" and (classifier_fn is None or condition is None):
        raise ValueError("guidance_type='classifier' needs classifier_fn= and condition=")
    if guidance_type == "classifier-free" and condition is None:
        raise ValueError("guidance_type='classifier-free' needs condition= (and unconditional_condition=)")
    if guidance_type == "classifier-free" and guidance_scale != 1. and unconditional_condition is None:
        raise ValueError("classifier-free guidance with guidance_scale != 1 needs unconditional_condition=")
    model_kwargs = dict(model_kwargs or {})
    classifier_kwargs = dict(classifier_kwargs or {})
    if cond_process_fn is not None:
        condition = cond_process_fn(condition) if condition is not None else None
        if unconditional_condition is not None:
            unconditional_condition = cond_process_fn(unconditional_condition)
    discrete = isinstance(noise_schedule, NoiseScheduleVP) and noise_schedule.schedule == "discrete"
    flow = isinstance(noise_schedule, RectifiedFlowSchedule)

    def time_input(t: Tensor) -> Tensor:
        if model_type == "edm":
            return noise_schedule.edm_sigma(t)
        if flow:
            return noise_schedule.marginal_std(t) * noise_schedule.total_N
        if discrete:
            return (t - 1. / noise_schedule.total_N) * 1000.
        return t

    def noise_pred(x: Tensor, t: Tensor, cond: Any, kwargs: dict) -> Tensor:
        if model_type == "noise":
            return model(*((x, time_input(t)) if cond is None else (x, time_input(t), cond)), **kwargs)
        alpha = expand_dims(noise_schedule.marginal_alpha(t), x.ndim)
        sigma = expand_dims(noise_schedule.marginal_std(t), x.ndim)
        x_in = x / alpha if model_type == "edm" else x
        out = model(*((x_in, time_input(t)) if cond is None else (x_in, time_input(t), cond)), **kwargs)
        a, b = eps_coefficients(model_type, alpha, sigma)
        return a * x + b * out

    def cond_grad(x: Tensor, t: Tensor) -> Tensor:
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            log_prob = classifier_fn(x_in, time_input(t), condition, **classifier_kwargs)
            return torch.autograd.grad(log_prob.sum(), x_in, create_graph=create_graph)[0]

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"model_fn: t has {t.shape[0]} entries for a batch of {x.shape[0]}; "
                             "pass a scalar or one time per sample")
        if guidance_type == "uncond":
            return noise_pred(x, t, None, model_kwargs)
        if guidance_type == "classifier":
            sigma = expand_dims(noise_schedule.marginal_std(t), x.ndim)
            return noise_pred(x, t, None, model_kwargs) - guidance_scale * sigma * cond_grad(x, t)
        if guidance_scale == 1. or unconditional_condition is None:
            return noise_pred(x, t, condition, model_kwargs)
        batch = x.shape[0]
        kwargs = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v
                  for k, v in model_kwargs.items()}
        eps_u, eps_c = noise_pred(torch.cat([x, x]), torch.cat([t, t]),
                                  _batch_cat(unconditional_condition, condition), kwargs).chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    return model_fn
