"""TimeTuner: learned conditioning-time ratios (ats.methods.timetuner)."""
import math

import pytest
import torch

from ats.discretize import check_time_range, get_timesteps
from ats.methods.common import FitDiverged, FitResult
from ats.methods.timetuner import fit_timetuner
from ats.models.gmm import gmm_source
from ats.noise import EDMSchedule
from ats.params import ratio_cond_timesteps
from ats.solvers import sample


@pytest.fixture(scope="module")
def gmm_setup():
    """The 16-D mixture with its exact denoiser, real samples from the mixture, NFE 6."""
    source = gmm_source(dim=16)
    data = source.info["gmm"].sample(512, generator=torch.Generator().manual_seed(1))
    return source, data, get_timesteps(source.noise_schedule, "logSNR", 6)


def quick_fit(setup, solver="ddim", **kw):
    source, data, ts = setup
    kw = {"iterations": 12, "batch_size": 32, "lr": 1e-2, **kw}
    return fit_timetuner(source.model_fn, source.noise_schedule, data, ts, solver, **kw)


def check_result(res: FitResult, source, ts: torch.Tensor) -> torch.Tensor:
    ratios = torch.tensor(res.info["ratios"], dtype=torch.float64)
    assert res.method == "timetuner" and res.nfe == (2 * (len(ts) - 1) - 1 if res.solver == "heun" else len(ts) - 1)
    assert torch.equal(res.timesteps, ts)
    assert ratios.shape == (len(ts) - 1,) and ratios[-1] == 1 and torch.isfinite(ratios).all()
    torch.testing.assert_close(res.cond_timesteps, ratio_cond_timesteps(ts, ratios))
    check_time_range(source.noise_schedule, res.cond_timesteps, "cond_timesteps")
    assert sorted(k for k in res.history if k.startswith("step_")) == [f"step_{i}" for i in range(len(ts) - 2)]
    assert all(len(v) == res.info["iterations"] and all(map(math.isfinite, v)) for v in res.history.values())
    return ratios


@pytest.fixture(scope="module")
def digits():
    """The shipped digits U-Net (wrapped here so its parameters can be inspected), the real
    digits, the FID on the digits classifier and 500 evaluation latents."""
    from ats.models.digits import digits_metric
    from ats.models.digits import digits_noise_schedule, load_digits_data, load_digits_unet
    from ats.models.digits import digits_source
    from ats.models.wrapper import model_wrapper
    from ats.teacher import split_seeds

    net, ns = load_digits_unet(), digits_noise_schedule()
    x_T = digits_source().latents(split_seeds("eval", 500), dtype=torch.float32)
    return net, model_wrapper(net, ns), ns, load_digits_data()[0], digits_metric(), x_T


@pytest.mark.parametrize("kind, strategy", [("time_uniform", "sequential"), ("logSNR", "parallel")])
def test_ddim_nfe10_on_digits_improves_fid(digits, kind, strategy):
    """The paper's setting: DDIM, 10 steps, on held-out evaluation seeds. With 2000 samples and
    fits of 200 iterations (batch 64, lr 2e-3): time_uniform 0.747 -> 0.650 (sequential) /
    0.655 (parallel), logSNR 1.313 -> 1.108 / 1.179. This short fit (15 iterations, batch 16,
    lr 2e-2) on these 500 samples gave tuned/untuned FID ratios of 0.83-0.90 over seeds 0-2
    for both schedules and both strategies."""
    from ats.metrics import frechet_distance

    net, model_fn, ns, data, metric, x_T = digits
    ts = get_timesteps(ns, kind, 10)
    res = fit_timetuner(model_fn, ns, data, ts, "ddim", strategy=strategy, iterations=15, batch_size=16, lr=2e-2)
    assert all(p.grad is None for p in net.parameters())  # only the ratios were differentiated
    assert (torch.tensor(res.info["ratios"]) - 1).abs().max() > 0.02
    with torch.no_grad():
        untuned = frechet_distance(metric, sample(model_fn, ns, x_T, ts, "ddim"))
        tuned = frechet_distance(metric, sample(model_fn, ns, x_T, ts, "ddim", cond_timesteps=res.cond_timesteps))
    assert tuned < 0.93 * untuned, (untuned, tuned)


@pytest.mark.parametrize("solver", ["dpm_solver++", "uni_pc", "ipndm", "heun"])
@pytest.mark.parametrize("strategy", ["sequential", "parallel"])
def test_any_solver_step_function(gmm_setup, solver, strategy):
    source, _, ts = gmm_setup
    res = quick_fit(gmm_setup, solver, strategy=strategy)
    ratios = check_result(res, source, ts)
    assert res.solver == solver and res.info["strategy"] == strategy
    assert (ratios[1:-1] != 1).all() and (ratios[1:-1] - 1).abs().max() > 1e-3  # every ratio moved
    assert ratios[0] <= 1                                   # s_0 = r_0 T never exceeds T (VP)
    x = sample(source.model_fn, source.noise_schedule, source.latents(range(64)), ts, solver,
               cond_timesteps=res.cond_timesteps)
    assert torch.isfinite(x).all()


def test_strategies_agree_on_step_0_only(gmm_setup):
    seq = quick_fit(gmm_setup, "dpm_solver++", strategy="sequential")
    par = quick_fit(gmm_setup, "dpm_solver++", strategy="parallel")
    # At t_0 = T both start from the same noised data, alpha_T x0 + sigma_T eps; later they differ.
    assert seq.history["step_0"] == par.history["step_0"]
    assert seq.info["ratios"][0] == par.info["ratios"][0]
    assert seq.info["ratios"][1:-1] != par.info["ratios"][1:-1]


@pytest.mark.parametrize("solver", ["uni_pc", "dpm_solver++", "heun", "ipndm"])
def test_sequential_pool_follows_the_sampler(gmm_setup, solver):
    """Sequential fits start step i from the states ``sample`` reaches with the tuned ratios
    (multistep history and UniPC's reused corrector output included), pushed in chunks."""
    from ats.methods.timetuner import _Problem
    from ats.solvers import bind_solver
    from ats.solvers.steps import SolverState, grid_coeffs

    source, _, ts = gmm_setup
    cond = ratio_cond_timesteps(ts, torch.tensor([1., .97, 1.03, .95, 1.1, 1.], dtype=torch.float64))
    x = source.latents(range(100))
    _, trajectory = sample(source.model_fn, source.noise_schedule, x, ts, solver, cond_timesteps=cond,
                           return_intermediates=True)
    prob = _Problem(bind_solver(source.model_fn, source.noise_schedule, solver, len(ts) - 1), ts,
                    grid_coeffs(source.noise_schedule, ts[None], 2), chunk=32)
    state = SolverState()
    for i in range(len(ts) - 1):
        x, state = prob.advance(i, x, state, cond)
        assert torch.equal(x, trajectory[i + 1])


def test_deterministic_and_seeded(gmm_setup):
    a = quick_fit(gmm_setup, "uni_pc")
    b = quick_fit(gmm_setup, "uni_pc")
    c = quick_fit(gmm_setup, "uni_pc", seed=1)
    assert torch.equal(a.cond_timesteps, b.cond_timesteps) and a.history == b.history
    assert not torch.equal(a.cond_timesteps, c.cond_timesteps)


def test_progress_and_encode_fn(gmm_setup):
    calls, seen = [], []
    res = quick_fit(gmm_setup, progress=lambda i, it, loss: calls.append((i, it, loss)), iterations=3)
    assert [(phase, it) for phase, it, _ in calls] == [(f"step {i}", it) for i in range(5) for it in range(3)]
    assert [c[2] for c in calls if c[0] == "step 2"] == res.history["step_2"]

    def identity(x):
        seen.append(x.shape[0])
        return x
    assert quick_fit(gmm_setup, encode_fn=identity, iterations=3).info["ratios"] == res.info["ratios"]
    assert sum(seen) == res.info["pool_size"]
    shrunk = quick_fit(gmm_setup, encode_fn=lambda x: 0.1 * x, iterations=3)
    assert shrunk.info["ratios"] != res.info["ratios"]


def test_ratios_stay_in_the_valid_range(gmm_setup):
    source, _, ts = gmm_setup
    res = quick_fit(gmm_setup, lr=0.5, ratio_range=(0.9, 1.1))
    ratios = check_result(res, source, ts)
    assert ((ratios >= 0.9) & (ratios <= 1.1)).all() and ratios[0] <= 1
    assert ((ratios[1:-1] - 0.9).abs() < 1e-12).any() or ((ratios[1:-1] - 1.1).abs() < 1e-12).any()
    # EDM: no upper limit on time (sigma), so r_0 may exceed 1 there; heun works on it too.
    edm = gmm_source(dim=16, noise_schedule=EDMSchedule())
    ts_edm = get_timesteps(edm.noise_schedule, "edm", 5)
    res = fit_timetuner(edm.model_fn, edm.noise_schedule, gmm_setup[1], ts_edm, "heun", iterations=8,
                        batch_size=32, lr=0.05)
    assert check_result(res, edm, ts_edm)[0] > 1


def test_non_finite_loss_stops_with_the_ratios_so_far(gmm_setup):
    """A network that breaks once step 2's conditioning time drifts below 0.995 t_2."""
    source, data, ts = gmm_setup
    lo, hi = float(ts[3]), 0.995 * float(ts[2])

    def fragile(x, t):
        out = source.model_fn(x, t)
        bad = ((t > lo) & (t < hi)).any()
        return out * float("nan") if bad else out

    clean = quick_fit(gmm_setup)
    assert clean.info["ratios"][2] < 0.995            # so the fragile fit does reach the bad times
    with pytest.raises(FitDiverged, match=r"at step 2\b") as info:
        fit_timetuner(fragile, source.noise_schedule, data, ts, "ddim", iterations=12, batch_size=32, lr=1e-2)
    assert "\n" not in str(info.value)
    partial = info.value.result
    ratios = partial.info["ratios"]
    assert partial.info["diverged_at_step"] == 2
    assert ratios[:2] == clean.info["ratios"][:2]      # steps already fitted are kept
    assert 0.995 <= ratios[2] <= 1                       # the last ratio whose loss was finite
    assert ratios[3:] == [1.] * (len(ratios) - 3)
    check_time_range(source.noise_schedule, partial.cond_timesteps, "cond_timesteps")


@pytest.mark.parametrize("change, message", [
    (dict(strategy="both"), "unknown timetuner strategy 'both'"),
    (dict(solver="rk45"), "unknown solver 'rk45'"),
    (dict(solver="dpm_solver++", order=5), "supports order 1, 2, 3"),
    (dict(timesteps=torch.tensor([[1., .5, .1]] * 2, dtype=torch.float64)), r"shape \[N\+1\]"),
    (dict(timesteps=torch.tensor([1., .1], dtype=torch.float64)), "N >= 2"),
    (dict(timesteps=torch.tensor([1., .1, .5], dtype=torch.float64)), "strictly decreasing"),
    (dict(timesteps=torch.tensor([2., .5, .1], dtype=torch.float64)), "out of range"),
    (dict(data=torch.randn(16)), r"shape \[M, \.\.\.\]"),
    (dict(data=torch.full((4, 16), float("nan"))), "NaN"),
    (dict(iterations=0), "iterations must be an integer >= 1"),
    (dict(batch_size=2.5), "batch_size must be an integer >= 1"),
    (dict(lr=-1.), "lr must be a positive number"),
    (dict(ratio_range=(1.2, 2.)), "ratio_range"),
])
def test_bad_input_gives_one_line_errors(gmm_setup, change, message):
    source, data, ts = gmm_setup
    kw = dict(data=data, timesteps=ts, solver="ddim", iterations=2)
    kw.update(change)
    with pytest.raises(ValueError, match=message) as info:
        fit_timetuner(source.model_fn, source.noise_schedule, **kw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("strategy", ["sequential", "parallel"])
def test_ctrl_c_returns_the_ratios_tuned_so_far(gmm_setup, strategy):
    source, _, ts = gmm_setup
    full = quick_fit(gmm_setup, "dpm_solver++", strategy=strategy)

    def stop(phase, it, loss):
        if phase == "step 2" and it == 3:
            raise KeyboardInterrupt
    res = quick_fit(gmm_setup, "dpm_solver++", strategy=strategy, progress=stop)
    assert res.info["interrupted"] and res.info["steps_tuned"] == 2
    ratios = torch.tensor(res.info["ratios"], dtype=torch.float64)
    assert ratios[:2].tolist() == full.info["ratios"][:2] and (ratios[2:] == 1).all()
    torch.testing.assert_close(res.cond_timesteps, ratio_cond_timesteps(ts, ratios))
    check_time_range(source.noise_schedule, res.cond_timesteps, "cond_timesteps")
