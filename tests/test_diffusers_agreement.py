"""ats solvers agree with diffusers' schedulers on the same discrete VP model and times.

Model: a fixed random noise predictor eps(x, k) = sigma_k x + alpha_k tanh-MLP(x, k) on
[4, 2, 4, 4] float64 images (smooth, nonlinear in x and k), used by both sides.

Timestep mapping. diffusers works with integer training steps k in 0..999 and
``alphas_cumprod[k]``; ats with continuous times where step k sits at t = (k + 1) / 1000
(``NoiseScheduleVP('discrete')``), and the wrapped network receives
(t - 1/1000) * 1000 = k. ats gets ``alphas_cumprod=scheduler.alphas_cumprod`` (the
scheduler's own float32 values, upcast) so both sides use identical marginals, and the
time grid t_i = (k_i + 1) / 1000 built from the scheduler's own integer timesteps:

- DPMSolverMultistepScheduler / UniPCMultistepScheduler: ``final_sigmas_type="sigma_min"``,
  so the last step goes from ``timesteps[-1]`` to alphas_cumprod[0], i.e. k = 0, t = 1/1000
  (the default "zero" goes to alpha = 1, sigma = 0, which ats times cannot express, and
  also forces a first-order last step in DPM-Solver++). Grid: ``timesteps + [0]``.
  The integer timesteps come from ``timestep_spacing`` (linspace / leading / trailing)
  or, for DPM-Solver++, from ``set_timesteps(timesteps=[...])`` (UniPC has no such option).
- DDIMScheduler: every step goes from k to k - 1000 // num_inference_steps, whatever the
  next entry of ``timesteps`` is; a negative target means ``final_alpha_cumprod``, which
  ``set_alpha_to_one=False`` makes alphas_cumprod[0] (k = 0, t = 1/1000). Only spacings
  whose consecutive timesteps really differ by 1000 // N form a chain ats can follow:
  "leading" (any N) and "trailing" when N divides 1000. "linspace" does not (e.g. N = 5:
  999 -> 799 while the next model call is at 749); the grid is checked to be a chain.
  ``clip_sample=False`` (default True clamps x0 to [-1, 1]).

Order rules. diffusers DPM-Solver++ lowers the order at the last (order 1) and second to
last (order <= 2) steps only when ``lower_order_final`` and fewer than 15 steps; UniPC
lowers min(order, steps - i) whenever ``lower_order_final``, with no step threshold; ats
(as DPM-Solver) lowers min(order, steps - i) when ``lower_order_final`` and fewer than 10
steps. All take order min(order, i + 1) for warm-up. So grids use N < 10 with
``lower_order_final=True`` on both sides, N = 12 with it off on both sides, and (DPM-Solver++
only) N = 20 with it on. With it on, N in 10..14 (DPM-Solver++) or N >= 10 (UniPC) would
differ: diffusers lowers the last orders there and ats does not.
``prediction_type="epsilon"``, thresholding off, karras/exponential/beta sigmas off.

Precision: diffusers keeps its sigmas in float32 and DPM-Solver++ even casts the sample to
float32 inside ``step``; the resulting differences are ~1e-6, well below the 1e-4 tolerance
(with float64 sigmas patched in, UniPC agrees to ~1e-14). Each test also checks that ats
made exactly N network calls for N steps and that the sample moved away from the noise.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from ats.models import model_wrapper
from ats.noise import NoiseScheduleVP
from ats.solvers import sample

# diffusers' own numpy 2 notice when building sigmas from a torch tensor
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

N_TRAIN = 1000
TOL = 1e-4
SHAPE = (4, 2, 4, 4)


class TinyEps(torch.nn.Module):
    """Fixed random noise predictor: eps = sigma_k x + alpha_k W2 tanh(W1 [x, f(k)] + b1).

    The sigma_k x part is the exact noise prediction for N(0, I) data, so samples stay O(1);
    the MLP part makes the model nonlinear in x and k. alpha_k, sigma_k are interpolated
    linearly in k from the training ``alphas_cumprod``, so non-integer k works too.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, dim: int = 32, hidden: int = 48, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.w1 = torch.randn(dim + 4, hidden, generator=g, dtype=torch.float64) / math.sqrt(dim + 4)
        self.b1 = 0.1 * torch.randn(hidden, generator=g, dtype=torch.float64)
        self.w2 = torch.randn(hidden, dim, generator=g, dtype=torch.float64) / math.sqrt(hidden)
        self.calls = 0

    def forward(self, x: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:
        self.calls += 1
        b = x.shape[0]
        k = torch.as_tensor(k, dtype=x.dtype).reshape(-1).expand(b)
        lo = k.floor().long().clamp(0, len(self.alphas_cumprod) - 2)
        w = k - lo
        abar = (1 - w) * self.alphas_cumprod[lo] + w * self.alphas_cumprod[lo + 1]
        alpha, sigma = [v.sqrt().reshape(b, *[1] * (x.ndim - 1)) for v in (abar, 1 - abar)]
        s = k / N_TRAIN
        feats = torch.stack([s, s * s, torch.sin(3 * s), torch.cos(3 * s)], dim=1)
        h = torch.tanh(torch.cat([x.reshape(b, -1), feats], dim=1) @ self.w1 + self.b1)
        return sigma * x + alpha * (h @ self.w2).reshape(x.shape)


def to_times(ks: list[int]) -> torch.Tensor:
    return (torch.tensor(ks, dtype=torch.float64) + 1) / N_TRAIN


def run_diffusers(scheduler, model: TinyEps, x: torch.Tensor, ks: list[int], **step_kwargs) -> torch.Tensor:
    for k in ks:
        x = scheduler.step(model(x, k), k, x, **step_kwargs).prev_sample
    return x


def run_ats(scheduler, model: TinyEps, x: torch.Tensor, times: torch.Tensor, solver: str,
            **kwargs) -> torch.Tensor:
    ns = NoiseScheduleVP("discrete", alphas_cumprod=scheduler.alphas_cumprod.to(torch.float64))
    model_fn = model_wrapper(model, ns, model_type="noise")
    model.calls = 0
    out = sample(model_fn, ns, x, times, solver, **kwargs)
    assert model.calls == len(times) - 1, f"ats made {model.calls} model calls for {len(times) - 1} steps"
    return out


def check_agreement(ats_out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> None:
    assert ats_out.shape == ref.shape and ats_out.dtype == torch.float64
    assert torch.isfinite(ats_out).all()
    assert (ref - x).abs().max() > 0.1, "reference did not move away from the initial noise"
    assert (ats_out - x).abs().max() > 0.1, "ats did not move away from the initial noise"
    err = (ats_out - ref).abs().max().item()
    assert err < TOL, f"max |ats - diffusers| = {err:.3e}"


def initial_noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# (beta_schedule, timestep_spacing, steps_offset, N, lower_order_final)
MULTISTEP_GRIDS = [
    ("linear", "linspace", 0, 5, True),
    ("linear", "trailing", 0, 8, True),
    ("linear", "leading", 1, 3, True),
    ("linear", "trailing", 0, 12, False),
    ("squaredcos_cap_v2", "leading", 0, 5, True),
]


def grid_ids(grids: list[tuple]) -> list[str]:
    return [f"{b[:6]}-{s}-N{n}-lof{int(lof)}" for b, s, _, n, lof in grids]


def multistep_scheduler(cls, beta_schedule: str, spacing: str, offset: int, n: int, lof: bool, **kw):
    sched = cls(beta_schedule=beta_schedule, timestep_spacing=spacing, steps_offset=offset,
                prediction_type="epsilon", final_sigmas_type="sigma_min", lower_order_final=lof,
                thresholding=False, use_karras_sigmas=False, **kw)
    sched.set_timesteps(n)
    ks = sched.timesteps.tolist()
    assert len(ks) == n and ks == sorted(ks, reverse=True) and ks[-1] > 0
    return sched, ks


# 20 >= 15 steps: neither diffusers' DPM-Solver++ nor ats lowers the final orders.
DPM_GRIDS = MULTISTEP_GRIDS + [("linear", "trailing", 0, 20, True)]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("grid", DPM_GRIDS, ids=grid_ids(DPM_GRIDS))
def test_dpm_solver_pp_matches_diffusers(grid, order):
    beta_schedule, spacing, offset, n, lof = grid
    sched, ks = multistep_scheduler(DPMSolverMultistepScheduler, beta_schedule, spacing, offset, n, lof,
                                    algorithm_type="dpmsolver++", solver_type="midpoint", solver_order=order,
                                    euler_at_final=False)
    model, x = TinyEps(sched.alphas_cumprod), initial_noise()
    ref = run_diffusers(sched, model, x, ks)
    out = run_ats(sched, model, x, to_times(ks + [0]), "dpm_solver++", order=order, lower_order_final=lof)
    check_agreement(out, ref, x)


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_pp_custom_timesteps(order):
    """Uneven integer timesteps passed through ``set_timesteps(timesteps=...)``."""
    ks = [950, 700, 420, 200, 60]
    sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=order,
                                        final_sigmas_type="sigma_min", lower_order_final=True)
    sched.set_timesteps(timesteps=ks)
    model, x = TinyEps(sched.alphas_cumprod, seed=3), initial_noise(seed=4)
    ref = run_diffusers(sched, model, x, ks)
    out = run_ats(sched, model, x, to_times(ks + [0]), "dpm_solver++", order=order)
    check_agreement(out, ref, x)


# UniPC lowers its final orders at any N (ats follows UniPC there), so N = 12 with it on agrees too.
UNIPC_GRIDS = MULTISTEP_GRIDS + [("linear", "trailing", 0, 12, True)]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("grid", UNIPC_GRIDS, ids=grid_ids(UNIPC_GRIDS))
def test_uni_pc_matches_diffusers(grid, variant, order):
    beta_schedule, spacing, offset, n, lof = grid
    sched, ks = multistep_scheduler(UniPCMultistepScheduler, beta_schedule, spacing, offset, n, lof,
                                    solver_type=variant, solver_order=order, predict_x0=True,
                                    disable_corrector=[])
    model, x = TinyEps(sched.alphas_cumprod), initial_noise()
    ref = run_diffusers(sched, model, x, ks)
    out = run_ats(sched, model, x, to_times(ks + [0]), "uni_pc", order=order, variant=variant,
                  lower_order_final=lof)
    check_agreement(out, ref, x)


# (beta_schedule, timestep_spacing, steps_offset, N)
DDIM_GRIDS = [
    ("linear", "leading", 1, 5),
    ("linear", "leading", 1, 3),
    ("linear", "trailing", 0, 8),
    ("linear", "leading", 1, 12),
    ("squaredcos_cap_v2", "leading", 1, 5),
]


@pytest.mark.parametrize("grid", DDIM_GRIDS, ids=[f"{b[:6]}-{s}{o}-N{n}" for b, s, o, n in DDIM_GRIDS])
def test_ddim_matches_diffusers(grid):
    beta_schedule, spacing, offset, n = grid
    sched = DDIMScheduler(beta_schedule=beta_schedule, timestep_spacing=spacing, steps_offset=offset,
                          clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon",
                          thresholding=False)
    sched.set_timesteps(n)
    ks = sched.timesteps.tolist()
    targets = [max(k - N_TRAIN // n, 0) for k in ks]  # prev < 0 -> final_alpha_cumprod = alphas_cumprod[0]
    assert targets[:-1] == ks[1:], f"DDIM timesteps {ks} do not form a chain"
    model, x = TinyEps(sched.alphas_cumprod, seed=5), initial_noise(seed=6)
    ref = run_diffusers(sched, model, x, ks, eta=0.0)
    out = run_ats(sched, model, x, to_times(ks + targets[-1:]), "ddim")
    check_agreement(out, ref, x)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_with_noise_matches_diffusers(eta):
    """Stochastic DDIM: diffusers gets the same standard normal draws as ``variance_noise``
    (ats draws one per step from its generator, in step order)."""
    n = 5
    sched = DDIMScheduler(timestep_spacing="leading", steps_offset=1, clip_sample=False,
                          set_alpha_to_one=False, prediction_type="epsilon")
    sched.set_timesteps(n)
    ks = sched.timesteps.tolist()
    model, x = TinyEps(sched.alphas_cumprod, seed=7), initial_noise(seed=8)
    g = torch.Generator().manual_seed(9)
    noises = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in ks]
    ref = x
    for k, z in zip(ks, noises):
        ref = sched.step(model(ref, k), k, ref, eta=eta, variance_noise=z).prev_sample
    out = run_ats(sched, model, x, to_times(ks + [0]), "ddim", eta=eta, generator=torch.Generator().manual_seed(9))
    check_agreement(out, ref, x)
    assert (out - run_ats(sched, model, x, to_times(ks + [0]), "ddim")).abs().max() > 0.1
