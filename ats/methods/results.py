"""Using a FitResult: saving and loading it, and sampling with it, whatever it holds (a global
schedule, per-sample schedules, or a predictor)."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import write_atomic
from ..compare import EVAL_BATCH, sample_batched
from ..models.base import ModelSource
from ..params import carried_cond_timesteps
from .common import FitResult
from .predictors import PredictorSampler, load_predictor


def save_result(result: FitResult, path: str | Path) -> Path:
    """A torch file with every tensor of the result (predictor as its state dict and config)."""
    state = {k: v for k, v in asdict(result).items() if k != "predictor"}
    if result.predictor is not None:
        state["predictor"] = {"class": type(result.predictor).__name__,
                              "config": getattr(result.predictor, "config", {}),
                              "state_dict": result.predictor.state_dict()}
    return write_atomic(Path(path), lambda tmp: torch.save(state, tmp))


GIVE = "give a result.pt or schedule.json written by `ats fit` or `ats search`"
SCHEDULES = ("timesteps", "cond_timesteps", "per_sample")


def _first_line(e: Exception) -> str:
    """``Type: first sentence`` of an exception's message (torch's run to paragraphs)."""
    text = (str(e).splitlines() or [""])[0].split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {text}"


def load_result(path: str | Path) -> FitResult:
    """The inverse of ``save_result``: every tensor, and the predictor rebuilt from its class
    name, config and state dict (on the CPU, in eval mode). A file that is not such a result
    raises a one-line ValueError naming it."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a torch file written by ats ({_first_line(e)}); {GIVE}") from None
    saved = state.pop("predictor", None) if isinstance(state, dict) else None
    predictor = None
    if saved is not None:
        try:
            predictor = load_predictor(saved)
        except Exception as e:
            raise ValueError(f"{path}: its predictor cannot be rebuilt ({_first_line(e)}); {GIVE}") from None
    return result_from_data(state, path, predictor=predictor)


def result_from_data(data: object, path: Path, **fields: object) -> FitResult:
    """A FitResult from the saved ``data`` of file ``path`` (``FitResult.from_dict``), checked:
    the keys it needs, and schedules whose lengths match its steps and NFE. One-line
    ValueErrors name the file and what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a fit result; {GIVE}")
    missing = [k for k in ("method", "solver") if k not in data] + \
        ([] if "steps" in data or "nfe" in data else ["steps"])
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(missing)}, so it is no fit result; {GIVE}")
    try:
        result = FitResult.from_dict(data, **fields)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a valid fit result ({_first_line(e)}); {GIVE}") from None
    _check_lengths(result, data, path)
    return result


def _check_lengths(result: FitResult, data: dict, path: Path) -> None:
    """Schedules of steps + 1 times, and a stored NFE that the solver spends in those steps."""
    if not isinstance(result.steps, int) or isinstance(result.steps, bool) or result.steps < 1:
        raise ValueError(f"{path}: steps must be an integer >= 1, got {result.steps!r}; {GIVE}")
    for name in SCHEDULES:
        value = getattr(result, name)
        if value is not None and (not torch.is_tensor(value) or value.shape[-1:] != (result.steps + 1,)):
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{path}: {name} has shape {got}, but {result.steps} steps take {result.steps + 1} "
                             "times; the file was edited or is corrupt: fix steps or the times")
    if "steps" in data and "nfe" in data and data["nfe"] != result.nfe:   # older files: nfe alone
        raise ValueError(f"{path}: nfe {data['nfe']!r} does not match its {result.steps} steps of {result.solver} "
                         f"({result.nfe} network calls); fix nfe or the times (steps + 1 of them)")


def save_schedule_json(result: FitResult, path: str | Path) -> Path:
    return write_atomic(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(result.to_json(), indent=2) + "\n"))


def sample_result(source: ModelSource, result: FitResult, x: Tensor, labels: Tensor | None = None,
                  batch: int = EVAL_BATCH) -> tuple[Tensor, Tensor | None]:
    """Samples from x_T [B, ...] with the fit, ``batch`` at a time without gradient, and the
    per-sample schedules [B, N+1] used (None for a global schedule). A predictor chooses each
    sample's schedule; per-sample schedules (the oracle's) belong to their own samples, so ``x``
    must be the latents of the result's first B seeds."""
    if result.predictor is not None:
        sampler = PredictorSampler(result.predictor, source, result.solver, result.order,
                                   result.info.get("space", "lambda"))
        outs, schedules = [], []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                out, ts = sampler(x[i:i + batch], None if labels is None else labels[i:i + batch])
                outs.append(out)
                schedules.append(ts)
        return torch.cat(outs), torch.cat(schedules)
    if result.per_sample is not None:
        if len(result.per_sample) < len(x):
            raise ValueError(f"the result holds {len(result.per_sample)} per-sample schedules, not {len(x)}: they "
                             "belong to the samples they were fitted on")
        schedules = result.per_sample[:len(x)].to(x.dtype)
        offsets = result.info.get("offsets")   # the global start's, carried to each schedule (the oracle's)
        cond = None if offsets is None else carried_cond_timesteps(schedules, torch.tensor(offsets, dtype=x.dtype))
        outs = [sample_batched(source, x[i:i + batch], None if labels is None else labels[i:i + batch],
                               schedules[i:i + batch], result.solver, batch, order=result.order,
                               cond_timesteps=None if cond is None else cond[i:i + batch])
                for i in range(0, len(x), batch)]
        return torch.cat(outs), schedules
    cond = None if result.cond_timesteps is None else result.cond_timesteps.to(x.dtype)
    return sample_batched(source, x, labels, result.timesteps.to(x.dtype), result.solver, batch,
                          order=result.order, cond_timesteps=cond), None


def with_schedules(result: FitResult, schedules: Tensor) -> FitResult:
    """The result with per-sample ``schedules`` in place of what it holds (for sampling them)."""
    return replace(result, per_sample=schedules, predictor=None, timesteps=None, cond_timesteps=None)
