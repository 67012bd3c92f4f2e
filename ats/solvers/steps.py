"""One step of each solver: x at time t -> x at time t_next.

Every step function has the signature (``StepFn``)

    step(model_fn, x, c, c_next, state, *, order, cond_t, cond_next, last) -> (x_next, state)

where ``c`` and ``c_next`` are the schedule's ``Coeffs`` at t and t_next (``coeffs(ns,
t, x.ndim)``; ``sample`` computes them for the whole grid at once) and cond_t, cond_next
are the times the network sees there (decoupled conditioning; None means t and t_next).
Times are per sample, [B], or [1] for one schedule shared by the batch. ``state`` carries
the multistep history between steps; start from ``SolverState()``. ``last`` marks the
final step (Heun takes an Euler step there, UniPC skips its corrector).

Notation: alpha, sigma, lambda = log(alpha / sigma) at t (suffix _n at t_next),
h = lambda_n - lambda; the EDM variables are y = x / alpha and sigma_bar = sigma / alpha.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

from ..noise import NoiseSchedule
from ..tensors import ModelFn, expand_dims

Generators = torch.Generator | Sequence[torch.Generator] | None
HISTORY = 4  # longest history any solver needs (iPNDM-4)


class Coeffs(NamedTuple):
    """A time t ([b]) and alpha_t, sigma_t, lambda_t shaped [b, 1, ..., 1] to broadcast with x."""
    t: Tensor
    alpha: Tensor
    sigma: Tensor
    lam: Tensor


def coeffs(ns: NoiseSchedule, t: Tensor, ndim: int) -> Coeffs:
    """The schedule's coefficients at the times t ([b]), for an x of ``ndim`` dimensions."""
    alpha, sigma, lam = ns.marginal_coeffs(t)
    return Coeffs(t, expand_dims(alpha, ndim), expand_dims(sigma, ndim), expand_dims(lam, ndim))


def grid_coeffs(ns: NoiseSchedule, ts: Tensor, ndim: int) -> list[Coeffs]:
    """Coefficients of every time of a [b, N+1] grid, computed in one vectorised call."""
    alpha, sigma, lam = ns.marginal_coeffs(ts)
    return [Coeffs(ts[:, i], expand_dims(alpha[:, i], ndim), expand_dims(sigma[:, i], ndim),
                   expand_dims(lam[:, i], ndim)) for i in range(ts.shape[1])]


class SolverState(NamedTuple):
    """Multistep memory: lambdas ([b, 1, ..]) and model outputs of past points (newest
    last), and an output at the current point already computed by the previous step
    (UniPC's corrector)."""
    lams: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()
    pending: Tensor | None = None

    def push(self, lam: Tensor, out: Tensor) -> "SolverState":
        return SolverState(self.lams[-HISTORY + 1:] + (lam,), self.outputs[-HISTORY + 1:] + (out,))

    def take(self, idx: Tensor | slice) -> "SolverState":
        """The rows ``idx`` of the batch: the outputs and a pending output are per sample;
        the lambdas are kept as they are (shared by the batch, [1, 1, ...])."""
        return SolverState(self.lams, tuple(o[idx] for o in self.outputs),
                           None if self.pending is None else self.pending[idx])

    @staticmethod
    def cat(states: Sequence["SolverState"]) -> "SolverState":
        """The states of consecutive chunks of one batch joined along the batch (lambdas of
        the first)."""
        first = states[0]
        outputs = tuple(torch.cat([s.outputs[k] for s in states]) for k in range(len(first.outputs)))
        pending = None if first.pending is None else torch.cat([s.pending for s in states])
        return SolverState(first.lams, outputs, pending)


class StepFn(Protocol):
    """One step of a solver (see the module doc): x at c.t -> (x at c_next.t, state)."""

    def __call__(self, model_fn: ModelFn, x: Tensor, c: Coeffs, cn: Coeffs, state: SolverState = ..., *,
                 order: int = ..., cond_t: Tensor | None = ..., cond_next: Tensor | None = ...,
                 last: bool = ...) -> tuple[Tensor, SolverState]: ...


def data_prediction(model_fn: ModelFn, x: Tensor, cond_t: Tensor | None, c: Coeffs) -> Tensor:
    """x0 = (x - sigma_t * eps) / alpha_t, with eps from the network at cond_t (default t)."""
    return (x - c.sigma * model_fn(x, c.t if cond_t is None else cond_t)) / c.alpha


def first_order_update(x: Tensor, x0: Tensor, c: Coeffs, cn: Coeffs) -> Tensor:
    """DPM-Solver-1 in data prediction (= DDIM, eta = 0): sigma_n / sigma x - alpha_n expm1(-h) x0."""
    return cn.sigma / c.sigma * x - cn.alpha * torch.expm1(c.lam - cn.lam) * x0


def sigma_bar_update(x: Tensor, slope: Tensor, c: Coeffs, cn: Coeffs) -> Tensor:
    """One explicit step in EDM's variables: y_n = y + (sigma_bar_n - sigma_bar) slope."""
    return cn.alpha * (x / c.alpha + (cn.sigma / cn.alpha - c.sigma / c.alpha) * slope)


def weighted_sum(weights: Tensor, terms: Tensor) -> Tensor:
    """sum_k weights[b, k] * terms[b, k, ...]; weights may have b = 1."""
    return (expand_dims(weights, terms.ndim) * terms).sum(1)


def per_sample_noise(x: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise like x; with a list of generators, sample i uses generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device)
                        for g in generator])


def ddim_step(model_fn: ModelFn, x: Tensor, c: Coeffs, cn: Coeffs, state: SolverState = SolverState(), *,
              order: int = 1, cond_t: Tensor | None = None, cond_next: Tensor | None = None,
              last: bool = False, eta: float = 0., generator: Generators = None) -> tuple[Tensor, SolverState]:
    """DDIM (Song et al., 2021): x_n = alpha_n x0 + sqrt(sigma_n^2 - s^2) eps + s z with
    s = eta sigma_n / sigma sqrt(sigma^2 - sigma_n^2 alpha^2 / alpha_n^2), which is DDIM's
    sigma on VP schedules and k-diffusion's ancestral sigma_up on EDM ones. eta = 0 is
    DPM-Solver-1 (data prediction)."""
    x0 = data_prediction(model_fn, x, cond_t, c)
    if eta == 0.:
        return first_order_update(x, x0, c, cn), state
    eps = (x - c.alpha * x0) / c.sigma
    noise_std = eta * cn.sigma / c.sigma * torch.sqrt(c.sigma ** 2 - (cn.sigma * c.alpha / cn.alpha) ** 2)
    x_next = cn.alpha * x0 + torch.sqrt(cn.sigma ** 2 - noise_std ** 2) * eps \
        + noise_std * per_sample_noise(x, generator)
    return x_next, state


def euler_step(model_fn: ModelFn, x: Tensor, c: Coeffs, cn: Coeffs, state: SolverState = SolverState(), *,
               order: int = 1, cond_t: Tensor | None = None, cond_next: Tensor | None = None,
               last: bool = False) -> tuple[Tensor, SolverState]:
    """Euler on the probability-flow ODE in EDM's variables (k-diffusion's sample_euler):
    y_n = y + (sigma_bar_n - sigma_bar) eps. Equal to DDIM(eta=0) in exact arithmetic."""
    return sigma_bar_update(x, model_fn(x, c.t if cond_t is None else cond_t), c, cn), state


def heun_step(model_fn: ModelFn, x: Tensor, c: Coeffs, cn: Coeffs, state: SolverState = SolverState(), *,
              order: int = 2, cond_t: Tensor | None = None, cond_next: Tensor | None = None,
              last: bool = False) -> tuple[Tensor, SolverState]:
    """EDM's second-order Heun step (Karras et al., 2022, Alg. 1) in y, sigma_bar; the last
    step is Euler, so N steps cost 2N - 1 network calls."""
    d = model_fn(x, c.t if cond_t is None else cond_t)
    x_euler = sigma_bar_update(x, d, c, cn)
    if last:
        return x_euler, state
    d_next = model_fn(x_euler, cn.t if cond_next is None else cond_next)
    return sigma_bar_update(x, (d + d_next) / 2, c, cn), state


def dpm_solver_pp_step(model_fn: ModelFn, x: Tensor, c: Coeffs, cn: Coeffs, state: SolverState = SolverState(), *,
                       order: int = 2, cond_t: Tensor | None = None, cond_next: Tensor | None = None,
                       last: bool = False) -> tuple[Tensor, SolverState]:
    """Multistep DPM-Solver++ (Lu et al., 2022), data prediction, order 1-3, with
    per-sample step ratios r_k = h_k / h (the 'dpmsolver' second-order form)."""
    _check_history(state, order, "dpm_solver++")
    x0 = data_prediction(model_fn, x, cond_t, c)
    state = state.push(c.lam, x0)
    x_next = first_order_update(x, x0, c, cn)
    if order == 1:
        return x_next, state
    h = cn.lam - c.lam
    phi_1 = torch.expm1(-h)
    lam_1, x0_1 = state.lams[-2], state.outputs[-2]
    r0 = (c.lam - lam_1) / h
    d1_0 = (x0 - x0_1) / r0
    if order == 2:
        return x_next - 0.5 * cn.alpha * phi_1 * d1_0, state
    r1 = (lam_1 - state.lams[-3]) / h
    d1_1 = (x0_1 - state.outputs[-3]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_2 = phi_1 / h + 1.
    phi_3 = phi_2 / h - 0.5
    return x_next + cn.alpha * phi_2 * d1 - cn.alpha * phi_3 * d2, state


def uni_pc_step(model_fn: ModelFn, x: Tensor, c: Coeffs, cn: Coeffs, state: SolverState = SolverState(), *,
                order: int = 3, cond_t: Tensor | None = None, cond_next: Tensor | None = None,
                last: bool = False, variant: str = "bh1") -> tuple[Tensor, SolverState]:
    """UniPC multistep (Zhao et al., 2023), data prediction, B(h) = h ('bh1') or
    e^h - 1 ('bh2'). UniP-p predicts x_next from the last p outputs; unless ``last``, the
    network is called at the prediction (the call the next step needs anyway) and UniC
    corrects x_next with it, so the corrector costs no extra NFE."""
    _check_history(state, order, "uni_pc")
    x0 = state.pending if state.pending is not None else data_prediction(model_fn, x, cond_t, c)
    state = state.push(c.lam, x0)
    hh = (c.lam - cn.lam).reshape(-1)                                      # -h, [b]
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    rks = [(state.lams[-(i + 1)] - c.lam).reshape(-1) / -hh for i in range(1, order)]
    d1s = [(state.outputs[-(i + 1)] - x0) / expand_dims(rk, x.ndim) for i, rk in enumerate(rks, 1)]
    R = torch.stack(rks + [torch.ones_like(hh)], dim=1)[:, None, :] \
        ** torch.arange(order, dtype=hh.dtype, device=hh.device)[None, :, None]  # [b, p, p]
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1., 1.
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1. / factorial
    b = torch.stack(b, dim=1)                                                # [b, p]
    alpha_bh = cn.alpha * expand_dims(b_h, x.ndim)
    x_base = first_order_update(x, x0, c, cn)
    d1s = torch.stack(d1s, dim=1) if d1s else None                           # [B, p-1, ...]
    x_next = x_base
    if d1s is not None:
        rhos_p = torch.full_like(b[:, :1], 0.5) if order == 2 \
            else torch.linalg.solve(R[:, :-1, :-1], b[:, :-1])
        x_next = x_base - alpha_bh * weighted_sum(rhos_p, d1s)
    if last:
        return x_next, state
    x0_next = data_prediction(model_fn, x_next, cond_next, cn)
    rhos_c = torch.full_like(b[:, :1], 0.5) if order == 1 else torch.linalg.solve(R, b)
    corr = expand_dims(rhos_c[:, -1], x.ndim) * (x0_next - x0)
    if d1s is not None:
        corr = corr + weighted_sum(rhos_c[:, :-1], d1s)
    return x_base - alpha_bh * corr, state._replace(pending=x0_next)


IPNDM_COEFFS = ((1.,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm_step(model_fn: ModelFn, x: Tensor, c: Coeffs, cn: Coeffs, state: SolverState = SolverState(), *,
               order: int = 4, cond_t: Tensor | None = None, cond_next: Tensor | None = None,
               last: bool = False) -> tuple[Tensor, SolverState]:
    """Improved PNDM (Zhang & Chen, 2023, as used by GITS): Adams-Bashforth with the fixed
    coefficients of order 1-4 on eps, in y = x / alpha and sigma_bar."""
    _check_history(state, order, "ipndm")
    eps = model_fn(x, c.t if cond_t is None else cond_t)
    state = state.push(c.lam, eps)
    slope = sum(w * e for w, e in zip(IPNDM_COEFFS[order - 1], reversed(state.outputs)))
    return sigma_bar_update(x, slope, c, cn), state


def _check_history(state: SolverState, order: int, name: str) -> None:
    if len(state.outputs) < order - 1:
        raise ValueError(f"{name} order {order} needs {order - 1} previous steps in the state, "
                         f"got {len(state.outputs)}; start with order 1 and raise it step by step")
