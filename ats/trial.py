"""One trial of a study, without Ray: fit a method (or take a baseline), score it by FID on
the validation seeds (the search objective) and on the held-out evaluation seeds, and write
its result folder. ``ats.tune`` runs these on Ray workers; ``ats.tracking`` logs the folders.

Result folder: ``result.pt`` (``ats.methods.common.load_result``), ``schedule.json`` (global
schedules), ``per_sample.npz`` (per-sample schedules with their seeds), ``history.json``
(loss curves), ``metrics.json``, ``schedule.png``, ``samples.pt`` (the samples of the first
evaluation seeds) and, for image models, ``samples.png``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .atomic import write_atomic
from .baselines import steps_for_nfe
from .discretize import KINDS
from .evaluate import baseline_result, result_samples
from .methods.predictors import PredictorSampler
from .methods import fit_method
from .methods.common import FitResult, save_result, save_schedule_json
from .metrics import frechet_distance, l2_loss
from .models.sources import ModelSource, load_source
from .solvers import sample
from .study import Study
from .teacher import TeacherData, generate_teacher, split_seeds

Progress = Callable[[dict], None]
GRID_SAMPLES = 64


@dataclass
class Scored:
    result: FitResult
    metrics: dict[str, float]   # fid_valid, l2_valid, fid_eval, l2_eval, fit_seconds
    samples: torch.Tensor       # the first evaluation samples (for the grid)


def study_source(study: Study) -> ModelSource:
    return load_source(study.dataset, **study.source_options())


def check_inputs(study: Study) -> ModelSource:
    """Everything a study reads from disk, checked before anything runs: one error that lists
    every missing file and where it goes (cifar10: checkpoint, InceptionV3 weights, FID reference)."""
    problems = []
    if study.dataset == "cifar10":
        from .metrics import find_inception_weights
        from .models.diffusers_unet import check_checkpoint_dir
        opts = study.source_options()
        for check in (lambda: check_checkpoint_dir(opts.get("checkpoint")),
                      lambda: find_inception_weights(opts.get("inception_weights"))):
            try:
                check()
            except (ValueError, FileNotFoundError) as e:
                problems.append(str(e))
        if not opts.get("fid_reference"):
            problems.append("cifar10 FID needs --fid-reference: a .npz with mu/sigma of the real images "
                            "(or a folder of real images)")
    if problems:
        raise FileNotFoundError("; ".join(problems))
    return study_source(study)


def split_data(study: Study, source: ModelSource, split: str, cache: str | Path,
               device: torch.device | str | None = None) -> TeacherData:
    """Teacher data of a split (cached) on ``device``: what the fits see (train, valid) and the
    held-out eval."""
    n = {"train": study.n_train, "valid": study.n_valid, "eval": study.n_eval}[split]
    return generate_teacher(source, split_seeds(split, n), study.teacher, cache, dtype=source.dtype,
                            device=device).to(device)


def fit(study: Study, source: ModelSource, method: str, solver: str, nfe: int, options: dict[str, Any],
        cache: str | Path, progress: Progress | None = None, device: torch.device | str | None = None) -> FitResult:
    """A baseline's schedule (fixed discretizations, dmn, gits) or a method's fit."""
    if method in KINDS:
        return baseline_result(source, method, solver, nfe, study.order)
    if progress is not None and method not in ("dmn", "gits"):
        options = {**options, "progress": _progress_adapter(progress)}
    return fit_method(method, source, solver, nfe, study.order, study.n_train, study.n_valid, study.teacher,
                      cache, study.seed, options, device=device)


def _progress_adapter(progress: Progress) -> Callable[..., None]:
    """The methods call progress(step, train_loss, valid_loss) or progress(round, step, loss)."""
    def report(*args) -> None:
        if isinstance(args[0], str):
            progress({"phase": args[0], "step": int(args[1]), "loss": float(args[2])})
        else:
            progress({"phase": "fit", "step": int(args[0]), "loss": float(args[-1])})
    return report


def score(study: Study, source: ModelSource, result: FitResult, method_options: dict[str, Any],
          split: str, cache: str | Path,
          device: torch.device | str | None = None) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
    """FID and mean L2 to the teacher on a split's seeds, the first samples (for the grid), and
    the per-sample schedules used there (predictors, oracle; None for a global schedule).
    Per-sample (oracle) schedules belong to their own samples: the oracle is refitted on the
    split's samples, with the same settings, from the same starting schedule."""
    data = split_data(study, source, split, cache, device)
    schedules = None
    if result.per_sample is not None:
        from .methods.oracle import fit_oracle
        init = torch.tensor(result.info["init_theta"]) if "init_theta" in result.info else None
        options = {k: v for k, v in method_options.items() if k not in ("ld3", "progress")}
        schedules = fit_oracle(source, data, result.solver, steps_for_nfe(result.solver, result.nfe), result.order,
                               init=init, seed=study.seed, **options).per_sample
        with torch.no_grad():
            out = sample(source.model_fn_for(data.labels), source.noise_schedule, data.latents,
                         schedules.to(data.latents.dtype), result.solver, order=result.order)
    elif result.predictor is not None:
        with torch.no_grad():
            out, schedules = PredictorSampler(result.predictor, source, result.solver, result.order,
                                              result.info.get("space", "lambda"))(data.latents, data.labels)
    else:
        out = result_samples(source, result, data.latents, data.labels)
    metrics = {f"fid_{split}": frechet_distance(source.make_metric(), out),
               f"l2_{split}": l2_loss(out, data.targets).mean().item()}
    return metrics, out[:GRID_SAMPLES], schedules


def run_trial(study: Study, method: str, solver: str, nfe: int, options: dict[str, Any], out: str | Path,
              cache: str | Path, progress: Progress | None = None, source: ModelSource | None = None,
              device: torch.device | str | None = None) -> Scored:
    """Fit, score on the validation and evaluation seeds, write the result folder ``out``.
    ``device``: where the fit and the sampling run (the source's networks are moved there)."""
    source = (source or study_source(study)).to(device or "cpu")
    start = time.perf_counter()
    result = fit(study, source, method, solver, nfe, options, cache, progress, device)
    seconds = time.perf_counter() - start
    metrics, _, _ = score(study, source, result, options, "valid", cache, device)
    eval_metrics, samples, schedules = score(study, source, result, options, "eval", cache, device)
    metrics.update(eval_metrics, fit_seconds=seconds)
    if schedules is not None:   # saved with the evaluation seeds they belong to
        result.per_sample = schedules.detach().cpu()
        result.seeds = torch.tensor(list(split_seeds("eval", study.n_eval)))
    scored = Scored(_on_cpu(result), metrics, samples.cpu())
    write_folder(scored, source, out)
    return scored


def _on_cpu(result: FitResult) -> FitResult:
    """Tensors and predictor on the CPU, so the saved result loads anywhere."""
    for name in ("timesteps", "cond_timesteps", "per_sample", "seeds"):
        value = getattr(result, name)
        if value is not None:
            setattr(result, name, value.detach().cpu())
    if result.predictor is not None:
        result.predictor.cpu()
    return result


def write_folder(scored: Scored, source: ModelSource, out: str | Path) -> Path:
    """The result folder of a trial or baseline (every file written, then renamed)."""
    from .plots import plot_schedule_spread, plot_schedules, save_image_grid
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = scored.result
    save_result(result, out / "result.pt")
    _json(out / "metrics.json", scored.metrics)
    _json(out / "history.json", result.history)
    title = f"{result.method}, {result.solver} NFE {result.nfe}"
    if result.timesteps is not None:
        save_schedule_json(result, out / "schedule.json")
        plot_schedules({result.method: result.timesteps}, source.noise_schedule, out / "schedule.png", title=title)
    if result.per_sample is not None:
        seeds = np.asarray(result.seeds) if result.seeds is not None else np.arange(len(result.per_sample))
        write_atomic(out / "per_sample.npz", lambda tmp: np.savez(tmp, timesteps=result.per_sample.numpy(),
                                                                    seeds=seeds))
        start = result.info.get("ld3_timesteps", None)   # the global schedule a predictor started from
        plot_schedule_spread(result.per_sample, source.noise_schedule, out / "schedule.png",
                             reference=None if start is None else torch.tensor(start))
    write_atomic(out / "samples.pt", lambda tmp: torch.save(scored.samples, tmp))   # first evaluation seeds
    if len(source.shape) == 3:
        save_image_grid(scored.samples, out / "samples.png", scale=4 if source.shape[-1] <= 16 else 1)
    return out


def _json(path: Path, data: Any) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
