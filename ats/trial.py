"""One trial of a study, without Ray: fit a method (or take a baseline), score it by FID with
its bootstrap interval on the selection seeds (the search objective) and on the held-out
evaluation seeds, and write its result folder. ``ats.tune`` runs these on Ray workers; ``ats.tracking`` logs the folders.

Result folder: ``result.pt`` (``ats.methods.common.load_result``), ``schedule.json`` (global
schedules), ``per_sample.npz`` (per-sample schedules with their seeds), ``history.json``
(loss curves), ``metrics.json``, ``fid.json`` (the FID estimates with their bootstrap
replicates, per split), ``schedule.png``, ``samples.pt`` (the samples of the first seeds of
the last split scored) and, for image models, ``samples.png``.
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
from .discretize import AYS, KINDS
from .evaluate import baseline_result, score_samples, seed_set, teacher_count
from .intervals import FidEstimate
from .methods import METHODS, FitContext, fit_method, split_network_options
from .methods.common import FitResult
from .methods.results import load_result, sample_result, save_result, save_schedule_json, with_schedules
from .models.base import ModelSource
from .models.sources import get_dataset
from .study import Study
from .teacher import TeacherData, generate_teacher, split_seeds

Progress = Callable[[dict], None]
GRID_SAMPLES = 64
FIDS = "fid.json"   # FidEstimate per split, with the bootstrap replicates that pair it with others


@dataclass
class Scored:
    result: FitResult
    metrics: dict[str, float]   # fid_<split>, fid_<split>_low/_high, l2_<split>, n_<split>, fit_seconds
    samples: torch.Tensor       # the first evaluation samples (for the grid)


def check_inputs(study: Study) -> ModelSource:
    """Everything a study reads from disk, checked before anything runs: one error that lists
    every missing file and where it goes (cifar10: checkpoint, InceptionV3 weights, FID reference);
    then the model source."""
    problems = get_dataset(study.dataset).problems(**study.model)
    if problems:
        raise FileNotFoundError("; ".join(problems))
    return study.source()


def split_size(study: Study, split: str) -> int:
    return {"train": study.n_train, "valid": study.n_valid, "select": study.n_select, "eval": study.n_eval}[split]


def scored_size(study: Study, method: str, split: str) -> int:
    """How many seeds of ``split`` score ``method``: all, or its ``n_scored`` where the study caps it."""
    n = split_size(study, split)
    cap = next((m.n_scored for m in study.methods if m.name == method and m.n_scored), n)
    return min(n, cap)


def prefix_sets(study: Study, split: str, n: int) -> dict[str, int]:
    """The smaller seed sets of ``split`` that some method of the study is scored on (seed-set
    name -> count): every schedule is scored on them too, from the same samples, so that those
    methods' rows pair with every other row."""
    sizes = {scored_size(study, m.name, split) for m in study.methods}
    return {seed_set(split, k): k for k in sorted(sizes) if k < n}


def split_data(study: Study, source: ModelSource, split: str, cache: str | Path,
               device: torch.device | str | None = None, n: int | None = None) -> TeacherData:
    """Teacher data of the first ``n`` samples of a split (default: all of the study's), cached,
    on ``device``."""
    seeds = split_seeds(split, n or split_size(study, split))
    return generate_teacher(source, seeds, study.teacher, cache, dtype=source.dtype, device=device).to(device)


def fit(study: Study, source: ModelSource, method: str, solver: str, nfe: int, options: dict[str, Any],
        cache: str | Path, progress: Progress | None = None, device: torch.device | str | None = None) -> FitResult:
    """A baseline's schedule (fixed discretizations, dmn, gits) or a method's fit."""
    if method in KINDS or method == AYS:
        return baseline_result(source, method, solver, nfe, study.order)
    report = None if progress is None else \
        (lambda phase, step, loss: progress({"phase": phase, "step": int(step), "loss": float(loss)}))
    return fit_method(method, source, solver, nfe, study.order, study.n_train, study.n_valid, study.teacher,
                      cache, study.seed, options, device=device, progress=report)


@dataclass
class SplitScore:
    """A fit scored on a split's seeds: FID with its bootstrap, mean L2 to the teacher on the
    first ``L2_SAMPLES`` seeds, the first samples (for the grid), the per-sample schedules
    used there (predictors, oracle; None for a global schedule), and the FIDs of the first
    seeds only (``prefix_sets``), by seed-set name."""
    fid: FidEstimate
    l2: float
    samples: torch.Tensor
    schedules: torch.Tensor | None
    prefixes: dict[str, FidEstimate]

    def fids(self, split: str) -> dict[str, FidEstimate]:
        """What ``fid.json`` keeps of this score: the split's FID and the prefixes'."""
        return {split: self.fid, **self.prefixes}

    def metrics(self, split: str) -> dict[str, float]:
        return {f"fid_{split}": self.fid.fid, f"fid_{split}_low": self.fid.low, f"fid_{split}_high": self.fid.high,
                f"l2_{split}": self.l2, f"n_{split}": self.fid.n}


def score(study: Study, source: ModelSource, result: FitResult, options: dict[str, Any],
          split: str, cache: str | Path, device: torch.device | str | None = None) -> SplitScore:
    """The fit on the seeds of ``split`` (``select``: the search objective; ``eval``: the final
    table), or on the first ``n_scored`` of them where the study caps the method. Per-sample
    (oracle) schedules belong to their own samples: the oracle is refitted on the split's
    samples (it needs their teacher targets), with the same settings, from the same starting
    schedule."""
    n = scored_size(study, result.method, split)
    seeds = split_seeds(split, n)
    x = source.latents(seeds, dtype=source.dtype, device=device)
    labels = source.labels(seeds)
    labels = None if labels is None else labels.to(x.device)
    if result.tied_to_seeds:   # schedules of other samples: the method gives these samples' own
        calls, options = split_network_options(options)
        ctx = FitContext(source, result.solver, result.steps, result.order, seed=study.seed, device=device, calls=calls)
        own = METHODS[result.method].schedules_for(ctx, result, options,
                                                   split_data(study, source, split, cache, device, n=n))
        result = with_schedules(result, own)
    out, schedules = sample_result(source, result, x, labels)
    if not torch.isfinite(out).all():
        raise ValueError("samples contain NaN or inf; the sampler diverged, so no FID is computed")
    metric = source.make_metric()
    targets = split_data(study, source, split, cache, device, n=teacher_count(metric, n)).targets
    fid, l2, prefixes = score_samples(source, metric, out, targets, seed_set(split, n), prefix_sets(study, split, n))
    return SplitScore(fid, l2, out[:GRID_SAMPLES], schedules, prefixes)


def start_metrics(result: FitResult) -> dict[str, float]:
    """A predictor's validation change against the global schedule it started from, and whether
    it was kept (1) or fell back to that schedule (0)."""
    record = result.info.get("vs_start")
    if not record:
        return {}
    return {"valid_vs_start_pct": record["pct"], "valid_vs_start_low": record["low"],
            "valid_vs_start_high": record["high"], "kept_predictor": float(record["kept"] == "predictor")}


def run_trial(study: Study, method: str, solver: str, nfe: int, options: dict[str, Any], out: str | Path,
              cache: str | Path, progress: Progress | None = None, source: ModelSource | None = None,
              device: torch.device | str | None = None, splits: tuple[str, ...] = ("select", "eval")) -> Scored:
    """Fit, score on each of ``splits`` (``ats search`` scores a trial on ``select`` and only the
    chosen one on ``eval``, with ``evaluate_folder``), write the result folder ``out``.
    ``device``: where the fit and the sampling run (the source's networks are moved there)."""
    source = (source or study.source()).to(device or "cpu")
    start = time.perf_counter()
    result = fit(study, source, method, solver, nfe, options, cache, progress, device)
    metrics: dict[str, float] = {"fit_seconds": time.perf_counter() - start, **start_metrics(result)}
    scores = {split: score(study, source, result, options, split, cache, device) for split in splits}
    for split, s in scores.items():
        metrics.update(s.metrics(split))
    last = list(scores)[-1]
    _keep_schedules(result, scores[last], last)
    scored = Scored(_on_cpu(result), metrics, scores[last].samples.cpu())
    write_folder(scored, source, out, {k: v for split, s in scores.items() for k, v in s.fids(split).items()})
    return scored


def evaluate_folder(study: Study, folder: str | Path, options: dict[str, Any], cache: str | Path,
                    source: ModelSource | None = None, device: torch.device | str | None = None) -> dict[str, float]:
    """Score the fit of a result folder on the held-out evaluation seeds and add that to the
    folder (metrics, fid.json, samples and per-sample schedules of the evaluation seeds)."""
    folder = Path(folder)
    source = (source or study.source()).to(device or "cpu")
    result = load_result(folder / "result.pt")
    s = score(study, source, result, options, "eval", cache, device)
    metrics = {**json.loads((folder / "metrics.json").read_text()), **s.metrics("eval")}
    _keep_schedules(result, s, "eval")
    fids = {**load_fids(folder), **s.fids("eval")}
    write_folder(Scored(_on_cpu(result), metrics, s.samples.cpu()), source, folder, fids)
    return metrics


def _keep_schedules(result: FitResult, s: SplitScore, split: str) -> None:
    """Per-sample schedules are saved with the seeds they belong to."""
    if s.schedules is not None:
        result.per_sample = s.schedules.detach().cpu()
        result.seeds = torch.tensor(list(split_seeds(split, len(s.schedules))))


def load_fids(folder: str | Path) -> dict[str, FidEstimate]:
    """The FID estimates (with their bootstrap replicates) of a result folder, by split, and
    those of the first seeds of a split by seed-set name (``prefix_sets``)."""
    path = Path(folder) / FIDS
    if not path.exists():
        return {}
    return {k: FidEstimate.from_dict(v) for k, v in json.loads(path.read_text()).items()}


def _on_cpu(result: FitResult) -> FitResult:
    """Tensors and predictor on the CPU, so the saved result loads anywhere."""
    for name in ("timesteps", "cond_timesteps", "per_sample", "seeds"):
        value = getattr(result, name)
        if value is not None:
            setattr(result, name, value.detach().cpu())
    if result.predictor is not None:
        result.predictor.cpu()
    return result


def write_folder(scored: Scored, source: ModelSource, out: str | Path,
                 fids: dict[str, FidEstimate] | None = None) -> Path:
    """The result folder of a trial or baseline (every file written, then renamed)."""
    from .plots import plot_schedule_spread, plot_schedules, save_image_grid
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = scored.result
    save_result(result, out / "result.pt")
    _json(out / "metrics.json", scored.metrics)
    _json(out / "history.json", result.history)
    if fids:
        _json(out / FIDS, {k: v.to_dict() for k, v in fids.items()})
    title = f"{result.method}, {result.solver} NFE {result.nfe}"
    if result.timesteps is not None:
        save_schedule_json(result, out / "schedule.json")
        cond = {} if result.cond_timesteps is None else {result.method: result.cond_timesteps}
        plot_schedules({result.method: result.timesteps}, source.noise_schedule, out / "schedule.png", title=title,
                       cond=cond)
    if result.per_sample is not None:
        seeds = np.asarray(result.seeds) if result.seeds is not None else np.arange(len(result.per_sample))
        write_atomic(out / "per_sample.npz", lambda tmp: np.savez(tmp, timesteps=result.per_sample.numpy(),
                                                                    seeds=seeds))
        start = result.info.get("ld3_timesteps", None)   # the global schedule a predictor started from
        plot_schedule_spread(result.per_sample, source.noise_schedule, out / "schedule.png",
                             reference=None if start is None else torch.tensor(start))
    write_atomic(out / "samples.pt", lambda tmp: torch.save(scored.samples, tmp))   # first evaluation seeds
    if len(source.shape) == 3:
        save_image_grid(source.images(scored.samples), out / "samples.png")
    return out


def _json(path: Path, data: Any) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
