"""The method protocol: one base class, one context, no dispatch on names.

A method is a ``Method`` subclass in its own module, registered in ``ats.methods.METHODS``. It
declares its ``options`` (``ats.options.Option``: types, defaults, allowed values, bounds), the
option groups of the methods it runs first (``nested``: a predictor's ``ld3`` and ``oracle``),
and what it needs (real data, a number of steps, particular solvers); ``fit(ctx, **options)``
returns a ``FitResult``. ``FitContext`` hands out the inputs lazily: the teacher data of the
training and validation seeds (cached on disk), real data, latents, the progress callback
``progress(phase, step, loss)`` and ``calls``, how the fit's solver calls the network
(checkpointing, precision: the shared options ``NETWORK_OPTIONS`` of the methods that
backpropagate through the solver).
"""
from __future__ import annotations

import abc
import fcntl
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from ..atomic import write_atomic
from ..models.base import ModelSource, digest
from ..options import Option, declare
from ..solvers import PRECISIONS, NetworkCalls
from ..teacher import DEFAULT_CACHE, TeacherConfig, TeacherData, generate_teacher, split_seeds
from .common import FitResult

Progress = Callable[[str, int, float], None]   # (phase, step, loss), after every step of a fit

_NETWORK_HELP = {"checkpoint": "recompute each network call's activations in the backward pass instead of keeping "
                               "them (less memory, about one more forward pass of compute)",
                 "precision": "fp32, or bf16 / fp16: the network under autocast (fp16 on CUDA only)"}
NETWORK_OPTIONS: dict[str, Option] = {
    name: replace(option, help=_NETWORK_HELP[name])
    for name, option in declare(NetworkCalls, (), choices={"precision": PRECISIONS}).items()}
"""Options of every method that backpropagates through the solver (``extra=`` of its
declaration); ``fit_method`` moves them into ``FitContext.calls``, and they apply to every
phase of the fit (a predictor's starting LD3 fit and oracle fits included)."""


def split_network_options(options: Mapping[str, Any]) -> tuple[NetworkCalls, dict[str, Any]]:
    """``NETWORK_OPTIONS`` among a method's ``options`` as ``NetworkCalls``, and the others."""
    calls = NetworkCalls(**{k: v for k, v in options.items() if k in NETWORK_OPTIONS})
    return calls, {k: v for k, v in options.items() if k not in NETWORK_OPTIONS}


@dataclass
class FitContext:
    """Everything a method may read: the model, the solver and its number of steps, the seeds'
    teacher data (``train``, ``valid``; generated on first use, cached under ``cache``), real
    data, the seed, the device, the progress callback and how the solver calls the network
    (``calls``: pass ``**ctx.calls.kwargs`` to ``sample`` / ``bind_solver``)."""
    source: ModelSource
    solver: str
    steps: int
    order: int | None = None
    n_train: int = 50
    n_valid: int = 50
    teacher: TeacherConfig = TeacherConfig()
    cache: str | Path = DEFAULT_CACHE
    seed: int = 0
    device: torch.device | str | None = None
    progress: Progress | None = None
    calls: NetworkCalls = NetworkCalls()

    def teacher_data(self, split: str, n: int) -> TeacherData:
        """Teacher targets of the first ``n`` seeds of ``split``, on the context's device."""
        return generate_teacher(self.source, split_seeds(split, n), self.teacher, self.cache,
                                dtype=self.source.dtype, device=self.device).to(self.device)

    @cached_property
    def train(self) -> TeacherData:
        return self.teacher_data("train", self.n_train)

    @cached_property
    def valid(self) -> TeacherData:
        return self.teacher_data("valid", self.n_valid)

    def latents(self, split: str, n: int) -> Tensor:
        return self.source.latents(split_seeds(split, n), dtype=self.source.dtype, device=self.device)

    def shared(self, what: str, settings: dict[str, Any], fit: Callable[[], FitResult]) -> FitResult:
        """A fit that every trial of the same cell shares (LD3's starting schedule, the optimum
        on the training seeds): ``fit()`` runs once per model, solver, steps, teacher, seeds,
        network precision, loss space and ``settings``, and its result is kept under
        ``cache/shared/``; a trial that asks while another computes it waits for it (a file
        lock), never fits it twice. Stopped or diverged fits are returned but not kept. Results
        with a predictor are not shareable."""
        key = digest({"what": what, "model": self.source.identity, "solver": self.solver, "steps": self.steps,
                      "order": self.order, "teacher": asdict(self.teacher), "n_train": self.n_train,
                      "n_valid": self.n_valid, "seed": self.seed, "settings": settings,
                      **({} if self.calls.precision == "fp32" else {"precision": self.calls.precision}),
                      **({} if self.source.loss_space == "latent" else {"loss_space": self.source.loss_space})})
        path = Path(self.cache) / "shared" / f"{what}-{key[:24]}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.exists():
                try:
                    data = torch.load(path, map_location="cpu", weights_only=True)
                    return FitResult(**{k: v.to(self.device) if torch.is_tensor(v) and self.device else v
                                         for k, v in data.items()})
                except Exception:   # a foreign or damaged file: fit again and replace it
                    pass
            result = fit()
            if not {"interrupted", "diverged"} & set(result.info) and result.predictor is None:
                state = {k: v.detach().cpu() if torch.is_tensor(v) else v
                         for k, v in asdict(result).items() if k != "predictor"}
                write_atomic(path, lambda tmp: torch.save(state, tmp))
            return result

    def real_data(self, n: int) -> Tensor:
        """``n`` real samples of the source's data set (seeded by the context's seed)."""
        if self.source.real_data is None:
            raise ValueError(f"{self.source.name} has no real data; the method needs it")
        return self.source.real_data(n, self.seed).to(self.device)


class Method(abc.ABC):
    """One schedule-learning method. Subclasses set the class attributes and ``fit``."""
    name: ClassVar[str]
    options: ClassVar[dict[str, Option]]
    nested: ClassVar[tuple[str, ...]] = ()        # option groups of the methods it runs first
    searchable: ClassVar[bool] = True             # False: a baseline (nothing to search)
    needs_real_data: ClassVar[bool] = False
    min_steps: ClassVar[int] = 1
    solvers: ClassVar[tuple[str, ...] | None] = None   # None: every solver

    @abc.abstractmethod
    def fit(self, ctx: FitContext, **options: Any) -> FitResult:
        """Fit on ``ctx`` with parsed ``options`` (the declared ones; nested ones as dicts)."""

    def schedules_for(self, ctx: FitContext, result: FitResult, options: dict[str, Any],
                      data: TeacherData) -> Tensor | None:
        """Per-sample schedules [B, N+1] of ``data``'s samples where the result's own are tied to
        the samples it was fitted on (the oracle refits); None: the result samples new seeds."""
        return None

    def unsupported(self, solvers: Sequence[str], steps: Sequence[int], has_real_data: bool) -> str | None:
        """Why the method cannot run with these solvers and step counts, or None."""
        if self.needs_real_data and not has_real_data:
            return f"{self.name} trains on real data, which this dataset does not have"
        if self.solvers is not None:
            bad = [s for s in solvers if s not in self.solvers]
            if bad:
                return f"{self.name} supports solvers {', '.join(self.solvers)}, not {', '.join(bad)}"
        if min(steps) < self.min_steps:
            return f"{self.name} needs at least {self.min_steps} steps; raise the smallest NFE"
        return None
