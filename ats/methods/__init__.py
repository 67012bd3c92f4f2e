"""Schedule-learning methods, each returning a FitResult that ``ats.solvers`` consumes.

``METHODS`` is the registry: one ``Method`` (``ats.methods.base``) per module, found by name.
A new method is one module with a ``Method`` subclass plus one entry here. ``fit_method`` runs
one end to end on a model source: it checks the options against the method's declaration,
converts the NFE to the solver's steps, and fits with a ``FitContext`` that generates the teacher
data of the training and validation seeds on first use (cached).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models.base import ModelSource
from ..options import OptionError, Schema, did_you_mean, parse_options
from ..solvers import steps_for_nfe
from ..teacher import DEFAULT_CACHE, TeacherConfig
from .base import NETWORK_OPTIONS, FitContext, Method, Progress, split_network_options
from .common import FitDiverged, FitResult
from .dmn import DMN
from .gits import GITS
from .ld3 import LD3
from .oracle import Oracle
from .predictors import Delta, OneShot
from .results import load_result, sample_result, save_result, save_schedule_json
from .timetuner import TimeTuner

METHODS: dict[str, Method] = {m.name: m for m in (LD3(), TimeTuner(), Oracle(), OneShot(), Delta(), DMN(), GITS())}
SEARCHABLE = tuple(name for name, m in METHODS.items() if m.searchable)


def get_method(name: str) -> Method:
    """The registered method ``name``; unknown names get a one-line error."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, METHODS)}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def nested_schemas(method: Method) -> dict[str, Schema]:
    """The option schemas of the methods ``method`` runs first, by group name, without the
    ``NETWORK_OPTIONS`` (set once for the whole fit, at the top level)."""
    return {name: {k: o for k, o in METHODS[name].options.items() if k not in NETWORK_OPTIONS}
            for name in method.nested}


def parse_method_options(name: str, options: dict[str, Any] | None, path: str = "options") -> dict[str, Any]:
    """``options`` of method ``name`` checked against its declaration (``OptionError`` names
    the dotted option and the fix)."""
    method = get_method(name)
    return parse_options(method.options, options or {}, path, nested_schemas(method))


def fit_method(method: str, source: ModelSource, solver: str, nfe: int, order: int | None = None,
               n_train: int = 50, n_valid: int = 50, teacher: TeacherConfig = TeacherConfig(),
               cache: str | Path = DEFAULT_CACHE, seed: int = 0, options: dict[str, Any] | None = None,
               device: torch.device | str | None = None, progress: Progress | None = None) -> FitResult:
    """Fit ``method`` for ``solver`` at ``nfe`` network calls on ``device`` (where the source's
    networks are; default the CPU). ``options``: the method's declared options (learning
    rates, epochs, loss, ...; ``METHODS[method].options``), nested ones as dicts (``ld3``,
    ``oracle``); the ``NETWORK_OPTIONS`` (``checkpoint``, ``precision``) of the methods that
    declare them become ``FitContext.calls``. ``progress(phase, step, loss)`` after every
    step of the fit."""
    m = get_method(method)
    steps = steps_for_nfe(solver, nfe)
    if steps is None:
        raise ValueError(f"solver {solver!r} cannot spend exactly {nfe} network calls")
    reason = m.unsupported((solver,), (steps,), source.real_data is not None)
    if reason:
        raise ValueError(reason)
    calls, parsed = split_network_options(parse_method_options(method, options))
    calls.check(device or "cpu")   # fp16 on the CPU: refused before any teacher data is made
    ctx = FitContext(source, solver, steps, order, n_train, n_valid, teacher, cache, seed, device, progress, calls)
    result = m.fit(ctx, **parsed)
    if calls.precision != "fp32":
        result.info.setdefault("precision", calls.precision)   # fitted to the network in that precision
    if source.loss_space != "latent":
        result.info.setdefault("loss_space", source.loss_space)   # its losses compared decoded images
    for key, value in source.model_info().items():
        result.info.setdefault(key, value)   # the model it belongs to: ats.evaluate.check_fits compares it
    return result


__all__ = ["METHODS", "SEARCHABLE", "Method", "FitContext", "NETWORK_OPTIONS", "split_network_options",
           "OptionError", "fit_method", "get_method", "parse_method_options", "FitResult", "FitDiverged", "load_result",
           "sample_result", "save_result", "save_schedule_json"]
