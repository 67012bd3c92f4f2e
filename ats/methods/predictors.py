"""Per-sample schedule predictors: from the starting noise x_T to that sample's schedule.

- ``OneShotPredictor``: x_T (and a label) -> logits theta [N+1] in one pass; the schedule is
  ``timesteps_from_logits(base + net(x_T))``.
- ``DeltaPredictor``: recursive; at step k it sees (x_{t_k}, t_k, k) and picks the next
  time as a fraction f_k = sigmoid(prior_k + a_k) of the lambda distance still to go,
  lambda_{k+1} = lambda_k + f_k (lambda_end - lambda_k), the last time fixed to t_end. The
  prior is the fractions of the global schedule it starts from (without one, f_k = 1 / (N - k):
  the logSNR schedule). Its inputs are normalised: x / sqrt(alpha^2 + sigma^2), log
  sigma_bar_t and k / N.
Both carry the global schedule's conditioning offsets ``base_xi`` (LD3's s - t) to the times
they choose (``carried_cond_time``: clipped to half the step before and half the way to the
end), so an untrained predictor samples exactly as the global schedule it starts from; the
offsets are parameters, learned on from there when training end to end. Both train (a) by
regression on the optimum's schedules, then optionally end to end, or (b) end to end through
the solver on the teacher loss, with validation, early stopping and the best checkpoint kept;
the validation loss of the untrained net is the start's, so the kept checkpoint is never
worse than the start there. ``_Predictor.fit`` then keeps the predictor only where the paired
95 % interval of its validation loss against the start's lies below zero, else the start.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..losses import LOSS_NAMES, teacher_loss
from ..models.base import ModelSource
from ..options import Option, declare
from ..intervals import Change, paired_mean_change
from ..metrics import paired_distance
from ..params import SPACES, carried_cond_time, carried_cond_timesteps, timesteps_from_logits
from ..solvers import Coeffs, CondTime, NetworkCalls, NextTime, bind_solver, coeffs, sample
from ..tensors import expand_dims
from ..teacher import TeacherData
from .base import NETWORK_OPTIONS, FitContext, Method, Progress
from .common import FitDiverged, FitResult, check_finite
from .ld3 import ld3_start
from .oracle import START_SAMPLES, offsets_of, training_optimum

OBJECTIVES = ("end_to_end", "regression")


def auto_width(shape: tuple[int, ...]) -> int:
    """The encoder width that fits an input of ``shape`` when none is given.

    Images (c, h, w): the published width 64 (channels 64/128/256) is for 32x32 inputs; the
    width follows the image side, 2 * sqrt(h * w) rounded to a multiple of 8, between 8 (or
    the input channels rounded up to 8, if more) and 64: 16 on 8x8 digits, 64 from 32x32 up.
    Vectors of d values: d rounded up to a multiple of 8, between 16 and 64 (the MLP's hidden
    size is 4 * width: 64 for 16-D data, 256 from 64-D up)."""
    if len(shape) == 3:
        c, h, w = shape
        low = max(8, 8 * math.ceil(c / 8))
        return max(low, min(64, 8 * round(2 * math.sqrt(h * w) / 8)))
    return max(16, min(64, 8 * math.ceil(math.prod(shape) / 8)))


def encoder(shape: tuple[int, ...], width: int | None = None) -> tuple[nn.Module, int]:
    """Images: residual-free conv stack c -> w -> 2w -> 4w with GroupNorm and global pooling;
    vectors: an MLP with hidden size 4w. ``width`` None picks ``auto_width(shape)``; image
    widths must be multiples of 8 (GroupNorm with 8 groups). Returns the module and its
    feature size."""
    width = auto_width(shape) if width is None else int(width)
    if width < 1 or (len(shape) == 3 and width % 8):
        raise ValueError(f"encoder width must be >= 1 (a multiple of 8 for images), got {width}")
    if len(shape) == 3:
        c = shape[0]
        layers, chans = [], [c, width, 2 * width, 4 * width]
        for i, (a, b) in enumerate(zip(chans, chans[1:])):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 4 * width
    dim = math.prod(shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(dim, 4 * width), nn.SiLU(), nn.Linear(4 * width, 4 * width),
                         nn.SiLU()), 4 * width


class Predictor(nn.Module):
    """What both predictors share: ``config`` (enough to rebuild one), the encoder of x, a
    label embedding for conditional models, and a head h -> out whose last layer starts at
    zero (so an untrained predictor gives its prior schedule)."""

    def __init__(self, shape: tuple[int, ...], steps: int, num_classes: int, width: int | None, dropout: float,
                 extra_inputs: int, outputs: int, base_xi: Tensor | None = None) -> None:
        super().__init__()
        # The start's conditioning offsets (s - t of its schedule; zeros: none), carried to every
        # schedule; a fit starts from them and learns them on (end to end), so it can undo them.
        xi = torch.zeros(steps + 1) if base_xi is None else base_xi.detach().float().clone()
        if bool(xi.any()):
            self.base_xi = nn.Parameter(xi)
        else:
            self.register_buffer("base_xi", xi)
        width = auto_width(tuple(shape)) if width is None else int(width)
        self.config = {"shape": list(shape), "steps": steps, "num_classes": num_classes, "width": width,
                       "dropout": dropout}
        self.steps = steps
        self.encode, feat = encoder(tuple(shape), width)
        self.label = nn.Embedding(num_classes, feat) if num_classes else None
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feat + extra_inputs, feat), nn.SiLU(),
                                  nn.Linear(feat, outputs))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def features(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """h = encode(x) + embed(label) (the label's term for conditional models only)."""
        h = self.encode(x.float())
        return h + self.label(labels) if self.label is not None and labels is not None else h

    def sample_with(self, sampler: PredictorSampler, x_T: Tensor,
                    labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x0 and the per-sample times [B, N+1] the predictor gives x_T."""
        raise NotImplementedError

    def regression_loss(self, sampler: PredictorSampler, x_T: Tensor, labels: Tensor | None,
                        target_ts: Tensor) -> Tensor:
        """Per-sample squared error against the oracle schedules ``target_ts`` [B, N+1]."""
        raise NotImplementedError


class OneShotPredictor(Predictor):
    """x_T (and a label) -> logits theta [N+1]. ``width`` None: ``auto_width(shape)``; the
    width used is in ``config`` (with ``base`` and ``base_xi`` in the state dict, enough to
    rebuild it)."""

    def __init__(self, shape: tuple[int, ...], steps: int, base: Tensor, num_classes: int = 0,
                 width: int | None = None, dropout: float = 0., base_xi: Tensor | None = None) -> None:
        super().__init__(shape, steps, num_classes, width, dropout, extra_inputs=0, outputs=steps + 1, base_xi=base_xi)
        self.register_buffer("base", base.detach().float().clone())

    def forward(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.base + self.head(self.features(x_T, labels))

    def cond_timesteps(self, ts: Tensor) -> Tensor | None:
        """The times the network sees: the start's offsets ``base_xi`` carried to ``ts``
        (``carried_cond_timesteps``; None without offsets)."""
        return carried_offsets(ts, self.base_xi)

    def sample_with(self, sampler: PredictorSampler, x_T: Tensor,
                    labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The solver on the one-shot schedules ``sampler.timesteps(x_T, labels)``."""
        ts, src = sampler.timesteps(x_T, labels), sampler.source
        return sample(src.model_fn_for(labels), src.noise_schedule, x_T, ts, sampler.solver, order=sampler.order,
                      cond_timesteps=self.cond_timesteps(ts), **sampler.calls.kwargs), ts

    def regression_loss(self, sampler: PredictorSampler, x_T: Tensor, labels: Tensor | None,
                        target_ts: Tensor) -> Tensor:
        """mean_k ((lambda_k - lambda*_k) / |lambda*_N - lambda*_0|)^2, lambda* the oracle's."""
        ns = sampler.source.noise_schedule
        lam_p = ns.marginal_lambda(sampler.timesteps(x_T, labels))
        lam_t = ns.marginal_lambda(target_ts)
        span = (lam_t[:, -1] - lam_t[:, 0]).abs()[:, None]
        return (((lam_p - lam_t) / span) ** 2).mean(1)


class DeltaPredictor(Predictor):
    """(x_{t_k}, t_k, k) -> the fraction of the remaining lambda distance to step. ``width``
    None: ``auto_width(shape)``; the width used is in ``config``."""

    def __init__(self, shape: tuple[int, ...], steps: int, num_classes: int = 0, width: int | None = None,
                 dropout: float = 0., base_lambdas: Tensor | None = None, base_xi: Tensor | None = None) -> None:
        super().__init__(shape, steps, num_classes, width, dropout, extra_inputs=2, outputs=1, base_xi=base_xi)
        self.register_buffer("prior", prior_logits(steps, base_lambdas))

    def cond_time(self, t_end: Tensor) -> CondTime | None:
        """The start's offsets carried to each time as it is chosen, towards the end ``t_end``
        (None without offsets)."""
        if not isinstance(self.base_xi, nn.Parameter):   # zeros, a buffer: no offsets
            return None
        return lambda j, t, t_prev: carried_cond_time(t, t_prev, t_end, self.base_xi[j].to(t))

    def fraction(self, x: Tensor, c: Coeffs, k: int, labels: Tensor | None = None) -> Tensor:
        """f_k in (0, 1) per sample from x at step k, c the coefficients at t_k ([B, 1, ...])."""
        alpha, sigma = c.alpha.reshape(-1), c.sigma.reshape(-1)
        h = self.features(x / expand_dims(torch.sqrt(alpha ** 2 + sigma ** 2), x.ndim), labels)
        extra = torch.stack([torch.log(sigma / alpha).float(), torch.full_like(sigma, k / self.steps).float()], 1)
        logit = self.head(torch.cat([h, extra], 1)).squeeze(1) + self.prior[k]
        return torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4).to(x.dtype)

    def _walk(self, sampler: PredictorSampler, x: Tensor, t: Tensor, t_end: Tensor, labels: Tensor | None,
              next_time: NextTime) -> tuple[Tensor, Tensor]:
        """The solver from x at t ([B]) to t_end ([B]), step k ending at ``next_time(k, x_k,
        c_k)``; returns x at the end and the times [B, N+1]."""
        ns = sampler.source.noise_schedule
        run = bind_solver(sampler.source.model_fn_for(labels), ns, sampler.solver, self.steps, sampler.order,
                          **sampler.calls.kwargs)
        steps = list(run.iter_steps(x, [coeffs(ns, t, x.ndim)], self.cond_time(t_end), next_time))
        return steps[-1].x, torch.stack([t] + [s.c.t for s in steps], 1)

    def sample_with(self, sampler: PredictorSampler, x_T: Tensor,
                    labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """From T: lambda_{k+1} = lambda_k + f_k (lambda_eps - lambda_k), the last time eps."""
        ns = sampler.source.noise_schedule
        t, t_end = (torch.full((len(x_T),), v, dtype=x_T.dtype, device=x_T.device) for v in (ns.T, ns.eps))
        lam_end = ns.marginal_lambda(t_end)

        def next_time(k: int, x: Tensor, c: Coeffs) -> Tensor:
            if k == self.steps - 1:
                return t_end
            lam = c.lam.reshape(-1)
            return ns.inverse_lambda(lam + self.fraction(x, c, k, labels) * (lam_end - lam))
        return self._walk(sampler, x_T, t, t_end, labels, next_time)

    def regression_loss(self, sampler: PredictorSampler, x_T: Tensor, labels: Tensor | None,
                        target_ts: Tensor) -> Tensor:
        """Teacher forcing: the solver walks the oracle schedule (without gradient); at each
        step k < N-1, (f_k - (lambda*_{k+1} - lambda*_k) / (lambda*_N - lambda*_k))^2, averaged."""
        lam = sampler.source.noise_schedule.marginal_lambda(target_ts)
        errors, grad = [], torch.is_grad_enabled()

        def next_time(k: int, x: Tensor, c: Coeffs) -> Tensor:
            if k < self.steps - 1:
                goal = (lam[:, k + 1] - lam[:, k]) / (lam[:, -1] - lam[:, k])
                with torch.set_grad_enabled(grad):
                    errors.append((self.fraction(x, c, k, labels) - goal) ** 2)
            return target_ts[:, k + 1]
        with torch.no_grad():
            self._walk(sampler, x_T, target_ts[:, 0], target_ts[:, -1], labels, next_time)
        return torch.stack(errors, 1).mean(1)


def carried_offsets(ts: Tensor, xi: Tensor) -> Tensor | None:
    """The times the network sees on schedules ``ts`` ([B, N+1]) carrying a global schedule's
    offsets ``xi`` [N+1] (``carried_cond_timesteps``); None where there are none."""
    if not bool(xi.any()):
        return None
    return carried_cond_timesteps(ts, xi.to(ts))


def prior_logits(steps: int, lambdas: Tensor | None = None) -> Tensor:
    """logit f_k for k < N-1 (float32): the fractions (lambda_{k+1} - lambda_k) / (lambda_N - lambda_k)
    of a global schedule's ``lambdas`` [N+1], or without one 1 / (N - k) (logSNR): -log(N - k - 1)."""
    if lambdas is None:
        return torch.tensor([-math.log(steps - k - 1) for k in range(steps - 1)], dtype=torch.float32)
    lam = lambdas.detach().double().cpu()
    f = (lam[1:-1] - lam[:-2]) / (lam[-1] - lam[:-2])
    return torch.logit(f.clamp(1e-6, 1 - 1e-6)).float()


def load_predictor(saved: dict) -> Predictor:
    """Rebuild a predictor from what ``save_result`` stores for it (``{"class", "config",
    "state_dict"}``)."""
    classes = {cls.__name__: cls for cls in (OneShotPredictor, DeltaPredictor)}
    if saved.get("class") not in classes:
        raise ValueError(f"unknown predictor class {saved.get('class')!r}; expected one of {', '.join(classes)}")
    cfg = dict(saved["config"])
    if saved["class"] == "OneShotPredictor":
        cfg["base"] = saved["state_dict"]["base"]
    net = classes[saved["class"]](tuple(cfg.pop("shape")), cfg.pop("steps"), **cfg)
    net.load_state_dict({**net.state_dict(), **saved["state_dict"]})   # files from before base_xi/prior: defaults
    return net.eval()


class PredictorSampler:
    """What a predictor's users call: ``(x_T, labels) -> (x0, per-sample times)``; ``calls``:
    how the solver calls the network (checkpointing, precision)."""

    def __init__(self, predictor: Predictor, source: ModelSource, solver: str, order: int | None,
                 space: str = "lambda", calls: NetworkCalls = NetworkCalls()) -> None:
        self.predictor, self.source, self.solver, self.order, self.space = predictor, source, solver, order, space
        self.calls = calls

    def timesteps(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        """One-shot schedules [B, N+1] (one-shot predictors only)."""
        return timesteps_from_logits(self.predictor(x_T, labels).to(x_T.dtype), self.source.noise_schedule,
                                     space=self.space)

    def __call__(self, x_T: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.predictor.sample_with(self, x_T, labels)


def fit_predictor(kind: str, source: ModelSource, train: TeacherData, valid: TeacherData, solver: str, steps: int,
                  order: int | None = None, objective: str = "end_to_end", oracle_train: Tensor | None = None,
                  base: Tensor | None = None, base_xi: Tensor | None = None, space: str = "lambda",
                  loss: str = "l2", width: int | None = None, dropout: float = 0., epochs: int = 100,
                  finetune_epochs: int = 0, batch_size: int = 64, lr: float = 1e-3, patience: int = 10,
                  seed: int = 0, progress: Progress | None = None,
                  calls: NetworkCalls = NetworkCalls()) -> FitResult:
    """Train a ``oneshot`` or ``delta`` predictor. objective ``regression`` fits the optimum's
    schedules of the training samples (``oracle_train``, [B, N+1] times), then, for
    ``finetune_epochs``, the teacher loss through the solver (end to end), from the regression's
    best validation state (the start itself where regression never beat it); ``end_to_end``
    minimises the teacher loss through the solver from the start. Both start exactly at the
    global schedule of logits ``base`` and its conditioning offsets ``base_xi`` (default: the
    logSNR schedule without offsets). Early stopping on the validation
    teacher loss (the quantity that matters); the best checkpoint is returned, the start
    itself where no epoch beat it. ``width`` None sizes the encoder from the input (``auto_width``).
    ``calls``: how the solver calls the network (checkpointing, precision). The teacher loss
    compares in the source's ``loss_space`` (``teacher_loss``)."""
    if kind not in ("oneshot", "delta"):
        raise ValueError(f"unknown predictor {kind!r}; choose 'oneshot' or 'delta'")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose 'regression' or 'end_to_end'")
    if objective == "regression" and oracle_train is None:
        raise ValueError("objective 'regression' needs the optimum's schedules of the training samples")
    if kind == "delta" and steps < 2:
        raise ValueError("the delta predictor needs steps >= 2 (the last time is fixed)")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    loss_fn = teacher_loss(loss, source, calls)
    train, valid = loss_fn.targets(train), loss_fn.targets(valid)
    classes = source.num_classes
    if kind == "oneshot":
        base = torch.zeros(steps + 1) if base is None else base
        net = OneShotPredictor(source.shape, steps, base, classes, width, dropout, base_xi)
    else:
        lambdas = None if base is None else source.noise_schedule.marginal_lambda(
            timesteps_from_logits(base.double(), source.noise_schedule, space=space))
        net = DeltaPredictor(source.shape, steps, classes, width, dropout, lambdas, base_xi)
    if batch_size < 1 or epochs < 0:
        raise ValueError(f"batch_size must be >= 1 and epochs >= 0, got {batch_size} and {epochs}")
    net = net.to(train.latents.device)
    sampler = PredictorSampler(net, source, solver, order, space, calls)
    history = {"train_loss": [], "valid_loss": []}

    def mean_loss(data: TeacherData) -> float:
        net.eval()
        with torch.no_grad():
            out, _ = sampler(data.latents, data.labels)
            value = loss_fn(out, data.targets).mean().item()
        net.train()
        return value

    best = {"valid": mean_loss(valid), "state": copy.deepcopy(net.state_dict()), "epoch": -1}
    history["valid_loss"].append(best["valid"])
    epoch = -1
    phases = [(objective, epochs)] + ([("end_to_end", finetune_epochs)] if objective == "regression" else [])
    try:
        for phase, phase_epochs in phases:   # patience ends a phase; each starts from the best state so far
            net.load_state_dict(best["state"])
            opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)   # moments of its own loss
            bad = 0
            for _ in range(phase_epochs):
                epoch += 1
                losses = []
                for idx in torch.randperm(len(train.latents), generator=g).split(batch_size):
                    labels = None if train.labels is None else train.labels[idx]
                    if phase == "regression":
                        per = net.regression_loss(sampler, train.latents[idx], labels, oracle_train[idx])
                    else:
                        out, _ = sampler(train.latents[idx], labels)
                        per = loss_fn(out, train.targets[idx])
                    value = check_finite(per.mean(), epoch)
                    opt.zero_grad(set_to_none=True)
                    per.mean().backward()
                    check_finite(torch.nn.utils.clip_grad_norm_(net.parameters(), 1.), epoch, "gradient norm")
                    opt.step()
                    losses.append(value)
                val = check_finite(mean_loss(valid), epoch, "validation loss")
                history["train_loss"].append(sum(losses) / len(losses))
                history["valid_loss"].append(val)
                if progress is not None:
                    progress(f"{kind} {phase}", epoch, val)
                if val < best["valid"]:
                    best.update(valid=val, state=copy.deepcopy(net.state_dict()), epoch=epoch)
                    bad = 0
                else:
                    bad += 1
                    if bad >= patience:
                        break
    except FitDiverged as e:
        net.load_state_dict(best["state"])
        e.result = _predictor_result(kind, net, solver, order, steps, history, best, objective, space, diverged=str(e))
        raise
    except KeyboardInterrupt:
        net.load_state_dict(best["state"])
        return _predictor_result(kind, net, solver, order, steps, history, best, objective, space, interrupted=True)
    net.load_state_dict(best["state"])
    return _predictor_result(kind, net, solver, order, steps, history, best, objective, space, epochs=epoch + 1)


def _predictor_result(kind, net, solver, order, steps, history, best, objective, space, **info) -> FitResult:
    net.eval()
    return FitResult(kind, solver, order, steps, predictor=net, history=history,
                     info={"objective": objective, "space": space, "best_valid_loss": best["valid"],
                           "best_epoch": best["epoch"], **info})


class _Predictor(Method):
    """A predictor trained from LD3's global schedule (``fit_predictor``); objective
    ``regression`` trains on the optimum of the training samples (``training_optimum``, shared
    with the cell's other trials and its oracle)."""
    nested = ("ld3", "oracle")
    options = declare(fit_predictor, ("kind", "source", "train", "valid", "solver", "steps", "order", "oracle_train",
                                      "base", "base_xi", "seed", "progress", "calls"),
                      choices={"objective": OBJECTIVES, "space": SPACES, "loss": LOSS_NAMES},
                      low={"epochs": 0, "finetune_epochs": 0, "batch_size": 1, "patience": 0, "dropout": 0,
                           "width": 1},
                      positive=("lr",),
                      extra=(START_SAMPLES, Option("min_gain", frozenset({"float"}), 0.5, low=0,
                                                   help="the gain (%) a predictor needs over its start on the "
                                                        "validation seeds, in the distance to the teacher in the "
                                                        "FID's features"),
                             Option("fallback", frozenset({"bool"}), True,
                                    help="false: keep the predictor even where it is no better than its start"),
                             *NETWORK_OPTIONS.values()))

    def fit(self, ctx: FitContext, ld3: dict | None = None, oracle: dict | None = None, start_samples: int = 50,
            min_gain: float = 0.5, fallback: bool = True, **options: Any) -> FitResult:
        start = ld3_start(ctx, ld3 or {}, start_samples)
        if start.info.get("interrupted"):
            return start   # stopped while fitting the starting schedule: that is the best state there is
        base = torch.tensor(start.info["theta"])
        if options.get("objective") == "regression":
            options["oracle_train"] = training_optimum(ctx, start, oracle or {}).per_sample
        result = fit_predictor(self.name, ctx.source, ctx.train, ctx.valid, ctx.solver, ctx.steps, ctx.order,
                               base=base, base_xi=offsets_of(start), seed=ctx.seed, progress=ctx.progress,
                               calls=ctx.calls, **options)
        result.info["ld3_timesteps"] = start.timesteps.tolist()   # the global schedule it started from
        if result.info.get("interrupted"):
            return result
        return keep_if_better(ctx, result, start, min_gain if fallback else -math.inf)


def keep_if_better(ctx: FitContext, result: FitResult, start: FitResult, min_gain: float) -> FitResult:
    """``result`` where its mean distance to the teacher on the validation seeds, in the
    features of the score the tables rank by (``paired_distance``: the FID's features; a
    training loss such as the L2 of pixels can improve while the FID gets worse), is at least
    ``min_gain`` % below the start's and the paired 95 % interval of the change lies below
    zero; else the start (its global schedule under the result's method name); ``min_gain``
    -inf keeps the predictor whatever the change. ``info["vs_start"]`` records the change and
    which was kept."""
    src, valid = ctx.source, ctx.valid
    x, dtype = valid.latents, valid.latents.dtype
    with torch.no_grad():
        new, _ = PredictorSampler(result.predictor, src, result.solver, result.order,
                                  result.info.get("space", "lambda"), ctx.calls)(x, valid.labels)
        cond = None if start.cond_timesteps is None else start.cond_timesteps.to(dtype)
        old = sample(src.model_fn_for(valid.labels), src.noise_schedule, x, start.timesteps.to(dtype), start.solver,
                     order=start.order, cond_timesteps=cond, **ctx.calls.kwargs)
    if not torch.isfinite(new).all():
        change = Change(math.inf, math.inf, math.inf)
    else:
        distance = paired_distance(src.make_metric(), src.images)
        change = paired_mean_change(*(distance(out, valid.targets).cpu().numpy() for out in (new, old)))
    n = len(x)
    better = min_gain == -math.inf or (change.high < 0 and change.pct <= -min_gain)
    record = {"pct": float(change.pct), "low": float(change.low), "high": float(change.high), "n": n,
              "kept": "predictor" if better else "start"}
    if better:
        result.info["vs_start"] = record
        return result
    return FitResult(result.method, start.solver, start.order, start.steps, timesteps=start.timesteps,
                     cond_timesteps=start.cond_timesteps, history=result.history,
                     info={**result.info, "vs_start": record, "theta": start.info["theta"]})


class OneShot(_Predictor):
    name = "oneshot"


class Delta(_Predictor):
    name = "delta"
    min_steps = 2   # the last time is fixed
