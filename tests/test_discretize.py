import pytest
import torch

from ats.discretize import KINDS, get_timesteps
from ats.noise import EDMSchedule, NoiseScheduleVP

SCHEDULES = [NoiseScheduleVP("linear"), NoiseScheduleVP("cosine"),
             NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000)), EDMSchedule()]


@pytest.mark.parametrize("ns", SCHEDULES, ids=repr)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [1, 5, 17])
def test_decreasing_exact_ends(ns, kind, steps):
    t = get_timesteps(ns, kind, steps)
    assert t.shape == (steps + 1,)
    assert t[0].item() == ns.T and t[-1].item() == ns.eps
    assert (t[1:] < t[:-1]).all()


def test_custom_ends_and_formulas():
    ns = NoiseScheduleVP("linear")
    t = get_timesteps(ns, "logSNR", 8, t_start=0.9, t_end=0.01)
    assert (t[0].item(), t[-1].item()) == (0.9, 0.01)
    lam = ns.marginal_lambda(t)
    torch.testing.assert_close(lam[1:] - lam[:-1], torch.full((8,), (lam[-1] - lam[0]).item() / 8, dtype=lam.dtype))
    tq = get_timesteps(ns, "time_quadratic", 4)
    torch.testing.assert_close(tq.sqrt().diff(), torch.full((4,), (1e-3 ** 0.5 - 1.) / 4, dtype=tq.dtype))
    for kind, rho in [("edm", 7.), ("poly", 3.)]:
        s = ns.edm_sigma(get_timesteps(ns, kind, 6, rho=rho)) ** (1 / rho)
        torch.testing.assert_close(s.diff(), torch.full((6,), (s[-1] - s[0]).item() / 6, dtype=s.dtype))


def test_edm_schedule_is_karras_sigmas():
    t = get_timesteps(EDMSchedule(), "edm", 4)
    i = torch.arange(5, dtype=torch.float64)
    karras = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(t, karras)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="karras", steps=5), "unknown discretization kind 'karras'"),
    (dict(kind="logSNR", steps=0), "steps must be an integer >= 1"),
    (dict(kind="logSNR", steps=5, t_start=0.1, t_end=0.5), "must be greater than t_end"),
    (dict(kind="logSNR", steps=5, t_start=1.5), "out of range"),
    (dict(kind="logSNR", steps=5, t_end=0.), "out of range"),
    (dict(kind="poly", steps=5, rho=0.), "rho must be positive"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_timesteps(NoiseScheduleVP("linear"), **kwargs)
