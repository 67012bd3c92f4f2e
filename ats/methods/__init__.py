"""Schedule-learning methods, each returning a FitResult that ``ats.solvers`` consumes.

``fit_method`` runs one method end to end on a model source: teacher data for the training
and validation seeds (cached), then the method; the predictors first fit LD3 for their
starting schedule and, for the regression objective, the oracle on their samples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..solvers import steps_for_nfe
from ..models.sources import ModelSource
from ..teacher import TeacherConfig, TeacherData, generate_teacher, split_seeds
from .common import FitDiverged, FitResult, save_result, save_schedule_json

METHODS = ("ld3", "timetuner", "oracle", "oneshot", "delta", "dmn", "gits")


def real_data(source: ModelSource, n: int, seed: int = 0) -> torch.Tensor:
    """Real samples of the source's data set (TimeTuner's training data)."""
    if "gmm" in source.info:
        return source.info["gmm"].sample(n, generator=torch.Generator().manual_seed(seed)).to(source.dtype)
    if source.name.startswith("digits"):
        from ..models.digits import digits_split, load_digits_data
        images, _ = load_digits_data()
        train, _ = digits_split()
        return images[train][:n].to(source.dtype)
    raise ValueError(f"method timetuner needs real data of {source.name}; it is available for gmm and digits")


def teacher_splits(source: ModelSource, n_train: int, n_valid: int, teacher: TeacherConfig, cache: str | Path,
                   progress: Callable[[int], None] | None = None,
                   device: torch.device | str | None = None) -> tuple[TeacherData, TeacherData]:
    kw = dict(config=teacher, cache=cache, dtype=source.dtype, progress=progress, device=device)
    return (generate_teacher(source, split_seeds("train", n_train), **kw),
            generate_teacher(source, split_seeds("valid", n_valid), **kw))


def fit_method(method: str, source: ModelSource, solver: str, nfe: int, order: int | None = None,
               n_train: int = 50, n_valid: int = 50, teacher: TeacherConfig = TeacherConfig(),
               cache: str | Path = ".ats-cache/teacher", seed: int = 0, options: dict[str, Any] | None = None,
               device: torch.device | str | None = None) -> FitResult:
    """Fit ``method`` for ``solver`` at ``nfe`` network calls on ``device`` (where the source's
    networks are; default the CPU). ``options`` go to the method's fit function (learning
    rates, epochs, loss, space, progress, ...)."""
    from .dmn import fit_dmn
    from .gits import fit_gits
    from .ld3 import fit_ld3
    from .oracle import fit_oracle
    from .predictors import fit_predictor
    from .timetuner import fit_timetuner
    from ..discretize import get_timesteps

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    steps = steps_for_nfe(solver, nfe)
    if steps is None:
        raise ValueError(f"solver {solver!r} cannot spend exactly {nfe} network calls")
    options = dict(options or {})
    if method == "dmn":
        return fit_dmn(source.noise_schedule, solver, nfe, order, **options)
    if method == "gits":
        return fit_gits(source, solver, nfe, split_seeds("train", n_train), order, device=device, **options)
    if method == "timetuner":
        kind = options.pop("discretization", "time_uniform")
        ts = get_timesteps(source.noise_schedule, kind, steps, dtype=source.dtype)
        return fit_timetuner(source.model_fn, source.noise_schedule, real_data(source, options.pop("n_data", 1024), seed).to(device),
                             ts, solver, order, seed=seed, **options)
    train, valid = (d.to(device) for d in teacher_splits(source, n_train, n_valid, teacher, cache, device=device))
    if method == "ld3":
        return fit_ld3(source, train, valid, solver, steps, order, seed=seed, **options)
    ld3_options = options.pop("ld3", {})
    ld3 = fit_ld3(source, first_n(train, 50), valid, solver, steps, order, seed=seed, **ld3_options)
    if ld3.info.get("interrupted"):
        return ld3  # stopped while fitting the starting schedule: that is the best state there is
    base = torch.tensor(ld3.info["theta"])
    if method == "oracle":
        result = fit_oracle(source, train, solver, steps, order, init=base, seed=seed, **options)
        result.info["init_theta"] = base.tolist()  # LD3's logits: where a refit on other samples starts
        return result
    oracle_options = options.pop("oracle", {})
    if options.get("objective") == "regression":
        options["oracle_train"] = fit_oracle(source, train, solver, steps, order, init=base, seed=seed,
                                             **oracle_options).per_sample
        options["oracle_valid"] = fit_oracle(source, valid, solver, steps, order, init=base, seed=seed,
                                             **oracle_options).per_sample
    result = fit_predictor(method, source, train, valid, solver, steps, order, base=base, seed=seed, **options)
    result.info["ld3_timesteps"] = ld3.timesteps.tolist()  # the global schedule it started from
    return result


def first_n(data: TeacherData, n: int) -> TeacherData:
    """The first n samples of teacher data."""
    return TeacherData(*(None if v is None else v[:n] for v in data))


__all__ = ["METHODS", "fit_method", "first_n", "FitResult", "FitDiverged", "save_result", "save_schedule_json"]
