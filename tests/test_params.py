import pytest
import torch

from ats.discretize import get_timesteps
from ats.noise import EDMSchedule, NoiseScheduleVP
from ats.params import (carried_cond_timesteps, logits_from_timesteps, offset_cond_timesteps,
                        ratio_cond_timesteps, timesteps_from_logits)

SCHEDULES = [NoiseScheduleVP("linear"), NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000)),
             EDMSchedule()]


@pytest.mark.parametrize("ns", SCHEDULES, ids=repr)
@pytest.mark.parametrize("space, kind", [("lambda", "logSNR"), ("time", "time_uniform")])
def test_equal_logits_reproduce_fixed_schedule(ns, space, kind):
    for steps in (1, 4, 10):
        ts = timesteps_from_logits(torch.full((steps + 1,), 0.7, dtype=torch.float64), ns, space=space)
        torch.testing.assert_close(ts, get_timesteps(ns, kind, steps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ns", SCHEDULES, ids=repr)
@pytest.mark.parametrize("space", ["lambda", "time"])
def test_random_logits_give_valid_schedules(ns, space):
    theta = 3 * torch.randn(7, 6, dtype=torch.float64)
    ts = timesteps_from_logits(theta, ns, space=space)
    assert ts.shape == (7, 6)
    assert (ts[:, 0] == ns.T).all() and (ts[:, -1] == ns.eps).all()
    assert (ts[:, 1:] < ts[:, :-1]).all()
    # The parameterization is differentiable and theta_0 is a gauge: it receives no gradient.
    theta.requires_grad_(True)
    g = torch.autograd.grad(timesteps_from_logits(theta, ns, space=space)[:, 2].sum(), theta)[0]
    assert g[:, 1:].abs().sum() > 0 and g[:, 0].abs().max() < 1e-12


def test_custom_ends_and_round_trip():
    ns = NoiseScheduleVP("linear")
    ts = timesteps_from_logits(torch.randn(2, 5, dtype=torch.float64), ns, t_start=0.8, t_end=0.01)
    assert (ts[:, 0] == 0.8).all() and (ts[:, -1] == 0.01).all()
    for space in ("lambda", "time"):
        target = get_timesteps(ns, "edm", 6)
        torch.testing.assert_close(timesteps_from_logits(logits_from_timesteps(target, ns, space), ns, space=space),
                                   target)


def test_offsets_clipped_and_zero_at_ends():
    ts = torch.tensor([[1., 0.6, 0.5, 0.1], [1., 0.9, 0.3, 0.1]], dtype=torch.float64)
    xi = torch.tensor([[0.3, 0.3, -0.3, 0.2], [0.01, -0.02, 0.03, 0.5]], dtype=torch.float64)
    cs = offset_cond_timesteps(ts, xi)
    expected = torch.tensor([[1., 0.65, 0.45, 0.1], [1., 0.88, 0.33, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(cs, expected)
    with pytest.raises(ValueError, match="xi must have the shape of timesteps"):
        offset_cond_timesteps(ts, xi[:, :3])


def test_carried_offsets_leave_their_own_schedule_alone_and_stay_inside_any_other():
    """A global schedule's clipped offsets carried back to it change nothing; carried to other
    schedules (per-sample ones, steps far smaller than the global's), every inner s_j lies
    strictly between the end and the time before, and the ends are never offset."""
    g = torch.Generator().manual_seed(0)
    ts = torch.tensor([1., 0.6, 0.35, 0.1, 1e-3], dtype=torch.float64)
    raw = torch.tensor([0., 0.3, -0.3, -0.2, 0.], dtype=torch.float64)
    own = offset_cond_timesteps(ts, raw)
    torch.testing.assert_close(carried_cond_timesteps(ts, own - ts), own)
    logits = torch.randn(500, 5, generator=g, dtype=torch.float64) * 3
    others = timesteps_from_logits(logits, NoiseScheduleVP("linear"))
    cs = carried_cond_timesteps(others, own - ts)
    assert (cs[:, 1:-1] < others[:, :-2]).all() and (cs[:, 1:-1] > others[:, -1:]).all()
    torch.testing.assert_close(cs[:, [0, -1]], others[:, [0, -1]])


def test_ratios():
    ts = torch.tensor([1., 0.5, 0.2, 0.01], dtype=torch.float64)
    cs = ratio_cond_timesteps(ts, torch.tensor([0.9, 1.1, 1.3], dtype=torch.float64))
    torch.testing.assert_close(cs, torch.tensor([0.9, 0.55, 0.2, 0.01], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"ratios must have shape \[\.\.\., N\]"):
        ratio_cond_timesteps(ts, torch.ones(4))


def test_bad_input():
    ns = NoiseScheduleVP("linear")
    with pytest.raises(ValueError, match="unknown parameterization space 'sigma'"):
        timesteps_from_logits(torch.zeros(4), ns, space="sigma")
    with pytest.raises(ValueError, match="N\\+1 >= 2"):
        timesteps_from_logits(torch.zeros(1), ns)
    with pytest.raises(ValueError, match="strictly decreasing"):
        logits_from_timesteps(torch.tensor([1., 1., 0.1]), ns)
