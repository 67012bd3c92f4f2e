import pytest
import torch

from ats.discretize import AYS_FAMILIES, KINDS, ays_timesteps, get_timesteps
from ats.noise import EDMSchedule, NoiseScheduleVP, RectifiedFlowSchedule

SCHEDULES = [NoiseScheduleVP("linear"), NoiseScheduleVP("cosine"),
             NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000)), EDMSchedule(),
             RectifiedFlowSchedule(3.0)]


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


def ays_schedule(family: str):
    """The noise schedule of an AYS family: SD 1.5 / SDXL's scaled_linear DDPM betas, SVD's EDM range."""
    if family == "svd":
        return EDMSchedule(0.002, 700.)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return NoiseScheduleVP("discrete", betas=betas)


@pytest.mark.parametrize("family", list(AYS_FAMILIES))
def test_ays_reproduces_diffusers_lists_and_interpolates(family):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.schedulers.AysSchedules
    ns = ays_schedule(family)
    t = ays_timesteps(ns, 10, family)
    assert t.shape == (11,) and t[-1].item() == ns.eps
    if family == "svd":
        assert t[:-1].tolist() == ref["StableDiffusionVideoSigmas"][:-1]            # t is sigma
    else:
        name = "StableDiffusionTimesteps" if family == "sd15" else "StableDiffusionXLTimesteps"
        assert (t[:-1] * 1000 - 1).round().long().tolist() == ref[name]
        assert torch.allclose(t[:-1] * 1000 - 1, torch.tensor(ref[name], dtype=torch.float64), atol=1e-9)
        sigmas = ref[name.replace("Timesteps", "Sigmas")][:-1]                   # AYS's sigmas, 3 decimals
        torch.testing.assert_close(ns.edm_sigma(t[:-1]), torch.tensor(sigmas, dtype=torch.float64),
                                   rtol=3e-3, atol=2e-3)
    log_sigma = torch.log(ns.edm_sigma(t))
    for steps in (1, 4, 5, 7, 20, 31):
        u = ays_timesteps(ns, steps, family)
        assert u.shape == (steps + 1,) and (u.diff() < 0).all() and (u[0], u[-1]) == (t[0], t[-1])
        if 10 % steps == 0:                                                       # on the reference grid
            torch.testing.assert_close(u, t[::10 // steps])
        # log sigma is linear in the step index between the reference points
        pos = torch.linspace(0, 10, steps + 1, dtype=torch.float64)
        lo = pos.floor().long().clamp(max=9)
        expected = log_sigma[lo] + (pos - lo) * (log_sigma[lo + 1] - log_sigma[lo])
        torch.testing.assert_close(torch.log(ns.edm_sigma(u)), expected)


def test_ays_only_for_its_families():
    with pytest.raises(ValueError, match="no AYS reference schedule for family 'sd3'; diffusers ships sd15, sdxl, svd"):
        ays_timesteps(ays_schedule("sd15"), 10, "sd3")
    with pytest.raises(ValueError, match="tuned for the Stable Diffusion schedule .* not NoiseScheduleVP"):
        ays_timesteps(NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000)), 10, "sd15")
    with pytest.raises(ValueError, match="sigma_max 700"):
        ays_timesteps(EDMSchedule(), 10, "svd")
    with pytest.raises(ValueError, match="tuned for"):
        ays_timesteps(RectifiedFlowSchedule(3.0), 10, "sdxl")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        ays_timesteps(ays_schedule("sdxl"), 0, "sdxl")
