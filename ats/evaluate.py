"""Use a fit: score it on fresh evaluation seeds against the baselines (``ats fit``, ``ats
evaluate``) and draw samples from it beside the same seeds under a baseline (``ats sample``).

A fit is a global schedule, a predictor (one schedule per sample, from its x_T), or per-sample
oracle schedules. Oracle schedules were fitted on each of their own samples: they belong to
those seeds (``FitResult.seeds``), so they can be drawn there but not scored on fresh seeds
(that would be a new oracle fit, an upper bound rather than a schedule for new noise).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from .solvers import steps_for_nfe
from .discretize import AYS, FIXED, KINDS, ays_timesteps, check_time_range, get_timesteps
from .methods import METHODS, fit_method
from .methods.common import FitResult
from .methods.results import GIVE, load_result, result_from_data, sample_result
from .intervals import FidEstimate
from .losses import l2_loss
from .metrics import TeacherDistance, fake_features, features_estimate
from .models.base import ModelSource
from .report import Row, compare, rich_table
from .teacher import DEFAULT_CACHE, TeacherConfig, generate_teacher, split_seeds

Progress = Callable[[str, int], None]   # (task, advance): "teacher" in samples, "sampling" in schedules


EVAL_SAMPLES = 20000   # default of `ats evaluate` and `ats fit` (docs/quality.md: what it resolves)
L2_SAMPLES = 1000   # the L2 column uses the teacher targets of a split's first seeds only (NFE 20 each)


def seed_set(split: str, n: int, start: int = 0) -> str:
    """The name of samples start..start+n-1 of a split: FIDs on the same seed set are paired."""
    return f"{split}:{start}+{n}"


def baseline_result(source: ModelSource, name: str, solver: str, nfe: int, order: int | None, n_train: int = 50,
                    cache: str | Path = DEFAULT_CACHE) -> FitResult:
    """A baseline's schedule: a fixed discretization, or DMN / GITS fitted as ``ats search``
    fits them (GITS on the first ``n_train`` training seeds)."""
    if name in KINDS or name == AYS:
        steps = steps_for_nfe(solver, nfe)
        if name == AYS:
            ts = ays_timesteps(source.noise_schedule, steps, ays_family(source), dtype=source.dtype)
        else:
            ts = get_timesteps(source.noise_schedule, name, steps, dtype=source.dtype)
        return FitResult(name, solver, order, steps, timesteps=ts, info=source.model_info())
    return fit_method(name, source, solver, nfe, order, n_train=n_train, cache=cache)


def ays_family(source: ModelSource) -> str:
    """The Align Your Steps family of the source's pipeline (sd15, sdxl, svd); a one-line error
    for models AYS ships no reference schedule for."""
    family = source.info.get("ays_family")
    if family is None:
        raise ValueError(f"baseline ays: Align Your Steps ships reference schedules for Stable Diffusion 1.5, SDXL "
                         f"and Stable Video Diffusion pipelines only, not {source.name}; leave ays out of the baselines")
    return family


def baseline_problem(source: ModelSource, result: FitResult, name: str) -> str | None:
    """Why baseline ``name`` cannot run at the fit's solver and steps (GITS beyond its fine
    grid, DMN with another solver), or None."""
    if name == AYS:
        try:
            ays_timesteps(source.noise_schedule, result.steps, ays_family(source))
        except ValueError as e:
            return str(e).removeprefix("baseline ays: ")
        return None
    if name not in METHODS:
        return None
    return METHODS[name].unsupported((result.solver,), (result.steps,), source.real_data is not None)


def check_baselines(source: ModelSource, result: FitResult, names: Sequence[str]) -> None:
    """A one-line ValueError, before any work, for a baseline that cannot run with the fit."""
    for name in names:
        reason = baseline_problem(source, result, name)
        if reason:
            raise ValueError(f"baseline {name}: {reason}; leave {name} out of the baselines")


def teacher_count(metric, n: int) -> int:
    """How many of n scored seeds need teacher targets: all of them where the teacher distance
    is the score (``TeacherDistance``), else the first ``L2_SAMPLES`` (the L2 column)."""
    return n if isinstance(metric, TeacherDistance) else min(n, L2_SAMPLES)


def score_samples(source: ModelSource, metric, out: Tensor, targets: Tensor, seeds: str,
                  prefixes: dict[str, int] | None = None) -> tuple[FidEstimate, float, dict[str, FidEstimate]]:
    """The score of samples ``out`` on the seed set ``seeds``: FID of their images
    (``source.images``) with its bootstrap, or the ``TeacherDistance`` to ``targets`` (the
    teacher's samples of every seed); the mean L2 to the teacher on the first ``L2_SAMPLES``;
    and the same score of the first k samples for each entry of ``prefixes`` (seed-set name ->
    k), from the same samples, so that a schedule scored on fewer seeds pairs with this one.
    Diverged samples score NaN."""
    m = min(len(out), L2_SAMPLES)
    l2 = l2_loss(out[:m], targets[:m].to(out.device)).mean().item()
    if isinstance(metric, TeacherDistance):
        def estimate(k: int, name: str) -> FidEstimate:
            return metric.estimate(out[:k], targets[:k], name)
    elif not torch.isfinite(out).all():
        def estimate(k: int, name: str) -> FidEstimate:
            return FidEstimate.diverged(k, name)
    else:
        features = fake_features(metric, source.images(out))

        def estimate(k: int, name: str) -> FidEstimate:
            return features_estimate(metric, features[:k], name)
    return estimate(len(out), seeds), l2, {name: estimate(k, name) for name, k in (prefixes or {}).items()}


def compare_on_eval(source: ModelSource, result: FitResult, n_eval: int, teacher: TeacherConfig,
                    cache: str | Path, start: int = 0, baselines: Sequence[str] = FIXED, n_train: int = 50,
                    progress: Progress | None = None, metric=None) -> list[Row]:
    """Every baseline, then the fit (absent for oracle schedules), on evaluation samples
    start..start+n_eval-1: FID (``metric``, default ``source.make_metric()``; without an FID
    reference the L2 to the teacher) with its bootstrap, the paired change against the best
    baseline on these seeds, and the mean L2 to the teacher on the first ``L2_SAMPLES`` of them."""
    seeds = split_seeds("eval", n_eval, start)
    metric = source.make_metric() if metric is None else metric
    targets = generate_teacher(source, seeds[:teacher_count(metric, n_eval)], teacher, cache, dtype=source.dtype,
                               progress=progress and (lambda k: progress("teacher", k))).targets
    x, labels = source.latents(seeds, dtype=source.dtype), source.labels(seeds)
    fits = [baseline_result(source, name, result.solver, result.nfe, result.order, n_train, cache)
            for name in baselines] + ([] if result.tied_to_seeds else [result])
    rows = []
    for i, fit in enumerate(fits):
        out = sample_result(source, fit, x, labels)[0]
        fid, l2, _ = score_samples(source, metric, out, targets, seed_set("eval", n_eval, start))
        rows.append(Row(fit.method, result.solver, result.nfe, fid, "baseline" if i < len(baselines) else "method", l2))
        if progress:
            progress("sampling", 1)
    compare(rows)
    return rows


def evaluate_result(source: ModelSource, result: FitResult, n_eval: int, teacher: TeacherConfig,
                    cache: str | Path):
    """The rich table of ``compare_on_eval`` against the fixed discretizations, and its rows."""
    rows = compare_on_eval(source, result, n_eval, teacher, cache)
    caption = None
    if result.tied_to_seeds:
        caption = "per-sample schedules belong to their own seeds: see the fit's losses"
    table = rich_table(rows, f"{source.name}, {result.solver} NFE {result.nfe}: {n_eval} evaluation samples",
                       caption)
    return table, rows


def run_metrics(rows: Sequence[Row], n: int, start: int) -> dict[str, float]:
    """What ``ats evaluate`` logs to the run (the fit is the last row): ``evaluate.fid`` with
    ``_low``/``_high``, ``evaluate.l2``, ``evaluate.vs_best_baseline_pct`` with ``_low``/``_high``,
    ``evaluate.fid.<baseline>``, and the seeds used (``evaluate.n``, ``evaluate.start``).
    Non-finite values are left out."""
    *baselines, fit = rows
    c = fit.vs_baseline
    metrics = {"evaluate.fid": fit.fid.fid, "evaluate.fid_low": fit.fid.low, "evaluate.fid_high": fit.fid.high,
               "evaluate.l2": fit.l2, "evaluate.vs_best_baseline_pct": c.pct,
               "evaluate.vs_best_baseline_low": c.low, "evaluate.vs_best_baseline_high": c.high,
               "evaluate.n": n, "evaluate.start": start, **{f"evaluate.fid.{r.name}": r.fid.fid for r in baselines}}
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def load_schedule_file(path: str | Path) -> FitResult:
    """A ``schedule.json`` or ``result.pt`` written by ``ats fit`` or ``ats search``; a broken,
    foreign or inconsistent file raises a one-line ValueError naming it."""
    path = Path(path)
    if path.suffix != ".json":
        return load_result(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({' '.join(str(e).split())}); {GIVE}") from None
    if not isinstance(data, dict):
        return result_from_data(data, path)   # refused: names what the file holds
    if "timesteps" not in data:
        raise ValueError(f"{path} holds no global schedule ('timesteps'); give the fit's result.pt")
    times = {k: _times(data[k], path, k) for k in ("timesteps", "cond_timesteps") if k in data}
    return result_from_data({**data, "info": data.get("info", {})}, path, **times)


def _times(value: object, path: Path, name: str) -> Tensor:
    """A schedule of a JSON file as a float64 tensor: a flat list of numbers."""
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.ndim != 1:
        raise ValueError(f"{path}: {name} must be a list of numbers, got {str(value)[:60]}; {GIVE}")
    return t


def check_fits(source: ModelSource, result: FitResult) -> None:
    """A one-line ValueError unless the fit can drive ``source``: the noise schedule of the
    model it was fitted on (where the result records it: times mean nothing on another), a
    predictor's input shape and classes, a schedule's times strictly decreasing and inside the
    model's time range."""
    fitted = result.info.get("noise_schedule")
    if fitted is not None and fitted != repr(source.noise_schedule):
        raise ValueError(f"the fit was made for {result.info.get('source')}, whose noise schedule ({fitted}) is not "
                         f"{source.name}'s: give the dataset and model options it was fitted with (--dataset, "
                         "--preset, ...)")
    if result.predictor is not None:
        config = getattr(result.predictor, "config", {})
        if tuple(config.get("shape", source.shape)) != tuple(source.shape):
            raise ValueError(f"the predictor takes inputs of shape {tuple(config['shape'])}, but {source.name} "
                             f"samples have shape {tuple(source.shape)}: choose the dataset it was trained on")
        if config.get("num_classes", 0) != source.num_classes:
            raise ValueError(f"the predictor was trained with {config.get('num_classes', 0)} classes, {source.name} "
                             f"has {source.num_classes}: use the model settings it was trained with "
                             "(digits: --guidance-scale for a class-conditional predictor)")
    for name in ("timesteps", "cond_timesteps", "per_sample"):
        value = getattr(result, name)
        if value is not None:
            check_time_range(source.noise_schedule, value.to(torch.float64), f"the fit's {name}")
    for name in ("timesteps", "per_sample"):
        value = getattr(result, name)
        if value is not None and not bool((value[..., 1:] < value[..., :-1]).all()):
            raise ValueError(f"the fit's {name} are not strictly decreasing (t_0 > t_1 > ... > t_N): the file was "
                             "edited or is corrupt")


def sample_seeds(result: FitResult, n: int, start: int | None) -> list[int]:
    """Seeds of ``ats sample``: evaluation samples start..start+n-1, or for oracle schedules
    the first n of the seeds they were fitted on."""
    if not result.tied_to_seeds:
        return list(split_seeds("eval", n, start or 0))
    if start is not None:
        raise ValueError("oracle schedules belong to the seeds (and labels) they were fitted on; leave out --seed")
    if result.seeds is None or len(result.seeds) < n:
        have = 0 if result.seeds is None else len(result.seeds)
        raise ValueError(f"the oracle schedules cover {have} seeds; ask for at most that many samples")
    return [int(s) for s in result.seeds[:n]]


def sample_labels(source: ModelSource, result: FitResult, seeds: Sequence[int], label: int | None) -> Tensor | None:
    """Class labels: ``label`` for every sample, else the seeds' own (conditional models)."""
    if label is None:
        return source.labels(seeds)
    if result.tied_to_seeds:
        raise ValueError("oracle schedules belong to the seeds and labels they were fitted on; leave out --label")
    if source.num_prompts:
        raise ValueError(f"--label picks a class, and {source.name} is text-conditional: each seed has its own prompt "
                         "of --prompts (for one prompt, give a prompts file that holds only it)")
    if not source.num_classes:
        raise ValueError(f"--label needs a class-conditional model, and {source.name} is unconditional "
                         "(digits is class-conditional with classifier-free guidance: a study's "
                         "model.guidance_scale, or --guidance-scale)")
    if not 0 <= label < source.num_classes:
        raise ValueError(f"--label must be in 0..{source.num_classes - 1}, got {label}")
    return torch.full((len(seeds),), label, dtype=torch.long)


def draw(source: ModelSource, result: FitResult, seeds: Sequence[int], labels: Tensor | None,
         baselines: Sequence[str] = (), n_train: int = 50,
         cache: str | Path = DEFAULT_CACHE) -> dict[str, Tensor]:
    """Samples of the fit and of each baseline from the same seeds, by name (the fit first)."""
    x = source.latents(seeds, dtype=source.dtype)
    samples = {result.method: sample_result(source, result, x, labels)[0]}
    for name in baselines:
        fit = baseline_result(source, name, result.solver, result.nfe, result.order, n_train, cache)
        samples[f"{name} (baseline)" if name == result.method else name] = sample_result(source, fit, x, labels)[0]
    return samples


def save_samples(source: ModelSource, samples: dict[str, Tensor], path: str | Path) -> Path:
    """A PNG of ``draw``'s samples: an image grid (side by side per method), or for point
    models a scatter of the first two coordinates over exact samples of the mixture."""
    from .plots import plot_points, save_image_grid, save_side_by_side
    if len(source.shape) == 3:
        images = {name: source.images(x) for name, x in samples.items()}
        if len(images) == 1:
            return save_image_grid(next(iter(images.values())), path)
        return save_side_by_side(images, path)
    gmm = source.info.get("gmm")
    reference = None if gmm is None else gmm.sample(2000, generator=torch.Generator().manual_seed(0))
    return plot_points(samples, path, reference=reference)
