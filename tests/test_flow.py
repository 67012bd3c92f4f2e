"""Rectified flow / flow matching: the schedule, the velocity wrapper, FlowMatchEulerDiscreteScheduler
checkpoints, agreement with diffusers' flow Euler loop, and an LD3 fit on a flow checkpoint.

ats time t is the unshifted time (what ``set_timesteps(sigmas=...)`` takes before the shift);
the model's sigma is s t / (1 + (s - 1) t). Models: an exact velocity for Gaussian data
(closed-form ODE solution), and a tiny random UNet2DModel saved with a flow scheduler config.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ats.discretize import KINDS, get_timesteps  # noqa: E402
from ats.methods import fit_method  # noqa: E402
from ats.models import model_wrapper  # noqa: E402
from ats.models.diffusers_unet import (checkpoint_noise_schedule, cifar10_source,  # noqa: E402
                                       load_unet_checkpoint)
from ats.models.gmm import GaussianMixture  # noqa: E402
from ats.noise import NoiseScheduleVP, RectifiedFlowSchedule  # noqa: E402
from ats.solvers import SOLVERS, sample, steps_for_nfe  # noqa: E402
from ats.teacher import TeacherConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
SHIFT = 3.0


def make_flow_checkpoint(path, shift: float = SHIFT, **scheduler_config):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(path)
    diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, **scheduler_config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    return make_flow_checkpoint(tmp_path_factory.mktemp("flow") / "flow-tiny")


# -- the schedule ------------------------------------------------------------------------------

def test_schedule_identities_and_shift():
    ns, plain = RectifiedFlowSchedule(SHIFT), RectifiedFlowSchedule()
    t = torch.linspace(0.01, 0.99, 12, dtype=torch.float64).reshape(3, 4)   # any shape
    alpha, sigma, lam = ns.marginal_coeffs(t)
    assert alpha.shape == t.shape
    torch.testing.assert_close(alpha + sigma, torch.ones_like(t), rtol=0, atol=1e-15)
    torch.testing.assert_close(sigma, SHIFT * t / (1 + (SHIFT - 1) * t))                 # the shift mapping
    torch.testing.assert_close(ns.marginal_alpha(t), alpha)
    torch.testing.assert_close(ns.marginal_std(t), sigma)
    torch.testing.assert_close(lam, torch.log(alpha / sigma))
    torch.testing.assert_close(ns.marginal_lambda(t), lam)
    torch.testing.assert_close(lam, plain.marginal_lambda(t) - math.log(SHIFT))        # a constant offset
    torch.testing.assert_close(plain.marginal_std(t), t)                                # s = 1: sigma = t
    torch.testing.assert_close(plain.marginal_alpha(t), 1 - t)
    torch.testing.assert_close(ns.inverse_lambda(lam), t)
    torch.testing.assert_close(ns.edm_sigma(t), sigma / alpha)
    torch.testing.assert_close(ns.inverse_edm_sigma(sigma / alpha), t)
    torch.testing.assert_close(ns.inverse_model_sigma(sigma), t)
    assert (ns.T, ns.eps, ns.t_min, ns.t_max) == (0.999, 0.001, 0., 0.999)
    assert repr(ns) == "RectifiedFlowSchedule(shift=3.0, N=1000)"
    x = t.clone().requires_grad_(True)                                                  # differentiable in t
    assert torch.autograd.gradcheck(lambda u: ns.marginal_coeffs(u), (x,))
    assert torch.autograd.gradcheck(lambda u: ns.inverse_lambda(u), (lam.detach().clone().requires_grad_(True),))
    for bad, match in ((dict(shift=0.), "shift must be a positive number"), (dict(shift=float("nan")), "shift"),
                       (dict(num_train_timesteps=1), "num_train_timesteps must be an integer >= 2")):
        with pytest.raises(ValueError, match=match):
            RectifiedFlowSchedule(**bad)


def test_schedule_matches_the_scheduler():
    """ats times are what FlowMatchEulerDiscreteScheduler takes as sigmas= before its shift; eps is
    its sigma_min, T its training grid's second point, and time_uniform is its own kind of
    default (uniform before the shift)."""
    ns = RectifiedFlowSchedule(SHIFT)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    grid = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000                       # unshifted training grid
    torch.testing.assert_close(ns.marginal_std(grid), sched.sigmas.double(), rtol=1e-6, atol=0)
    assert ns.marginal_std(torch.tensor(ns.eps)).item() == pytest.approx(sched.sigma_min, rel=1e-6)
    assert ns.marginal_std(torch.tensor(ns.T)).item() == pytest.approx(sched.sigmas[1].item(), rel=1e-6)
    ts = get_timesteps(ns, "time_uniform", 7)
    sched.set_timesteps(sigmas=ts[:-1].tolist())
    torch.testing.assert_close(sched.sigmas[:-1].double(), ns.marginal_std(ts[:-1]), rtol=1e-6, atol=0)
    torch.testing.assert_close(sched.timesteps.double(), 1000 * ns.marginal_std(ts[:-1]), rtol=1e-6, atol=0)


# -- the velocity wrapper and the solvers ------------------------------------------------------

MU = torch.tensor([[0.8, -0.5, 0.3, 1.2]], dtype=torch.float64)
STD = 0.5


class GaussVelocity(torch.nn.Module):
    """The exact rectified-flow velocity v = E[eps - x0 | x_t] of N(MU, STD^2 I) data, called like
    a diffusers network: (x, timestep = sigma * 1000). Counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.gmm, self.calls = GaussianMixture(MU, torch.tensor([STD])), 0

    def forward(self, x, timestep):
        self.calls += 1
        sigma = (timestep / 1000).reshape(-1, 1)
        alpha = 1 - sigma
        x0 = self.gmm(x / alpha, (sigma / alpha).reshape(-1))
        return (x - alpha * x0) / sigma - x0


def exact_flow(ns, x, t0: float, t1: float) -> torch.Tensor:
    """The probability-flow ODE from t0 to t1 for Gaussian data: x - alpha mu scales with the std."""
    (a0, s0, _), (a1, s1, _) = (ns.marginal_coeffs(torch.tensor(t, dtype=torch.float64)) for t in (t0, t1))
    return a1 * MU + torch.sqrt((a1 * STD) ** 2 + s1 ** 2) / torch.sqrt((a0 * STD) ** 2 + s0 ** 2) * (x - a0 * MU)


def test_flow_wrapper_conversion():
    """eps = (x + alpha v) / (alpha + sigma) = x + alpha v; x0 = x - sigma v; the network sees sigma * N."""
    ns = RectifiedFlowSchedule(SHIFT)
    net = GaussVelocity()
    fn = model_wrapper(net, ns, model_type="flow")
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.4, 0.1, 0.02], dtype=torch.float64)
    alpha, sigma, _ = ns.marginal_coeffs(t)
    v = net(x, 1000 * sigma)
    eps = fn(x, t)
    torch.testing.assert_close(eps, x + alpha[:, None] * v)
    torch.testing.assert_close((x - sigma[:, None] * eps) / alpha[:, None], x - sigma[:, None] * v)
    # the same eps as the exact denoiser of the same data wrapped as an EDM model
    torch.testing.assert_close(eps, model_wrapper(net.gmm, ns, model_type="edm")(x, t))


def test_ddim_is_euler_on_the_velocity():
    """For alpha + sigma = 1, DDIM (DPM-Solver-1) and ats's Euler are x_next = x + (sigma_n - sigma) v."""
    ns = RectifiedFlowSchedule(SHIFT)
    net = GaussVelocity()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = torch.tensor([ns.T, 0.7, 0.45, 0.2, 0.05, ns.eps], dtype=torch.float64)
    sig = ns.marginal_std(ts)
    y = x
    for i in range(5):
        y = y + (sig[i + 1] - sig[i]) * net(y, 1000 * sig[i].expand(6))
    for solver in ("ddim", "euler"):
        torch.testing.assert_close(sample(model_wrapper(net, ns, model_type="flow"), ns, x, ts, solver), y,
                                   rtol=0, atol=1e-12)


def test_every_solver_and_discretization_runs_and_converges():
    ns = RectifiedFlowSchedule(SHIFT)
    net = GaussVelocity()
    fn = model_wrapper(net, ns, model_type="flow")
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * ns.marginal_std(
        torch.tensor(ns.T))
    ref = exact_flow(ns, x, ns.T, ns.eps)
    for kind in KINDS:
        for solver in SOLVERS:
            errors = []
            for nfe in (9, 129):
                steps = steps_for_nfe(solver, nfe)
                net.calls = 0
                out = sample(fn, ns, x, get_timesteps(ns, kind, steps, rho=3.), solver)
                assert net.calls == nfe and torch.isfinite(out).all(), (kind, solver)
                errors.append((out - ref).abs().max().item())
            assert errors[1] < min(0.15, 0.5 * errors[0]), (kind, solver, errors)


# -- checkpoints -------------------------------------------------------------------------------

def test_flow_checkpoint_loads_as_a_flow_model(flow_dir, tmp_path):
    unet, ns, model_type = load_unet_checkpoint(flow_dir)
    assert model_type == "flow" and repr(ns) == f"RectifiedFlowSchedule(shift={SHIFT}, N=1000)"
    assert repr(checkpoint_noise_schedule(flow_dir)) == repr(ns)
    source = cifar10_source(flow_dir)
    assert source.info["model_type"] == "flow" and source.model_info()["noise_schedule"] == repr(ns)
    # UniPC / DPM-Solver configs with use_flow_sigmas are flow models too (their shift is flow_shift)
    uni = tmp_path / "uni"
    diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction"
                                      ).save_pretrained(uni)
    assert repr(checkpoint_noise_schedule(uni)) == "RectifiedFlowSchedule(shift=5.0, N=1000)"
    # the DDPM path stays
    ddpm = tmp_path / "ddpm"
    diffusers.DDPMScheduler(beta_end=0.02).save_pretrained(ddpm)
    assert isinstance(checkpoint_noise_schedule(ddpm), NoiseScheduleVP)


def write_scheduler(folder, config: dict):
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("config,match", [
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True},
     "use_dynamic_shifting=True .* is not supported; set use_dynamic_shifting to false and shift"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, "invert_sigmas=True"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": -1.0}, "shift must be a positive number"),
    ({"_class_name": "EDMEulerScheduler"},
     r"scheduler 'EDMEulerScheduler' is not supported; ats reads FlowMatchEulerDiscreteScheduler \(flow .*DDPMScheduler"),
    ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True}, "needs prediction_type 'flow_prediction'"),
    ({"_class_name": "DDPMScheduler", "prediction_type": "flow_prediction"}, "prediction_type 'flow_prediction' is not"),
])
def test_unsupported_scheduler_configs_get_one_line(tmp_path, config, match):
    folder = write_scheduler(tmp_path / "s", config)
    with pytest.raises(ValueError, match=match) as e:
        checkpoint_noise_schedule(folder)
    assert "\n" not in str(e.value) and "scheduler_config.json" in str(e.value)


# -- agreement with diffusers and a fit ----------------------------------------------------------

def test_ats_euler_matches_flow_match_euler_scheduler(flow_dir):
    """The scheduler's own config (shift 3) applies the shift to ats's times; its loop
    x <- x + (sigma_next - sigma) v and ats's DDIM / Euler on the same sigmas agree. The terminal
    sigma is set to ats's end (the scheduler appends 0). diffusers steps in float32."""
    source = cifar10_source(flow_dir)
    ns, unet = source.noise_schedule, source.networks[0]
    ts = get_timesteps(ns, "time_uniform", 6)
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(flow_dir)
    sched.set_timesteps(sigmas=ts[:-1].tolist())
    sched.sigmas[-1] = ns.marginal_std(ts[-1]).item()
    x = source.latents(range(4))                                                 # float64, sigma_T * N(0, I)
    y = x.float()
    with torch.no_grad():
        for t in sched.timesteps:
            y = sched.step(unet(y, t).sample, t, y).prev_sample
        for solver in ("ddim", "euler"):
            out = sample(source.model_fn, ns, x, ts, solver)
            assert (out - x).abs().max() > 0.5, "the sample did not move"
            assert (out - y).abs().max() < 1e-5, solver


def test_ld3_fits_on_a_flow_checkpoint(flow_dir, tmp_path):
    source = cifar10_source(flow_dir)
    result = fit_method("ld3", source, "uni_pc", 4, n_train=6, n_valid=6, cache=tmp_path,
                        teacher=TeacherConfig(nfe=8), options={"epochs": 3, "patience": 1})
    ts = result.timesteps
    assert ts[0] == pytest.approx(source.noise_schedule.T) and ts[-1] == pytest.approx(source.noise_schedule.eps)
    assert (ts.diff() < 0).all() and result.info["noise_schedule"] == repr(source.noise_schedule)
    assert math.isfinite(result.info["best_valid_loss"])
    assert result.info["best_valid_loss"] <= result.info["start_valid_loss"]
