"""Learned schedules for use outside ats.

- ``diffusers_schedule``: a global schedule as diffusers takes it. Discrete VP models (DDPM's
  1000 training steps): a ``timesteps=`` list of integer training steps (diffusers step k is
  ats time t = (k + 1) / N) and a ``sigmas=`` list (sigma = sigma_t / alpha_t, every time
  exactly, the last included). EDM schedules: ``sigmas=`` only (sigma = t). Integer timesteps
  round the learned times; the rounding error is reported in lambda.
- ``export_torch``: a per-sample predictor as TorchScript files plus a small Python loader
  (``sample(x_T, labels)``, and ``schedule(x_T, labels)`` for one-shot predictors) that needs
  torch only, not ats.

diffusers schedulers hold one schedule for the whole batch, so per-sample schedules
(predictors, the oracle) cannot be handed to them.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .methods.common import FitResult
from .methods.predictors import DeltaPredictor, OneShotPredictor, PredictorSampler
from .models.base import ModelSource
from .noise import EDMSchedule, NoiseSchedule, NoiseScheduleVP

EDM_RHO = 7.


class ExportError(ValueError):
    """The result cannot be exported in the format asked for; the message says what can."""


def _global_times(result: FitResult, fmt: str) -> Tensor:
    if result.timesteps is None:
        kind = "a per-sample predictor" if result.predictor is not None else "per-sample schedules"
        hint = "use --format torch" if result.predictor is not None else "export a global schedule"
        raise ExportError(f"{result.method} gives {kind}, one schedule per sample, but {fmt} schedulers hold one "
                          f"schedule for the whole batch; {hint} (or export a global schedule, e.g. an LD3 run's)")
    return result.timesteps.detach().to(torch.float64).cpu()


def _scheduler(result: FitResult, steps: int, noise_schedule: NoiseSchedule) -> tuple[str, dict, str]:
    """The diffusers scheduler that runs ``result.solver`` on a custom list, its config flags
    (to match ats), and which list it takes."""
    if isinstance(noise_schedule, EDMSchedule):
        return "EDMEulerScheduler", {"sigma_schedule": "karras", "sigma_min": noise_schedule.eps,
                                     "sigma_max": noise_schedule.T, "rho": EDM_RHO,
                                     "final_sigmas_type": "sigma_min"}, "sigmas"
    if result.solver in ("dpm_solver++", "ddim"):   # ats's DDIM (eta 0) is DPM-Solver-1
        order = 1 if result.solver == "ddim" else result.order or 2
        # ats lowers the final orders below 10 steps, diffusers below 15: off for 10..14 steps.
        return "DPMSolverMultistepScheduler", {
            "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "solver_order": order,
            "final_sigmas_type": "sigma_min", "lower_order_final": steps < 10, "euler_at_final": False,
            "use_karras_sigmas": False}, "timesteps"
    return "EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min", "timestep_spacing": "leading",
                                      "use_karras_sigmas": False}, "sigmas"


def diffusers_schedule(result: FitResult, noise_schedule: NoiseSchedule) -> dict:
    """A global schedule as diffusers' ``set_timesteps`` takes it (JSON-ready).

    Keys: ``times`` (ats, N+1), ``sigmas`` (N+1: sigma_t / alpha_t at every time, the last
    included, so ``sigmas=`` keeps the schedule exactly), and for discrete VP schedules
    ``timesteps`` (N integer training steps, the points of the N model calls; the end is
    ``final_sigmas_type="sigma_min"``, training step 0, t = 1/N) with
    ``timesteps_error_lambda``, the largest |lambda(t) - lambda(rounded t)| over all N+1
    times (the end included). ``model_timesteps``: where the network is called, when the
    result has conditioning times. ``scheduler``: the diffusers class and config flags that
    run ``result.solver`` (or the closest one, see ``notes``); ``notes``: what differs."""
    ts = _global_times(result, "diffusers")
    steps = len(ts) - 1
    edm = isinstance(noise_schedule, EDMSchedule)
    discrete = isinstance(noise_schedule, NoiseScheduleVP) and noise_schedule.schedule == "discrete"
    if not (edm or discrete):
        raise ExportError(f"diffusers' VP schedulers are discrete (DDPM training steps) and its EDM ones take sigma; "
                          f"this schedule's noise schedule {noise_schedule!r} is neither")
    lam = noise_schedule.marginal_lambda(ts)
    out = {"method": result.method, "solver": result.solver, "order": result.order, "nfe": result.nfe,
           "noise_schedule": repr(noise_schedule), "times": ts.tolist(), "sigmas": torch.exp(-lam).tolist()}
    notes = []
    if discrete:
        n_train = noise_schedule.total_N
        ks = (ts * n_train - 1).round().clamp(0, n_train - 1).long()
        if not (ks[1:-1] < ks[:-2]).all() or ks[-2] <= 0:
            raise ExportError(f"two times of this schedule round to the same training step ({ks.tolist()}); "
                              "use sigmas= (EulerDiscreteScheduler), which keeps every time exactly")
        rounded = torch.cat([ks[:-1], ks.new_zeros(1)]).to(torch.float64).add(1) / n_train
        out["timesteps"] = ks[:-1].tolist()
        out["timesteps_error_lambda"] = (noise_schedule.marginal_lambda(rounded) - lam).abs().max().item()
        if abs(ts[-1].item() - 1 / n_train) > 1e-9:
            notes.append(f"the schedule ends at t = {ts[-1].item():.6g}, diffusers' timesteps= at training step 0 "
                         f"(t = 1/{n_train}); the error is part of timesteps_error_lambda; sigmas= keeps the end")
    else:
        lo, hi = noise_schedule.eps, noise_schedule.T
        inv = [s ** (1 / EDM_RHO) for s in (hi, lo)]
        out["edm_ramp"] = [(s ** (1 / EDM_RHO) - inv[0]) / (inv[1] - inv[0]) for s in out["sigmas"]]
        notes.append(f"EDMEulerScheduler reads sigmas= as positions of its Karras ramp: pass edm_ramp with "
                     f"sigma_min={lo:g}, sigma_max={hi:g}, rho={EDM_RHO:g}; with final_sigmas_type='sigma_min' it "
                     f"appends a copy of the last sigma: stop after the first {steps} steps")
    if result.cond_timesteps is not None:
        cond = result.cond_timesteps.detach().to(torch.float64).cpu()
        out["model_timesteps"] = (noise_schedule.edm_sigma(cond) if edm else cond * noise_schedule.total_N - 1
                                  ).tolist()[:-1]
        notes.append("the network is called at model_timesteps (LD3's offsets), not at the scheduler's "
                     "timesteps: call unet(x, model_timesteps[i]) in the loop and step the scheduler with its own")
    name, config, takes = _scheduler(result, steps, noise_schedule)
    if result.solver not in ("dpm_solver++", "ddim", "euler") and not edm:
        notes.append(f"no diffusers scheduler runs {result.solver} on a custom schedule (UniPC takes sigmas= "
                     f"only for flow models, DDIM/iPNDM neither); {name} with {takes}= runs the same times "
                     "with another solver")
    if name == "EulerDiscreteScheduler":
        notes.append("EulerDiscreteScheduler works on x / alpha_t: its result times alpha at the last time "
                     f"({math.exp(noise_schedule.marginal_log_mean_coeff(ts[-1]).item()):.8f}) is ats's sample; "
                     "it calls the network at training steps interpolated in log sigma")
    out["scheduler"] = {"class": name, "config": config, "takes": takes}
    out["notes"] = notes
    return out


def diffusers_snippet(export: dict) -> str:
    """A short Python snippet that sets ``export``'s schedule on a diffusers scheduler."""
    s = export["scheduler"]
    flags = ", ".join(f"{k}={v!r}" for k, v in s["config"].items())
    edm = s["class"] == "EDMEulerScheduler"
    values = repr([round(v, 10) for v in (export["edm_ramp"] if edm else export[s["takes"]])])
    lines = ["import torch"] * edm + [f"from diffusers import {s['class']}",
             f"scheduler = {s['class']}.from_config(pipe.scheduler.config, {flags})",
             f"scheduler.set_timesteps({s['takes']}={f'torch.tensor({values})' if edm else values})"]
    if edm:   # EDMEulerScheduler takes a tensor, not a list
        lines.append(f"timesteps = scheduler.timesteps[:{len(export['times']) - 1}]")
    return "\n".join(lines)


class _Schedule(nn.Module):
    """A one-shot predictor's schedules, (x_T, labels) -> times [B, N+1]."""

    def __init__(self, sampler: PredictorSampler) -> None:
        super().__init__()
        self.predictor, self.sampler = sampler.predictor, sampler

    def forward(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.sampler.timesteps(x_T, labels)


class _Sample(nn.Module):
    """The whole sampler, network included: (x_T, labels) -> (x0, times [B, N+1])."""

    def __init__(self, sampler: PredictorSampler) -> None:
        super().__init__()
        self.predictor, self.networks, self.sampler = sampler.predictor, nn.ModuleList(sampler.source.networks), sampler

    def forward(self, x_T: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.sampler(x_T, labels)


LOADER = '''"""A per-sample schedule predictor exported by ats; needs torch only.

sample(x_T, labels=None) -> (x0, times [B, N+1]): the network, the predictor and the solver,
traced together (TorchScript). schedule(x_T, labels=None) -> times [B, N+1] (one-shot
predictors): each sample's times, continuous t as in the meta.json noise schedule. The traced
files take batches of meta.json's "batch" samples; any other batch is split and padded here.
"""
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
META = json.loads((HERE / "meta.json").read_text())
_loaded = {}


def _module(name):
    if name not in _loaded:
        if not (HERE / name).is_file():
            raise ValueError(f"{name} is not part of this export ({META['method']} predictor)")
        _loaded[name] = torch.jit.load(str(HERE / name), map_location="cpu")
    return _loaded[name]


def _batched(name, x_T, labels):
    if (labels is None) != (META["num_classes"] == 0):
        raise ValueError("pass labels (one class per sample)" if META["num_classes"] else "this model takes no labels")
    dtype = getattr(torch, META["dtype"])
    x_T, size, outs = x_T.to(dtype), META["batch"], []
    for start in range(0, len(x_T), size):
        x = x_T[start:start + size]
        pad = size - len(x)
        args = [torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])]
        if labels is not None:
            y = labels[start:start + size].long()
            args.append(torch.cat([y, y[-1:].expand(pad)]))
        with torch.no_grad():
            out = _module(name)(*args)
        outs.append([o[:len(x)] for o in (out if isinstance(out, tuple) else (out,))])
    return [torch.cat(parts) for parts in zip(*outs)]


def sample(x_T, labels=None):
    """(x0, times [B, N+1]) for starting noise x_T (and class labels for conditional models)."""
    x0, times = _batched("sampler.pt", x_T, labels)
    return x0, times


def schedule(x_T, labels=None):
    """Each sample's times [B, N+1] (one-shot predictors)."""
    return _batched("schedule.pt", x_T, labels)[0]
'''


def export_torch(result: FitResult, source: ModelSource, out: str | Path, batch: int = 16) -> list[Path]:
    """Write a predictor result as ``sampler.pt`` (TorchScript: the source's network, the
    predictor and ``result.solver``, traced for batches of ``batch``), ``schedule.pt``
    (one-shot predictors: x_T -> times), ``meta.json`` and ``ats_predictor.py`` (the loader,
    torch only) into the folder ``out``; returns the files."""
    if not isinstance(result.predictor, (OneShotPredictor, DeltaPredictor)):
        if result.timesteps is not None:
            raise ExportError(f"{result.method} gives one global schedule: use --format diffusers (or its "
                              "schedule.json); --format torch is for the oneshot and delta predictors")
        raise ExportError(f"{result.method} holds schedules of its own fitted samples only, no predictor to export; "
                          "its per-sample schedules are in the run's per_sample.npz")
    if source.num_prompts:
        raise ExportError(f"{source.name} is text-conditional: its prompt embeddings are looked up outside what "
                          "--format torch traces, so the export would keep the prompts of its tracing batch; sample "
                          "the predictor with ats (ats sample), or export a global schedule with --format diffusers")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sampler = PredictorSampler(result.predictor.eval(), source, result.solver, result.order,
                               result.info.get("space", "lambda"))
    x = source.latents(range(batch), dtype=source.dtype)
    labels = source.labels(range(batch))
    args = (x,) if labels is None else (x, labels)
    modules = {"sampler.pt": _Sample(sampler)}
    if isinstance(result.predictor, OneShotPredictor):
        modules["schedule.pt"] = _Schedule(sampler)
    files = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)   # input checks traced as constants
        for name, module in modules.items():
            traced = torch.jit.trace(module, args, check_trace=False)
            torch.jit.save(traced, str(out / name))
            files.append(out / name)
    meta = {"method": result.method, "solver": result.solver, "order": result.order, "nfe": result.nfe,
            "source": source.name, "noise_schedule": repr(source.noise_schedule), "batch": batch,
            "shape": list(source.shape), "dtype": str(source.dtype).removeprefix("torch."),
            "num_classes": source.num_classes}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "ats_predictor.py").write_text(LOADER)
    return files + [out / "meta.json", out / "ats_predictor.py"]
