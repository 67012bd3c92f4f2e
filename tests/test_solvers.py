
import numpy as np
import pytest
import torch

from ats.discretize import get_timesteps
from ats.models import GaussianMixture, model_wrapper
from ats.noise import EDMSchedule, NoiseScheduleVP
from ats.params import offset_cond_timesteps
from ats.solvers import SolverState, bind_solver, coeffs, get_step_fn, nfe, sample, step_orders
from ats.solvers.steps import grid_coeffs

LINEAR = NoiseScheduleVP("linear")
CONFIGS = [("ddim", 1, {}), ("euler", 1, {}), ("heun", 2, {}),
           ("dpm_solver++", 1, {}), ("dpm_solver++", 2, {}), ("dpm_solver++", 3, {}),
           ("uni_pc", 1, {"variant": "bh1"}), ("uni_pc", 2, {"variant": "bh2"}),
           ("uni_pc", 3, {"variant": "bh1"}), ("uni_pc", 3, {"variant": "bh2"}),
           ("ipndm", 1, {}), ("ipndm", 2, {}), ("ipndm", 3, {}), ("ipndm", 4, {})]
IDS = [f"{s}-{o}-{k.get('variant', '')}" for s, o, k in CONFIGS]


def slope(nfes, errors):
    return -np.polyfit(np.log(nfes), np.log(errors), 1)[0]


@pytest.fixture(scope="module")
def conv_gmm():
    return GaussianMixture.random(4, 5, seed=3, std_range=(0.1, 0.4))


@pytest.mark.parametrize("solver, order, variant, lo, hi, nfes", [
    ("ddim", 1, "bh1", 0.8, 1.3, [40, 80, 160]),
    ("heun", 2, "bh1", 1.7, 2.4, [41, 81, 161]),
    ("dpm_solver++", 2, "bh1", 1.7, 2.4, [40, 80, 160]),
    # Its first-order warm-up step caps 3M at global order 2 in theory; UniPC's corrector does not.
    ("dpm_solver++", 3, "bh1", 2.0, 3.6, [40, 80, 160]),
    ("uni_pc", 3, "bh1", 2.5, 4.5, [40, 80, 160]),
    ("uni_pc", 3, "bh2", 2.5, 4.5, [40, 80, 160]),
])
def test_convergence_order(conv_gmm, solver, order, variant, lo, hi, nfes):
    """Error against a 1000-step reference falls with NFE at the solver's order."""
    model_fn = model_wrapper(conv_gmm, LINEAR, model_type="edm")
    x = torch.randn(64, conv_gmm.dim, dtype=torch.float64)
    ref = sample(model_fn, LINEAR, x, get_timesteps(LINEAR, "logSNR", 1000), "uni_pc", order=3)
    errors = []
    for n in nfes:
        steps = (n + 1) // 2 if solver == "heun" else n
        assert nfe(solver, steps) == n
        out = sample(model_fn, LINEAR, x, get_timesteps(LINEAR, "logSNR", steps), solver, order=order, variant=variant)
        errors.append((out - ref).norm(dim=1).mean().item())
    assert lo <= slope(nfes, errors) <= hi, errors


def test_ipndm_order_on_uniform_grid(conv_gmm):
    """iPNDM's fixed Adams-Bashforth coefficients assume equal steps in sigma_bar, so its
    order shows on a grid uniform in the EDM sigma (poly with rho = 1)."""
    ns = EDMSchedule(sigma_min=0.2, sigma_max=3.)
    model_fn = model_wrapper(conv_gmm, ns, model_type="edm")
    x = torch.randn(64, conv_gmm.dim, dtype=torch.float64) * 3.
    ref = sample(model_fn, ns, x, get_timesteps(ns, "logSNR", 1000), "uni_pc", order=3)
    for order, lo in [(1, 0.8), (2, 1.7), (3, 2.5), (4, 2.5)]:
        nfes = [10, 20, 40]
        errors = [(sample(model_fn, ns, x, get_timesteps(ns, "poly", n, rho=1.), "ipndm", order=order) - ref)
                  .norm(dim=1).mean().item() for n in nfes]
        assert slope(nfes, errors) >= lo, (order, errors)


@pytest.mark.parametrize("solver, order, kw", CONFIGS, ids=IDS)
def test_per_sample_schedules_equal_single_runs(gmm, solver, order, kw):
    model_fn = model_wrapper(gmm, LINEAR, model_type="edm")
    b, steps = 5, 6
    x = torch.randn(b, gmm.dim, dtype=torch.float64)
    theta = torch.randn(b, steps + 1, dtype=torch.float64)
    from ats.params import timesteps_from_logits
    ts = timesteps_from_logits(theta, LINEAR)
    cs = offset_cond_timesteps(ts, 0.3 * torch.randn_like(ts))
    batched = sample(model_fn, LINEAR, x, ts, solver, order=order, cond_timesteps=cs, **kw)
    singles = torch.cat([sample(model_fn, LINEAR, x[i:i + 1], ts[i], solver, order=order,
                                cond_timesteps=cs[i], **kw) for i in range(b)])
    assert torch.equal(batched, singles)
    assert not torch.allclose(batched[0], batched[1])


@pytest.mark.parametrize("solver, order, kw", CONFIGS, ids=IDS)
def test_gradcheck_times_and_latents(gmm, solver, order, kw):
    model_fn = model_wrapper(gmm, LINEAR, model_type="edm")
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    small = GaussianMixture.random(3, 3, seed=1)
    model_fn = model_wrapper(small, LINEAR, model_type="edm")
    ts = torch.tensor([[1., 0.6, 0.3, 0.1, 0.02], [0.9, 0.7, 0.25, 0.05, 0.01]], dtype=torch.float64)
    ts.requires_grad_(True)
    cs = (ts.detach() * torch.tensor([1., 0.97, 1.02, 0.99, 1.])).requires_grad_(True)

    def run(x, ts, cs):
        return sample(model_fn, LINEAR, x, ts, solver, order=order, cond_timesteps=cs, **kw)
    assert torch.autograd.gradcheck(run, (x, ts, cs), atol=1e-5, rtol=1e-4)
    # The gradient with respect to the schedule is not zero: the schedule matters.
    g = torch.autograd.grad(run(x, ts, cs).sum(), ts)[0]
    assert g[:, 1:-1].abs().sum() > 0


def test_gradcheck_ddim_with_noise():
    small = GaussianMixture.random(3, 3, seed=1)
    model_fn = model_wrapper(small, LINEAR, model_type="edm")
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([1., 0.5, 0.2, 0.01], dtype=torch.float64, requires_grad=True)

    def run(x, ts):
        return sample(model_fn, LINEAR, x, ts, "ddim", eta=0.7, generator=torch.Generator().manual_seed(5))
    assert torch.autograd.gradcheck(run, (x, ts))


@pytest.mark.parametrize("solver, order, kw", CONFIGS, ids=IDS)
def test_step_api_and_nfe(gmm, solver, order, kw):
    calls = []

    def counting(x, t):
        calls.append(t)
        return model_wrapper(gmm, LINEAR, model_type="edm")(x, t)

    steps = 5
    x = torch.randn(3, gmm.dim, dtype=torch.float64)
    ts = get_timesteps(LINEAR, "logSNR", steps).expand(3, -1)
    out = sample(counting, LINEAR, x, ts, solver, order=order, **kw)
    assert len(calls) == nfe(solver, steps)
    step = get_step_fn(solver, **kw)
    state, y = SolverState(), x
    for i, o in enumerate(step_orders(solver, steps, order)):
        y, state = step(counting, y, coeffs(LINEAR, ts[:, i], y.ndim), coeffs(LINEAR, ts[:, i + 1], y.ndim),
                        state, order=o, cond_t=ts[:, i], cond_next=ts[:, i + 1], last=i == steps - 1)
    assert torch.equal(y, out)


@pytest.mark.parametrize("solver, order, kw", CONFIGS, ids=IDS)
def test_step_hooks_reproduce_sample(gmm, solver, order, kw):
    """The callback sees every step of ``sample``; a next_time hook returning the schedule's
    own next times and ``BoundSolver.iter_steps`` on the grid reproduce it bit for bit."""
    model_fn = model_wrapper(gmm, LINEAR, model_type="edm")
    x = torch.randn(3, gmm.dim, dtype=torch.float64)
    ts = get_timesteps(LINEAR, "logSNR", 5).expand(3, -1)
    out, trajectory = sample(model_fn, LINEAR, x, ts, solver, order=order, return_intermediates=True, **kw)
    for hook in (None, lambda i, x, c: ts[:, i + 1]):
        seen = []
        assert torch.equal(sample(model_fn, LINEAR, x, ts, solver, order=order, callback=seen.append,
                                  next_time=hook, **kw), out)
        assert [step.i for step in seen] == list(range(5))
        for step in seen:
            assert torch.equal(step.x, trajectory[step.i + 1]) and torch.equal(step.c.t, ts[:, step.i + 1])
    run = bind_solver(model_fn, LINEAR, solver, 5, order, **kw)
    assert torch.equal(list(run.iter_steps(x, grid_coeffs(LINEAR, ts, x.ndim)))[-1].x, out)


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpm_solver++", "uni_pc", "ipndm"])
def test_next_time_is_honoured(gmm, solver):
    """With next_time, the timesteps give only t_0 and N: each step ends where the hook says
    (per sample here), as sampling on the hook's schedule does, and the network sees it."""
    model_fn = model_wrapper(gmm, LINEAR, model_type="edm")
    x = torch.randn(2, gmm.dim, dtype=torch.float64)
    ts = get_timesteps(LINEAR, "logSNR", 4)
    chosen = torch.stack([get_timesteps(LINEAR, "time_uniform", 4), get_timesteps(LINEAR, "time_quadratic", 4)])
    assert torch.equal(chosen[:, 0], ts[[0, 0]]) and not torch.equal(chosen[0], ts)
    asked, seen, reached = [], [], []

    def next_time(i, x_i, c):
        asked.append((i, x_i, c.t))
        return chosen[:, i + 1]

    def recording(x, t):
        seen.append(t)
        return model_fn(x, t)
    out = sample(recording, LINEAR, x, ts, solver, next_time=next_time, callback=reached.append)
    _, trajectory = sample(model_fn, LINEAR, x, chosen, solver, return_intermediates=True)
    assert torch.equal(out, trajectory[-1])
    assert [i for i, _, _ in asked] == list(range(4))
    for i, x_i, t_i in asked:
        assert torch.equal(x_i, trajectory[i])
        assert torch.equal(t_i.expand(2), chosen[:, i])
        assert torch.equal(reached[i].c.t, chosen[:, i + 1])
    assert any(torch.equal(t, chosen[:, 1]) for t in seen)


@pytest.mark.parametrize("solver, order, kw", CONFIGS, ids=IDS)
def test_cond_timesteps_reach_the_network_only(gmm, solver, order, kw):
    """The network sees cond_timesteps; the solver's coefficients keep the timesteps."""
    seen = []
    base = model_wrapper(gmm, LINEAR, model_type="edm")

    def recording(x, t):
        seen.append(t.detach().clone())
        return base(x, t)

    x = torch.randn(3, gmm.dim, dtype=torch.float64)
    ts = get_timesteps(LINEAR, "logSNR", 4).expand(3, -1)
    cs = (ts * torch.tensor([1., 0.9, 1.1, 0.95, 1.])).clone().requires_grad_(True)
    out = sample(recording, LINEAR, x, ts, solver, order=order, cond_timesteps=cs, **kw)
    # Heun's second stage sees the next cond time; every other call sees cs[:, i] of its step.
    expected = [cs[:, i] for i in range(4)] if solver != "heun" else \
        [c for i in range(4) for c in ((cs[:, i], cs[:, i + 1]) if i < 3 else (cs[:, i],))]
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, want.detach())
    plain = sample(base, LINEAR, x, ts, solver, order=order, **kw)
    assert (out - plain).abs().max() > 1e-4
    # Not the same as moving the whole schedule to cs: the coefficients still use ts.
    moved = sample(base, LINEAR, x, cs.detach(), solver, order=order, **kw)
    assert (out - moved).abs().max() > 1e-4
    assert torch.autograd.grad(out.sum(), cs)[0][:, :4].abs().min() > 0


def test_ancestral_step_on_edm_schedule():
    """eta = 1 on a VE schedule is k-diffusion's ancestral Euler step."""
    ns = EDMSchedule()
    x0_true = torch.randn(4, 3, dtype=torch.float64)
    model_fn = lambda x, t: (x - x0_true) / t[:, None]  # a denoiser that always knows x0
    x = x0_true + 2. * torch.randn(4, 3, dtype=torch.float64)
    out = sample(model_fn, ns, x, torch.tensor([2., 1.], dtype=torch.float64), "ddim", eta=1.,
                 generator=torch.Generator().manual_seed(0))
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma_up = (1. ** 2 * (2. ** 2 - 1. ** 2) / 2. ** 2) ** 0.5
    sigma_down = (1. - sigma_up ** 2) ** 0.5
    d = (x - x0_true) / 2.
    torch.testing.assert_close(out, x + (sigma_down - 2.) * d + sigma_up * z)


def test_lower_order_final_and_warmup():
    assert step_orders("dpm_solver++", 5, 3) == [1, 2, 3, 2, 1]
    assert step_orders("dpm_solver++", 5, 3, lower_order_final=False) == [1, 2, 3, 3, 3]
    assert step_orders("dpm_solver++", 12, 3) == [1, 2] + [3] * 10
    assert step_orders("uni_pc", 12, 3) == [1, 2] + [3] * 8 + [2, 1]
    assert step_orders("ipndm", 5, 4) == [1, 2, 3, 4, 4]
    assert step_orders("heun", 3) == [2, 2, 2] and nfe("heun", 3) == 5


def test_ddim_noise_per_sample_generators(gmm):
    model_fn = model_wrapper(gmm, LINEAR, model_type="edm")
    x = torch.randn(3, gmm.dim, dtype=torch.float64)
    ts = get_timesteps(LINEAR, "time_uniform", 5)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    batched = sample(model_fn, LINEAR, x, ts, "ddim", eta=1., generator=gens())
    singles = torch.cat([sample(model_fn, LINEAR, x[i:i + 1], ts, "ddim", eta=1., generator=[g])
                         for i, g in enumerate(gens())])
    assert torch.equal(batched, singles)
    assert not torch.allclose(batched, sample(model_fn, LINEAR, x, ts, "ddim"))


def test_return_intermediates_and_float32(gmm):
    model_fn = model_wrapper(gmm, LINEAR, model_type="edm")
    x = torch.randn(4, gmm.dim, dtype=torch.float64)
    ts = get_timesteps(LINEAR, "logSNR", 6)
    out, traj = sample(model_fn, LINEAR, x, ts, "uni_pc", return_intermediates=True)
    assert traj.shape == (7, 4, gmm.dim) and torch.equal(traj[0], x) and torch.equal(traj[-1], out)
    out32 = sample(model_fn, LINEAR, x.float(), ts.float(), "uni_pc")
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("solver", ["ddim", "dpm_solver++", "uni_pc", "ipndm", "heun"])
def test_cuda_matches_cpu(gmm, solver):
    ts = get_timesteps(LINEAR, "logSNR", 5)
    x = torch.randn(8, gmm.dim, dtype=torch.float64)
    cpu = sample(model_wrapper(gmm, LINEAR, model_type="edm"), LINEAR, x, ts, solver)
    gpu = sample(model_wrapper(gmm.cuda(), LINEAR, model_type="edm"), LINEAR, x.cuda(), ts.cuda(), solver)
    torch.testing.assert_close(gpu.cpu(), cpu)


@pytest.mark.parametrize("kwargs, match", [
    (dict(timesteps=torch.tensor([1., 0.5, 0.5, 0.1])), "strictly decreasing"),
    (dict(timesteps=torch.tensor([0.1, 0.5, 1.])), "strictly decreasing"),
    (dict(timesteps=torch.tensor([1.5, 0.5, 0.1])), "out of range"),
    (dict(timesteps=torch.tensor([1., 0.5, 0.])), "out of range"),
    (dict(timesteps=torch.tensor([1., float("nan"), 0.1])), "NaN"),
    (dict(timesteps=torch.tensor([1.])), "at least 2 entries"),
    (dict(timesteps=torch.ones(3, 4, 5)), r"shape \[N\+1\] or \[B, N\+1\]"),
    (dict(timesteps=torch.tensor([[1., 0.5, 0.1]] * 3)), r"shape \[N\+1\] or \[B, N\+1\] with B = 2"),
    (dict(solver="dpm_solver"), "unknown solver 'dpm_solver'"),
    (dict(solver="dpm_solver++", order=4), "supports order 1, 2, 3, got 4"),
    (dict(solver="heun", order=1), "supports order 2"),
    (dict(solver="uni_pc", variant="bh3"), "unknown uni_pc variant"),
    (dict(solver="uni_pc", eta=0.5), "eta applies to solver 'ddim' only"),
    (dict(solver="ddim", eta=-1.), r"eta must be in \[0, 1\]"),
    (dict(solver="ddim", eta=1.2), r"eta must be in \[0, 1\]"),
    (dict(solver="uni_pc", order=3.0), "supports order 1, 2, 3, got 3.0"),
    (dict(solver="dpm_solver++", variant="b2"), "unknown uni_pc variant 'b2'"),
    (dict(cond_timesteps=torch.tensor([1., 0.5])), "cond_timesteps has 2 entries"),
    (dict(cond_timesteps=torch.tensor([1., 2., 0.1])), "cond_timesteps out of range"),
])
def test_bad_input(gmm, kwargs, match):
    args = dict(timesteps=torch.tensor([1., 0.5, 0.1]), solver="ddim")
    args.update(kwargs)
    model_fn = model_wrapper(gmm, LINEAR, model_type="edm")
    with pytest.raises(ValueError, match=match):
        sample(model_fn, LINEAR, torch.randn(2, gmm.dim), **args)


def test_bad_x(gmm):
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        sample(lambda x, t: x, LINEAR, torch.ones(3, dtype=torch.long), torch.tensor([1., 0.1]), "ddim")
