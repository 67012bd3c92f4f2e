"""`ats export`: exported schedules run in real diffusers scheduler loops on the shipped digits
U-Net and match ``ats.solvers.sample``; predictors run from their exported files without ats.

Tolerances (max |diffusers - ats| over 8 samples, float64 latents around 1, the U-Net itself
float32 on both sides): diffusers keeps sigmas in float32 and casts the sample to float32 in
``step``, so ``timesteps=`` with DPMSolverMultistepScheduler agrees to about 4e-6 (tested at
2e-5). With ``sigmas=`` EulerDiscreteScheduler runs ats's times exactly but calls the network at
training steps it interpolates in log sigma, up to 0.005 steps from ats's t * 1000 - 1: about
3e-5 (tested at 1e-4), and about 5e-6 when ats is called at diffusers' network times (2e-5).
Exported predictors sample in float32 (the digits source's dtype): see the last test.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import DPMSolverMultistepScheduler, EDMEulerScheduler, EulerDiscreteScheduler

from ats.discretize import get_timesteps
from ats.export import ExportError, diffusers_schedule, diffusers_snippet, export_torch
from ats.methods.common import FitResult
from ats.methods.results import save_result
from ats.methods.predictors import DeltaPredictor, OneShotPredictor, PredictorSampler
from ats.models import model_wrapper
from ats.models.digits import load_digits_unet
from ats.models.sources import load_source
from ats.noise import EDMSchedule
from ats.solvers import sample
from ats.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

REPO = Path(__file__).resolve().parent.parent
# An LD3-like learned schedule on the digits model: uneven, ending at t = 1/1000.
TIMES = torch.tensor([1.0, 0.6234, 0.35371, 0.15123, 0.04231, 0.001], dtype=torch.float64)
SCHEDULERS = {"DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
              "EulerDiscreteScheduler": EulerDiscreteScheduler}


@pytest.fixture(scope="module")
def digits():
    source = load_source("digits")
    net = load_digits_unet()
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return source, net, model_wrapper(net, source.noise_schedule), x


def unet(net, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The digits U-Net at diffusers' timestep k (a float64 time for a float64 sample)."""
    return net(x, k.to(torch.float64))


def scheduler_for(export: dict):
    s = export["scheduler"]
    scheduler = SCHEDULERS[s["class"]](beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **s["config"])
    scheduler.set_timesteps(**{s["takes"]: export[s["takes"]]})
    return scheduler


@pytest.mark.parametrize("solver,order", [("dpm_solver++", 2), ("dpm_solver++", 3), ("ddim", None)])
def test_timesteps_match_ats(digits, solver, order):
    source, net, model_fn, x = digits
    export = diffusers_schedule(FitResult("ld3", solver, order, 5, timesteps=TIMES), source.noise_schedule)
    assert export["scheduler"]["class"] == "DPMSolverMultistepScheduler" and export["scheduler"]["takes"] == "timesteps"
    assert export["timesteps"] == [999, 622, 353, 150, 41]
    rounded = (torch.tensor(export["timesteps"] + [0], dtype=torch.float64) + 1) / 1000
    lam = source.noise_schedule.marginal_lambda
    assert export["timesteps_error_lambda"] == pytest.approx((lam(rounded) - lam(TIMES)).abs().max().item())
    assert 0 < export["timesteps_error_lambda"] < 0.01
    scheduler = scheduler_for(export)
    y = x
    with torch.no_grad():
        for k in scheduler.timesteps:
            y = scheduler.step(unet(net, y, k), k, y).prev_sample
        ref = sample(model_fn, source.noise_schedule, x, rounded, solver, order=order)
    assert (ref - x).abs().max() > 1
    assert (y - ref).abs().max() < 2e-5


def test_sigmas_match_ats_exactly_placed(digits):
    source, net, model_fn, x = digits
    ns = source.noise_schedule
    export = diffusers_schedule(FitResult("ld3", "euler", None, 5, timesteps=TIMES), ns)
    assert export["scheduler"]["class"] == "EulerDiscreteScheduler" and export["scheduler"]["takes"] == "sigmas"
    scheduler = scheduler_for(export)
    assert torch.allclose(scheduler.sigmas.double(), ns.edm_sigma(TIMES), rtol=1e-7)   # the times, exactly
    alpha = ns.marginal_alpha(TIMES)
    assert float(scheduler.init_noise_sigma) == pytest.approx(1 / alpha[0].item(), rel=1e-6)
    y = x / alpha[0]                                  # diffusers' Euler works on x / alpha_t
    with torch.no_grad():
        for k in scheduler.timesteps:
            y = scheduler.step(unet(net, scheduler.scale_model_input(y, k), k), k, y).prev_sample
        y = y * alpha[-1]
        ref = sample(model_fn, ns, x, TIMES, "euler")
        called = torch.cat([(scheduler.timesteps.to(torch.float64) + 1) / 1000, TIMES[-1:]])
        ref_called = sample(model_fn, ns, x, TIMES, "euler", cond_timesteps=called)
    assert (ref - x).abs().max() > 1
    assert (y - ref).abs().max() < 1e-4
    assert (y - ref_called).abs().max() < 2e-5


def test_edm_snippet_sets_the_sigmas():
    """EDM schedules: the snippet's Karras-ramp positions give EDMEulerScheduler the times."""
    ns = EDMSchedule()
    ts = get_timesteps(ns, "logSNR", 5)
    code = diffusers_snippet(diffusers_schedule(FitResult("ld3", "euler", None, 5, timesteps=ts), ns))
    scope = {"pipe": type("Pipe", (), {"scheduler": EDMEulerScheduler()})()}
    exec(code, scope)
    assert torch.allclose(scope["scheduler"].sigmas[:-1].double(), ts, rtol=1e-6)   # float32 in diffusers
    assert len(scope["timesteps"]) == 5


def test_cli_diffusers_end_to_end(tmp_path):
    save_result(FitResult("ld3", "dpm_solver++", 2, 5, timesteps=TIMES), tmp_path / "result.pt")
    out = tmp_path / "schedule.json"
    res = CliRunner().invoke(main, ["export", "--schedule", str(tmp_path / "result.pt"), "--format", "diffusers",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "scheduler.set_timesteps(timesteps=[999, 622, 353, 150, 41])" in res.output
    data = json.loads(out.read_text())
    assert data["timesteps"] == [999, 622, 353, 150, 41] and len(data["sigmas"]) == 6
    assert data["scheduler"]["config"]["final_sigmas_type"] == "sigma_min"
    assert "DPMSolverMultistepScheduler.from_config" in data["snippet"]


def predictor_result(kind: str, source) -> FitResult:
    torch.manual_seed(1)
    net = OneShotPredictor(source.shape, 4, torch.zeros(5), source.num_classes) if kind == "oneshot" \
        else DeltaPredictor(source.shape, 4, source.num_classes)
    for p in net.head[-1].parameters():              # a non-trivial head: schedules differ per sample
        torch.nn.init.normal_(p, std=0.3)
    return FitResult(kind, "dpm_solver++", 2, 4, predictor=net.eval(), info={"space": "lambda"})


def test_diffusers_format_refuses_predictor(tmp_path):
    source = load_source("digits")
    save_result(predictor_result("oneshot", source), tmp_path / "result.pt")
    res = CliRunner().invoke(main, ["export", "--schedule", str(tmp_path / "result.pt"), "--format", "diffusers"])
    assert res.exit_code == 2
    message = res.output.strip().splitlines()[-1]
    assert "one schedule for the whole batch" in message and "--format torch" in message
    with pytest.raises(ExportError, match="--format diffusers"):
        export_torch(FitResult("ld3", "uni_pc", 3, 5, timesteps=TIMES), source, tmp_path / "x")


RUN_WITHOUT_ATS = textwrap.dedent("""
    import sys
    repo = sys.argv[1]
    sys.path = [p for p in sys.path if p not in ("", ".", repo)]   # site-packages may live inside repo/.venv
    sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
    import importlib.util
    assert importlib.util.find_spec("ats") is None, "ats is still importable"
    sys.path.insert(0, sys.argv[2])
    import torch
    from ats_predictor import META, sample, schedule
    data = torch.load(sys.argv[3])
    x0, times = sample(data["x"], data["labels"])
    out = {"x0": x0, "times": times}
    if META["method"] == "oneshot":
        out["schedule"] = schedule(data["x"], data["labels"])
    assert "ats" not in sys.modules, "the export imported ats"
    torch.save(out, sys.argv[4])
""")


@pytest.mark.parametrize("kind,guidance", [("oneshot", None), ("delta", 2.0)])
def test_torch_export_runs_without_ats(tmp_path, kind, guidance):
    source = load_source("digits", guidance_scale=guidance)
    result = predictor_result(kind, source)
    save_result(result, tmp_path / "result.pt")
    folder = tmp_path / "export"
    args = ["export", "--schedule", str(tmp_path / "result.pt"), "--format", "torch", "--out", str(folder),
            "--batch", "4"] + ([] if guidance is None else ["--guidance-scale", str(guidance)])
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    seeds = range(100, 107)                            # 7 samples: split into batches of 4 and padded
    x, labels = source.latents(seeds, dtype=source.dtype), source.labels(seeds)
    torch.save({"x": x, "labels": labels}, tmp_path / "in.pt")
    proc = subprocess.run([sys.executable, "-c", RUN_WITHOUT_ATS, str(REPO), str(folder), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        x0, times = PredictorSampler(result.predictor, source, "dpm_solver++", 2)(x, labels)
    assert times.shape == (7, 5) and (times[:, 1:] < times[:, :-1]).all()
    assert (times[:, 1:-1].std(0) > 1e-4).all(), "the schedules should differ per sample"
    # float32 sampling: the traced graph, or the same code on batches of another size, rounds
    # differently; after 4 steps that is up to 1e-4 in x0 (measured 7e-5 to 1e-4), 3e-7 in the times.
    assert (got["times"] - times).abs().max() < 1e-6 and (got["x0"] - x0).abs().max() < 3e-4
    if kind == "oneshot":
        assert torch.allclose(got["schedule"], times, atol=1e-6)


def test_a_heun_schedule_exports_its_network_calls(digits):
    """3 Heun steps are NFE 5: the export says so and keeps the 4 times."""
    source = digits[0]
    export = diffusers_schedule(FitResult("ld3", "heun", None, 3, timesteps=TIMES[[0, 2, 4, 5]]),
                                source.noise_schedule)
    assert (export["nfe"], export["order"], len(export["sigmas"])) == (5, 2, 4)
    assert any("no diffusers scheduler runs heun" in note for note in export["notes"])
