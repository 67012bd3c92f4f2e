"""One step of each solver: x at time t -> x at time t_next.

Every step function has the signature

    step(model_fn, noise_schedule, x, t, t_next, state, *, order, cond_t, cond_next, last)
        -> (x_next, state)

where t, t_next, cond_t, cond_next are per-sample times of shape [B]. The network is
evaluated at ``cond_t`` (and, for Heun's second stage and UniPC's corrector, at
``cond_next``) while the solver's coefficients use t and t_next (decoupled conditioning;
pass cond_t = t for the plain solver). ``state`` carries the multistep history between
steps; start from ``SolverState()``. ``last`` marks the final step (Heun takes an Euler
step there, UniPC skips its corrector).

Notation: alpha, sigma, lambda = log(alpha / sigma) at t (suffix _n at t_next),
h = lambda_n - lambda; the EDM variables are y = x / alpha and sigma_bar = sigma / alpha.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from ..models.wrapper import expand_dims
from ..noise import NoiseSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]
HISTORY = 4  # longest history any solver needs (iPNDM-4)


class SolverState(NamedTuple):
    """Multistep memory: past times and model outputs (newest last), and an output at the
    current point already computed by the previous step (UniPC's corrector)."""
    times: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()
    pending: Tensor | None = None

    def push(self, t: Tensor, out: Tensor) -> "SolverState":
        return SolverState(self.times[-HISTORY + 1:] + (t,), self.outputs[-HISTORY + 1:] + (out,))


class Coeffs(NamedTuple):
    alpha: Tensor
    sigma: Tensor
    lam: Tensor


def coeffs(ns: NoiseSchedule, t: Tensor, ndim: int) -> Coeffs:
    """alpha_t, sigma_t, lambda_t, each [B, 1, ..., 1] for an x of ``ndim`` dimensions."""
    return Coeffs(*(expand_dims(v, ndim) for v in
                    (ns.marginal_alpha(t), ns.marginal_std(t), ns.marginal_lambda(t))))


def data_prediction(model_fn: ModelFn, x: Tensor, cond_t: Tensor, c: Coeffs) -> Tensor:
    """x0 = (x - sigma_t * eps) / alpha_t, with eps from the network at cond_t."""
    return (x - c.sigma * model_fn(x, cond_t)) / c.alpha


def per_sample_noise(x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
    """Standard normal noise like x; with a list of generators, sample i uses generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device)
                        for g in generator])


def ddim_step(model_fn, ns, x, t, t_next, state=SolverState(), *, order=1, cond_t=None,
              cond_next=None, last=False, eta: float = 0., generator=None):
    """DDIM (Song et al., 2021): x_n = alpha_n x0 + sqrt(sigma_n^2 - c^2) eps + c z with
    c = eta sigma_n / sigma sqrt(1 - alpha^2 / alpha_n^2). eta = 0 is DPM-Solver-1 (data
    prediction): x_n = sigma_n / sigma x - alpha_n expm1(-h) x0."""
    c, cn = coeffs(ns, t, x.ndim), coeffs(ns, t_next, x.ndim)
    eps = model_fn(x, t if cond_t is None else cond_t)
    x0 = (x - c.sigma * eps) / c.alpha
    if eta == 0.:
        return cn.sigma / c.sigma * x - cn.alpha * torch.expm1(c.lam - cn.lam) * x0, state
    noise_std = eta * cn.sigma / c.sigma * torch.sqrt(-torch.expm1(2 * torch.log(c.alpha / cn.alpha)))
    x_next = cn.alpha * x0 + torch.sqrt(cn.sigma ** 2 - noise_std ** 2) * eps \
        + noise_std * per_sample_noise(x, generator)
    return x_next, state


def euler_step(model_fn, ns, x, t, t_next, state=SolverState(), *, order=1, cond_t=None,
               cond_next=None, last=False):
    """Euler on the probability-flow ODE in EDM's variables (k-diffusion's sample_euler):
    y_n = y + (sigma_bar_n - sigma_bar) eps. Equal to DDIM(eta=0) in exact arithmetic."""
    c, cn = coeffs(ns, t, x.ndim), coeffs(ns, t_next, x.ndim)
    eps = model_fn(x, t if cond_t is None else cond_t)
    y_next = x / c.alpha + (cn.sigma / cn.alpha - c.sigma / c.alpha) * eps
    return cn.alpha * y_next, state


def heun_step(model_fn, ns, x, t, t_next, state=SolverState(), *, order=2, cond_t=None,
              cond_next=None, last=False):
    """EDM's second-order Heun step (Karras et al., 2022, Alg. 1) in y, sigma_bar; the last
    step is Euler, so N steps cost 2N - 1 network calls."""
    c, cn = coeffs(ns, t, x.ndim), coeffs(ns, t_next, x.ndim)
    d = model_fn(x, t if cond_t is None else cond_t)
    dsigma = cn.sigma / cn.alpha - c.sigma / c.alpha
    y_next = x / c.alpha + dsigma * d
    if last:
        return cn.alpha * y_next, state
    d_next = model_fn(cn.alpha * y_next, t_next if cond_next is None else cond_next)
    return cn.alpha * (x / c.alpha + dsigma * (d + d_next) / 2), state


def dpm_solver_pp_step(model_fn, ns, x, t, t_next, state=SolverState(), *, order=2, cond_t=None,
                       cond_next=None, last=False):
    """Multistep DPM-Solver++ (Lu et al., 2022), data prediction, order 1-3, with
    per-sample step ratios r_k = h_{k} / h (the 'dpmsolver' second-order form)."""
    _check_history(state, order, "dpm_solver++")
    c, cn = coeffs(ns, t, x.ndim), coeffs(ns, t_next, x.ndim)
    x0 = data_prediction(model_fn, x, t if cond_t is None else cond_t, c)
    state = state.push(t, x0)
    h = cn.lam - c.lam
    phi_1 = torch.expm1(-h)
    x_next = cn.sigma / c.sigma * x - cn.alpha * phi_1 * x0
    if order >= 2:
        lam_1 = coeffs(ns, state.times[-2], x.ndim).lam
        r0 = (c.lam - lam_1) / h
        d1_0 = (x0 - state.outputs[-2]) / r0
        if order == 2:
            return x_next - 0.5 * cn.alpha * phi_1 * d1_0, state
        lam_2 = coeffs(ns, state.times[-3], x.ndim).lam
        r1 = (lam_1 - lam_2) / h
        d1_1 = (state.outputs[-2] - state.outputs[-3]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = phi_1 / h + 1.
        phi_3 = phi_2 / h - 0.5
        x_next = x_next + cn.alpha * phi_2 * d1 - cn.alpha * phi_3 * d2
    return x_next, state


def uni_pc_step(model_fn, ns, x, t, t_next, state=SolverState(), *, order=3, cond_t=None,
                cond_next=None, last=False, variant: str = "bh1"):
    """UniPC multistep (Zhao et al., 2023), data prediction, B(h) = h ('bh1') or
    e^h - 1 ('bh2'). UniP-p predicts x_next from the last p outputs; unless ``last``, the
    network is called at the prediction (the call the next step needs anyway) and UniC
    corrects x_next with it, so the corrector costs no extra NFE."""
    _check_history(state, order, "uni_pc")
    c, cn = coeffs(ns, t, x.ndim), coeffs(ns, t_next, x.ndim)
    x0 = state.pending if state.pending is not None \
        else data_prediction(model_fn, x, t if cond_t is None else cond_t, c)
    state = state.push(t, x0)
    h = (cn.lam - c.lam).reshape(-1)
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    rks, d1s = [], []
    for i in range(1, order):
        rk = (coeffs(ns, state.times[-(i + 1)], 1).lam.reshape(-1) - c.lam.reshape(-1)) / h
        rks.append(rk)
        d1s.append((state.outputs[-(i + 1)] - x0) / expand_dims(rk, x.ndim))
    rks = torch.stack(rks + [torch.ones_like(h)], dim=1)                     # [B, p]
    powers = torch.arange(order, device=x.device, dtype=x.dtype)
    R = rks[:, None, :] ** powers[None, :, None]                             # [B, p, p]
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1., 1.
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1. / factorial
    b = torch.stack(b, dim=1)                                                # [B, p]
    alpha_bh = cn.alpha * expand_dims(b_h, x.ndim)
    x_base = cn.sigma / c.sigma * x - cn.alpha * expand_dims(h_phi_1, x.ndim) * x0
    d1s = torch.stack(d1s, dim=1) if d1s else None                           # [B, p-1, ...]
    x_next = x_base
    if d1s is not None:
        rhos_p = torch.full_like(b[:, :1], 0.5) if order == 2 \
            else torch.linalg.solve(R[:, :-1, :-1], b[:, :-1])
        x_next = x_base - alpha_bh * torch.einsum("bk,bk...->b...", rhos_p, d1s)
    if last:
        return x_next, state
    x0_next = data_prediction(model_fn, x_next, t_next if cond_next is None else cond_next, cn)
    rhos_c = torch.full_like(b[:, :1], 0.5) if order == 1 else torch.linalg.solve(R, b)
    corr = expand_dims(rhos_c[:, -1], x.ndim) * (x0_next - x0)
    if d1s is not None:
        corr = corr + torch.einsum("bk,bk...->b...", rhos_c[:, :-1], d1s)
    return x_base - alpha_bh * corr, state._replace(pending=x0_next)


IPNDM_COEFFS = ((1.,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm_step(model_fn, ns, x, t, t_next, state=SolverState(), *, order=4, cond_t=None,
               cond_next=None, last=False):
    """Improved PNDM (Zhang & Chen, 2023, as used by GITS): Adams-Bashforth with the fixed
    coefficients of order 1-4 on eps, in y = x / alpha and sigma_bar."""
    _check_history(state, order, "ipndm")
    c, cn = coeffs(ns, t, x.ndim), coeffs(ns, t_next, x.ndim)
    eps = model_fn(x, t if cond_t is None else cond_t)
    state = state.push(t, eps)
    slope = sum(w * e for w, e in zip(IPNDM_COEFFS[order - 1], reversed(state.outputs)))
    y_next = x / c.alpha + (cn.sigma / cn.alpha - c.sigma / c.alpha) * slope
    return cn.alpha * y_next, state


def _check_history(state: SolverState, order: int, name: str) -> None:
    if len(state.times) < order - 1:
        raise ValueError(f"{name} order {order} needs {order - 1} previous steps in the state, "
                         f"got {len(state.times)}; start with order 1 and raise it step by step")
