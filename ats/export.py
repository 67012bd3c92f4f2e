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
from .models.wrapper import eps_coefficients
from .noise import EDMSchedule, NoiseSchedule, NoiseScheduleVP, RectifiedFlowSchedule

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


FLOW_CONFIG = {"shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None, "use_karras_sigmas": False,
               "use_exponential_sigmas": False, "use_beta_sigmas": False, "invert_sigmas": False,
               "stochastic_sampling": False}   # sigmas= used as given: the model's sigmas, no shift on top


def _scheduler(result: FitResult, steps: int, noise_schedule: NoiseSchedule) -> tuple[str, dict, str]:
    """The diffusers scheduler that runs ``result.solver`` on a custom list, its config flags
    (to match ats), and which list it takes."""
    if isinstance(noise_schedule, EDMSchedule):
        return "EDMEulerScheduler", {"sigma_schedule": "karras", "sigma_min": noise_schedule.eps,
                                     "sigma_max": noise_schedule.T, "rho": EDM_RHO,
                                     "final_sigmas_type": "sigma_min"}, "sigmas"
    if isinstance(noise_schedule, RectifiedFlowSchedule):   # Euler on v = DDIM = DPM-Solver-1 for flows
        return "FlowMatchEulerDiscreteScheduler", dict(FLOW_CONFIG), "sigmas"
    if result.solver in ("dpm_solver++", "ddim"):   # ats's DDIM (eta 0) is DPM-Solver-1
        order = 1 if result.solver == "ddim" else result.order or 2
        # ats lowers the final orders below 10 steps, diffusers below 15: off for 10..14 steps.
        return "DPMSolverMultistepScheduler", {
            "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "solver_order": order,
            "final_sigmas_type": "sigma_min", "lower_order_final": steps < 10, "euler_at_final": False,
            "use_karras_sigmas": False}, "timesteps"
    return "EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min", "timestep_spacing": "leading",
                                      "use_karras_sigmas": False}, "sigmas"


def model_sigmas(noise_schedule: NoiseSchedule, ts: Tensor) -> Tensor:
    """The noise level the model's own tools use at times ``ts``: sigma_t / alpha_t = exp(-lambda_t)
    for VP and EDM (k-diffusion's sigma), the flow sigma sigma_t (= shifted t) for rectified flow."""
    if isinstance(noise_schedule, RectifiedFlowSchedule):
        return noise_schedule.marginal_std(ts)
    return torch.exp(-noise_schedule.marginal_lambda(ts))


def sigmas_convention(steps: int, last: float) -> str:
    """How the two sigma lists are meant, for the export's ``sigmas_convention``."""
    return (f"sigmas: N+1 = {steps + 1} values, the {steps} network calls' noise levels and the end, {last:.6g} "
            f"(no trailing 0; for samplers that take the whole list and stop at its last value). "
            f"sigmas_with_zero: the same {steps} calls with the end replaced by 0 (k-diffusion / node-UI custom "
            f"sigmas that end at 0); its last step lands on sigma 0 instead of {last:.6g}. Samplers that "
            f"append the 0 themselves take the first {steps} values of either list")


def output_conversion(noise_schedule: NoiseSchedule, model_type: str, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, weight) per step: ats turns a ``model_type`` network's output ``out`` at the
    conditioning time s into its noise prediction with s's coefficients, a diffusers scheduler
    at its own time t with t's; fed scale * out + weight * x, the scheduler gets ats's."""
    def coefficients(u: Tensor) -> tuple[Tensor, Tensor]:
        return eps_coefficients(model_type, noise_schedule.marginal_alpha(u), noise_schedule.marginal_std(u))

    (a_s, b_s), (a_t, b_t) = coefficients(s), coefficients(t)
    return b_s / b_t, (a_s - a_t) / b_t


def diffusers_schedule(result: FitResult, noise_schedule: NoiseSchedule, model_type: str | None = None) -> dict:
    """A global schedule as diffusers' ``set_timesteps`` takes it (JSON-ready).

    Keys: ``times`` (ats, N+1); ``sigmas`` (N+1: the model's sigma at every time, the last
    included, no trailing 0, so ``sigmas=`` keeps the schedule exactly; ``model_sigmas``) and
    ``sigmas_with_zero`` (the last replaced by 0, for samplers that end at sigma 0), with
    ``sigmas_convention`` saying so; ``init_noise_std``: x_T = init_noise_std * N(0, I), ats's
    start. Discrete VP schedules also give ``timesteps`` (N integer training steps, the points of
    the N model calls; the end is ``final_sigmas_type="sigma_min"``, training step 0, t = 1/N)
    with ``timesteps_error_lambda``, the largest |lambda(t) - lambda(rounded t)| over all N+1
    times (the end included); flow schedules ``timesteps``, diffusers' network times sigma * N
    (floats). ``model_timesteps``: where the network is called, when the result has
    conditioning times, with ``model_output_scale`` and ``model_sample_weight`` where the
    network (``model_type``, ats's: default flow for flow schedules, else noise) predicts other
    than the noise: the scheduler takes scale * output + weight * x (``output_conversion``, at
    the scheduler's times: the rounded ones for ``timesteps=``). ``scheduler``: the diffusers
    class and config flags that run ``result.solver`` (or the closest one, see ``notes``);
    ``notes``: what differs."""
    ts = _global_times(result, "diffusers")
    steps = len(ts) - 1
    edm = isinstance(noise_schedule, EDMSchedule)
    flow = isinstance(noise_schedule, RectifiedFlowSchedule)
    discrete = isinstance(noise_schedule, NoiseScheduleVP) and noise_schedule.schedule == "discrete"
    if not (edm or discrete or flow):
        raise ExportError(f"diffusers' VP schedulers are discrete (DDPM training steps), its EDM ones take sigma and "
                          f"its flow ones the flow sigma; this schedule's noise schedule {noise_schedule!r} is none "
                          "of these")
    model_type = model_type or ("flow" if flow else "noise")
    name, config, takes = _scheduler(result, steps, noise_schedule)
    scheduler_times = ts   # the times the scheduler converts the network's output at
    lam = noise_schedule.marginal_lambda(ts)
    sigmas = model_sigmas(noise_schedule, ts).tolist()
    out = {"method": result.method, "solver": result.solver, "order": result.order, "nfe": result.nfe,
           "noise_schedule": repr(noise_schedule), "times": ts.tolist(), "sigmas": sigmas,
           "sigmas_with_zero": sigmas[:-1] + [0.], "sigmas_convention": sigmas_convention(steps, sigmas[-1]),
           "init_noise_std": noise_schedule.marginal_std(ts[0]).item()}
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
        if takes == "timesteps":
            scheduler_times = rounded
        if abs(ts[-1].item() - 1 / n_train) > 1e-9:
            notes.append(f"the schedule ends at t = {ts[-1].item():.6g}, diffusers' timesteps= at training step 0 "
                         f"(t = 1/{n_train}); the error is part of timesteps_error_lambda; sigmas= keeps the end")
    elif flow:
        out["timesteps"] = [s * noise_schedule.total_N for s in sigmas[:-1]]
        notes.append(f"FlowMatchEulerDiscreteScheduler with shift=1.0 takes these (already shifted) sigmas as they "
                     f"are: pass the first {steps} (it appends a terminal 0) and set scheduler.sigmas[-1] to the "
                     f"last, {sigmas[-1]:.6g}, as the snippet does; left at 0, the last step lands on sigma 0 "
                     "(the data prediction) instead. Pipelines (pipe(..., sigmas=sigmas[:-1]) with that "
                     "scheduler) set the timesteps themselves and end at 0")
        notes.append(f"ats starts from x_T = {out['init_noise_std']:.6g} * N(0, I) at sigma {sigmas[0]:.6g}; "
                     "pipelines start from unit noise")
    else:
        lo, hi = noise_schedule.eps, noise_schedule.T
        inv = [s ** (1 / EDM_RHO) for s in (hi, lo)]
        out["edm_ramp"] = [(s ** (1 / EDM_RHO) - inv[0]) / (inv[1] - inv[0]) for s in out["sigmas"]]
        notes.append(f"EDMEulerScheduler reads sigmas= as positions of its Karras ramp: pass edm_ramp with "
                     f"sigma_min={lo:g}, sigma_max={hi:g}, rho={EDM_RHO:g}; with final_sigmas_type='sigma_min' it "
                     f"appends a copy of the last sigma: stop after the first {steps} steps")
    if result.cond_timesteps is not None:
        cond = result.cond_timesteps.detach().to(torch.float64).cpu()
        network_time = noise_schedule.edm_sigma(cond) if edm else noise_schedule.marginal_std(cond) \
            * noise_schedule.total_N if flow else cond * noise_schedule.total_N - 1
        out["model_timesteps"] = network_time.tolist()[:-1]
        notes.append("the network is called at model_timesteps (LD3's offsets), not at the scheduler's "
                     "timesteps: call unet(x, model_timesteps[i]) in the loop and step the scheduler with its own")
        scale, weight = output_conversion(noise_schedule, model_type, cond[:-1], scheduler_times[:-1])
        plain = [torch.allclose(v, torch.full_like(v, c), rtol=0, atol=1e-12) for v, c in ((scale, 1.), (weight, 0.))]
        if not edm and not all(plain):   # EDMEulerScheduler preconditions the output its own way
            out["model_output_scale"] = scale.tolist()
            given = "model_output_scale[i] * output"
            if not plain[1]:
                out["model_sample_weight"] = weight.tolist()
                given += " + model_sample_weight[i] * x"
            notes.append(f"ats turns the {model_type} prediction the network gives at the offset time into the noise "
                         "prediction with that time's coefficients, the scheduler with its own step's: give the "
                         f"scheduler {given} (x the sample the network sees), as the snippet does")
    exact = ("ddim", "euler") if flow else ("dpm_solver++", "ddim", "euler")
    if result.solver not in exact and not edm:
        notes.append(f"no diffusers scheduler runs {result.solver} on a custom schedule (UniPC takes sigmas= only for "
                     "flow models, and then rounds the network's timesteps to integers and ends at 0 or at a repeat "
                     f"of the last sigma; DDIM/iPNDM take none); {name} with {takes}= runs the same times with "
                     f"{'Euler' if flow or name == 'EulerDiscreteScheduler' else 'DPM-Solver'}")
    if name == "EulerDiscreteScheduler":
        notes.append("EulerDiscreteScheduler works on x / alpha_t: its result times alpha at the last time "
                     f"({math.exp(noise_schedule.marginal_log_mean_coeff(ts[-1]).item()):.8f}) is ats's sample; "
                     "it calls the network at training steps interpolated in log sigma")
    out["scheduler"] = {"class": name, "config": config, "takes": takes}
    out["notes"] = notes
    return out


MODEL_DIR = "path/to/model"


def _values(values: list[float]) -> str:
    return repr([round(v, 10) for v in values])


def _converted(scale: bool, weight: bool, x: str) -> str:
    """The snippet's conversion of the network's output (``output_conversion``), if any."""
    return (" * model_output_scale[i]" if scale else "") + (f" + model_sample_weight[i] * {x}" if weight else "")


def diffusers_snippet(export: dict, model_dir: str = MODEL_DIR) -> str:
    """A complete Python script that loads the scheduler config from the model folder
    ``model_dir`` (its ``scheduler/`` in a pipeline folder), sets ``export``'s schedule on the
    scheduler that runs it, prints the timesteps (and ``model_timesteps``, the network's times,
    where the result has conditioning offsets, with the conversion of the network's output
    where it needs one) and, for a UNet2DModel folder (ats's diffusers checkpoints: VP and flow
    models), samples 4 images with the schedule into ``x``; for a VP pipeline folder, a comment
    says how to hand the scheduler to the pipeline."""
    s = export["scheduler"]
    cls, takes = s["class"], s["takes"]
    edm, flow = cls == "EDMEulerScheduler", cls == "FlowMatchEulerDiscreteScheduler"
    steps = len(export["times"]) - 1
    flags = ", ".join(f"{k}={v!r}" for k, v in s["config"].items())
    offsets = "model_timesteps" in export
    lines = [f'"""The {export["method"]} schedule made by ats ({export["solver"]}, NFE {export["nfe"]}) on '
             f'{export["noise_schedule"]}."""',
             "import os", "", "import torch", f"from diffusers import {cls}, UNet2DModel", "",
             f"MODEL_DIR = {str(model_dir)!r}   # the model folder (a UNet2DModel checkpoint, or a pipeline)",
             'SUB = "scheduler" if os.path.isdir(os.path.join(MODEL_DIR, "scheduler")) else None',
             f"scheduler = {cls}.from_pretrained(MODEL_DIR, subfolder=SUB, {flags})"]
    if edm:   # EDMEulerScheduler takes positions on its Karras ramp, as a tensor
        lines += [f"edm_ramp = {_values(export['edm_ramp'])}",
                  "scheduler.set_timesteps(sigmas=torch.tensor(edm_ramp))",
                  f"timesteps = scheduler.timesteps[:{steps}]   # it appends a copy of the last sigma: stop there"]
    elif flow:
        lines += [f"sigmas = {_values(export['sigmas'])}   # the model's sigmas, N + 1, no trailing 0",
                  "scheduler.set_timesteps(sigmas=sigmas[:-1])   # shift=1.0: as given; it appends 0 ...",
                  "scheduler.sigmas[-1] = sigmas[-1]             # ... the schedule ends at its last sigma",
                  "timesteps = scheduler.timesteps"]
    else:
        values = _values(export[takes]) if takes == "sigmas" else repr(export[takes])
        lines += [f"{takes} = {values}",
                  f"scheduler.set_timesteps({takes}={takes})", "timesteps = scheduler.timesteps"]
    lines.append('print("timesteps", [round(float(t), 4) for t in timesteps])')
    scale, weight = "model_output_scale" in export, "model_sample_weight" in export
    if offsets:
        lines += ["# where the network is called (LD3's offsets); a tensor: UNet2DModel truncates Python numbers",
                  f"model_timesteps = torch.tensor({_values(export['model_timesteps'])})",
                  'print("model_timesteps", [round(float(t), 4) for t in model_timesteps])']
    if scale:   # the network's output at model_timesteps as the scheduler reads it at its timesteps
        lines.append(f"model_output_scale = {_values(export['model_output_scale'])}")
    if weight:
        lines.append(f"model_sample_weight = {_values(export['model_sample_weight'])}")
    if edm:
        return "\n".join(lines) + "\n"
    net_time = "model_timesteps[i]" if offsets else "t"
    lines.append("")
    if not flow:   # ats drives flow models as UNet2DModel folders only
        lines.append("# a pipeline folder: pipe = DiffusionPipeline.from_pretrained(MODEL_DIR, scheduler=scheduler); "
                     f"pipe(prompt, {takes}={takes})")
    if offsets and not flow:
        lines.append("# (a pipeline calls its UNet at the scheduler's timesteps: for model_timesteps, loop as below "
                     "with its UNet and conditions)")
    lines += ["if SUB is None:   # a UNet2DModel checkpoint: sample 4 images with the schedule",
              "    unet = UNet2DModel.from_pretrained(MODEL_DIR).eval()",
              "    c, size = unet.config.in_channels, unet.config.sample_size",
              "    noise = torch.randn(4, c, size, size, generator=torch.Generator().manual_seed(0))"]
    if cls == "EulerDiscreteScheduler":   # works on x / alpha_t
        alpha_end = math.exp(-0.5 * math.log1p(export["sigmas"][-1] ** 2))
        lines += [f"    x = {export['init_noise_std']!r} * noise * (1 + scheduler.sigmas[0] ** 2) ** 0.5   # x_T / alpha",
                  "    with torch.no_grad():",
                  "        for i, t in enumerate(timesteps):",
                  "            x_in = scheduler.scale_model_input(x, t)",
                  f"            out = unet(x_in, {net_time}).sample" + _converted(scale, weight, "x_in"),
                  "            x = scheduler.step(out, t, x).prev_sample",
                  f"    x = x * {alpha_end!r}   # back from x / alpha_t"]
    else:
        lines += [f"    x = {export['init_noise_std']!r} * noise   # x_T as ats starts",
                  "    with torch.no_grad():",
                  "        for i, t in enumerate(timesteps):",
                  f"            out = unet(x, {net_time}).sample" + _converted(scale, weight, "x"),
                  "            x = scheduler.step(out, t, x).prev_sample"]
    lines.append('    print("samples", tuple(x.shape), "in", (x.min().item(), x.max().item()))')
    return "\n".join(lines) + "\n"


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
        if result.info.get("vs_start", {}).get("kept") == "start":
            raise ExportError(f"this {result.method} result kept the global schedule it started from (its predictor "
                              "was no better on the validation seeds), so it holds no predictor: use --format "
                              "diffusers, or refit with --option fallback=false to keep the predictor")
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
