
import pytest
import torch

from ats.noise import EDMSchedule, NoiseScheduleVP, RectifiedFlowSchedule

BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
SCHEDULES = {
    "linear": lambda: NoiseScheduleVP("linear"),
    "cosine": lambda: NoiseScheduleVP("cosine"),
    "discrete-betas": lambda: NoiseScheduleVP("discrete", betas=BETAS),
    "discrete-alphas": lambda: NoiseScheduleVP("discrete", alphas_cumprod=torch.cumprod(1 - BETAS, 0)),
    "edm": lambda: EDMSchedule(),
    "flow": lambda: RectifiedFlowSchedule(3.0),
}


@pytest.fixture(params=list(SCHEDULES))
def ns(request):
    return SCHEDULES[request.param]()


def test_inverse_lambda_round_trip_float64(ns):
    t = torch.linspace(ns.eps, ns.T, 20001, dtype=torch.float64)
    assert (ns.inverse_lambda(ns.marginal_lambda(t)) - t).abs().max() < 1e-5


def test_inverse_lambda_round_trip_float32_relative(ns):
    t = torch.linspace(ns.eps, ns.T, 5001, dtype=torch.float32)
    rel = ((ns.inverse_lambda(ns.marginal_lambda(t)) - t) / t).abs().max()
    # cos(pi/2 (t+s)/(1+s)) loses 5 digits in float32 near T: the map itself is ill-conditioned there.
    assert rel < (1e-3 if getattr(ns, "schedule", "") == "cosine" else 1e-5)


def test_any_shape_and_consistency(ns):
    t = torch.rand(3, 4, 5, dtype=torch.float64) * (ns.T - ns.eps) + ns.eps
    alpha, sigma, lam = ns.marginal_alpha(t), ns.marginal_std(t), ns.marginal_lambda(t)
    assert alpha.shape == sigma.shape == lam.shape == t.shape
    torch.testing.assert_close(lam, torch.log(alpha / sigma))
    torch.testing.assert_close(alpha, torch.exp(ns.marginal_log_mean_coeff(t)))
    if isinstance(ns, NoiseScheduleVP):
        torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(t))
    elif isinstance(ns, RectifiedFlowSchedule):
        torch.testing.assert_close(alpha + sigma, torch.ones_like(t))
        torch.testing.assert_close(sigma, ns.shift * t / (1 + (ns.shift - 1) * t))
    else:
        torch.testing.assert_close(sigma, t)


def test_lambda_decreases_in_t(ns):
    lam = ns.marginal_lambda(torch.linspace(ns.eps, ns.T, 1000, dtype=torch.float64))
    assert (lam[1:] < lam[:-1]).all()


def test_differentiable(ns):
    # Away from the knots of the discrete schedule's piecewise-linear interpolation.
    t = torch.tensor([0.3021, 0.5555, 0.8123], dtype=torch.float64) * ns.T
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(ns.marginal_lambda, (t,))
    lam = ns.marginal_lambda(t).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(ns.inverse_lambda, (lam,))


def test_linear_closed_form_and_defaults():
    ns = NoiseScheduleVP("linear", beta_0=0.1, beta_1=20.)
    t = torch.tensor(0.5, dtype=torch.float64)
    assert ns.marginal_log_mean_coeff(t).item() == pytest.approx(-(19.9) * 0.25 / 4 - 0.1 * 0.5 / 2)
    assert (ns.T, ns.eps) == (1., 1e-3)
    assert NoiseScheduleVP("cosine").T == 0.9946


def test_discrete_grid_points():
    ns = NoiseScheduleVP("discrete", betas=BETAS)
    ac = torch.cumprod(1 - BETAS, 0)
    k = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(ns.marginal_alpha((k + 1).double() / 1000.) ** 2, ac[k])
    assert ns.eps == pytest.approx(1e-3) and ns.total_N == 1000


def test_edm_is_sigma():
    ns = EDMSchedule(0.002, 80.)
    assert (ns.T, ns.eps) == (80., 0.002)
    t = torch.tensor([0.5, 3.])
    torch.testing.assert_close(ns.marginal_lambda(t), -torch.log(t))
    torch.testing.assert_close(ns.edm_sigma(t), t)


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="quadratic"), "unknown schedule"),
    (dict(schedule="discrete"), "exactly one of"),
    (dict(schedule="discrete", betas=torch.tensor([0.1, 1.5])), "betas must lie"),
    (dict(schedule="linear", beta_0=2., beta_1=1.), "beta_0 < beta_1"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseScheduleVP(**kwargs)


def test_bad_edm():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDMSchedule(1., 0.5)
