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
from ats.export import MODEL_DIR, ExportError, diffusers_schedule, diffusers_snippet, export_torch
from ats.methods.common import FitResult
from ats.methods.results import save_result
from ats.methods.predictors import DeltaPredictor, OneShotPredictor, PredictorSampler
from ats.models import model_wrapper
from ats.models.digits import load_digits_unet
from ats.models.sources import load_source
from ats.noise import EDMSchedule, RectifiedFlowSchedule
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


def test_edm_snippet_sets_the_sigmas(tmp_path):
    """EDM schedules: the snippet's Karras-ramp positions give EDMEulerScheduler the times."""
    ns = EDMSchedule()
    ts = get_timesteps(ns, "logSNR", 5)
    EDMEulerScheduler().save_pretrained(tmp_path / "scheduler")          # a pipeline folder's layout
    code = diffusers_snippet(diffusers_schedule(FitResult("ld3", "euler", None, 5, timesteps=ts), ns), tmp_path)
    scope = {}
    exec(compile(code, "snippet", "exec"), scope)
    assert torch.allclose(scope["scheduler"].sigmas[:-1].double(), ts, rtol=1e-6)   # float32 in diffusers
    assert len(scope["timesteps"]) == 5


def test_cli_diffusers_end_to_end(tmp_path):
    save_result(FitResult("ld3", "dpm_solver++", 2, 5, timesteps=TIMES), tmp_path / "result.pt")
    out = tmp_path / "schedule.json"
    res = CliRunner().invoke(main, ["export", "--schedule", str(tmp_path / "result.pt"), "--format", "diffusers",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "timesteps = [999, 622, 353, 150, 41]\nscheduler.set_timesteps(timesteps=timesteps)" in res.output
    data = json.loads(out.read_text())
    assert data["timesteps"] == [999, 622, 353, 150, 41] and len(data["sigmas"]) == 6
    assert data["scheduler"]["config"]["final_sigmas_type"] == "sigma_min"
    assert "DPMSolverMultistepScheduler.from_pretrained(MODEL_DIR, subfolder=SUB" in data["snippet"]
    assert f"MODEL_DIR = {MODEL_DIR!r}" in data["snippet"]      # digits has no folder: the placeholder
    assert "sigmas_with_zero = [" in res.output and "no trailing 0" in res.output
    compile(data["snippet"], "snippet", "exec")


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
    kept = FitResult("oneshot", "uni_pc", 3, 5, timesteps=TIMES, info={"vs_start": {"kept": "start"}})
    with pytest.raises(ExportError, match="kept the global schedule it started from .* fallback=false"):
        export_torch(kept, source, tmp_path / "x")   # a predictor no better than its start


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


def test_sigma_lists_state_their_convention(digits):
    """k-diffusion-style lists: N+1 model sigmas ending at the last one (sigma_t / alpha_t for VP,
    the flow sigma for rectified flow), and the same with the end replaced by 0."""
    ns = digits[0].noise_schedule
    export = diffusers_schedule(FitResult("ld3", "dpm_solver++", 2, 5, timesteps=TIMES), ns)
    sigmas = torch.tensor(export["sigmas"], dtype=torch.float64)
    torch.testing.assert_close(sigmas, ns.edm_sigma(TIMES))
    assert export["sigmas_with_zero"] == export["sigmas"][:-1] + [0.0] and len(export["sigmas_with_zero"]) == 6
    assert "no trailing 0" in export["sigmas_convention"] and "first 5 values" in export["sigmas_convention"]
    assert export["init_noise_std"] == pytest.approx(ns.marginal_std(TIMES[0]).item())
    flow = RectifiedFlowSchedule(3.0)
    ts = get_timesteps(flow, "logSNR", 4)
    export = diffusers_schedule(FitResult("ld3", "uni_pc", 3, 4, timesteps=ts), flow)
    torch.testing.assert_close(torch.tensor(export["sigmas"], dtype=torch.float64), 3 * ts / (1 + 2 * ts))
    assert export["sigmas_with_zero"][-1] == 0 and export["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler"
    assert export["timesteps"] == pytest.approx([1000 * s for s in export["sigmas"][:-1]])
    assert any("no diffusers scheduler runs uni_pc" in note for note in export["notes"])


@pytest.fixture(scope="module")
def flow_source(tmp_path_factory):
    from test_flow import make_flow_checkpoint
    from ats.models.diffusers_unet import cifar10_source
    return cifar10_source(make_flow_checkpoint(tmp_path_factory.mktemp("flow") / "flow-tiny"))


# An LD3-like flow schedule (ats times, unshifted), and conditioning offsets (zero at both ends; VP tests
# use them too).
FLOW_TIMES = torch.tensor([0.999, 0.8, 0.55, 0.3, 0.12, 0.001], dtype=torch.float64)
OFFSETS = torch.tensor([0., 0.01, -0.01, 0.02, 0.005, 0.], dtype=torch.float64)


@pytest.mark.parametrize("solver,offsets", [("euler", False), ("ddim", True)])
def test_flow_export_runs_in_flow_match_euler(flow_source, solver, offsets):
    """The exported snippet, executed against the saved flow model folder, samples with
    FlowMatchEulerDiscreteScheduler what ats's Euler / DDIM samples on the same schedule (the
    network called at the LD3 offsets where the result has them)."""
    ns, folder = flow_source.noise_schedule, flow_source.info["checkpoint"]
    cond = FLOW_TIMES + OFFSETS if offsets else None
    export = diffusers_schedule(FitResult("ld3", solver, None, 5, timesteps=FLOW_TIMES, cond_timesteps=cond), ns)
    assert export["scheduler"]["takes"] == "sigmas" and not any("no diffusers" in n for n in export["notes"])
    code = diffusers_snippet(export, folder)
    scope = {}
    exec(compile(code, "snippet", "exec"), scope)
    assert ("model_timesteps" in scope) == offsets and ("model_output_scale" in scope) == offsets
    torch.testing.assert_close(scope["scheduler"].sigmas.double(), ns.marginal_std(FLOW_TIMES), rtol=1e-6, atol=0)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    with torch.no_grad():
        ref = sample(flow_source.model_fn, ns, noise.double() * export["init_noise_std"], FLOW_TIMES, solver,
                     cond_timesteps=cond)
    assert (ref - noise).abs().max() > 0.5
    assert (scope["x"] - ref).abs().max() < 1e-5


def test_cli_exports_a_flow_schedule_with_its_folder(flow_source, tmp_path):
    folder = flow_source.info["checkpoint"]
    save_result(FitResult("ld3", "euler", None, 5, timesteps=FLOW_TIMES,
                          info={"noise_schedule": repr(flow_source.noise_schedule)}), tmp_path / "result.pt")
    res = CliRunner().invoke(main, ["export", "--schedule", str(tmp_path / "result.pt"), "--dataset", "cifar10",
                                    "--checkpoint", folder, "--out", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["noise_schedule"] == "RectifiedFlowSchedule(shift=3.0, N=1000)"
    assert f"MODEL_DIR = {folder!r}" in data["snippet"] and "scheduler.sigmas[-1] = sigmas[-1]" in res.output


@pytest.mark.parametrize("solver,prediction", [("dpm_solver++", "epsilon"), ("euler", "epsilon"),
                                               ("dpm_solver++", "v_prediction"), ("euler", "v_prediction")])
def test_vp_snippet_samples_a_unet_folder(tmp_path, solver, prediction):
    """The VP snippets run on a saved DDPM UNet2DModel folder: DPMSolverMultistepScheduler gives
    ats's DPM-Solver++ samples on the rounded times; EulerDiscreteScheduler (on x / alpha_t) ats's
    Euler on the exact times with the network called where diffusers calls it. A v-prediction
    folder with LD3's offsets: the network at model_timesteps, its output converted for the
    scheduler (model_output_scale, model_sample_weight)."""
    from test_cifar10 import make_checkpoint
    from ats.models.diffusers_unet import cifar10_source
    make_checkpoint(tmp_path / "ddpm", prediction)
    source = cifar10_source(tmp_path / "ddpm")
    cond = TIMES + OFFSETS if prediction == "v_prediction" else None
    export = diffusers_schedule(FitResult("ld3", solver, None, 5, timesteps=TIMES, cond_timesteps=cond),
                                source.noise_schedule, source.info["model_type"])
    assert ("model_sample_weight" in export) == (cond is not None)
    scope = {}
    exec(compile(diffusers_snippet(export, tmp_path / "ddpm"), "snippet", "exec"), scope)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x = noise.double() * export["init_noise_std"]
    with torch.no_grad():
        if solver == "euler":
            called = torch.cat([(scope["timesteps"].to(torch.float64) + 1) / 1000, TIMES[-1:]]) if cond is None \
                else cond
            ref = sample(source.model_fn, source.noise_schedule, x, TIMES, "euler", cond_timesteps=called)
        else:
            rounded = (torch.tensor(export["timesteps"] + [0], dtype=torch.float64) + 1) / 1000
            ref = sample(source.model_fn, source.noise_schedule, x, rounded, "dpm_solver++", order=2,
                         cond_timesteps=cond)
    # the random U-Net's noise predictions send x0 to a few hundred, its v predictions to a few: compare
    # relative to that, float32 steps (measured 2e-7 and 1.4e-6 of the largest value)
    assert (ref - noise).abs().max() > 0.5 and (scope["x"] - ref).abs().max() < 2e-6 * ref.abs().max() + 1e-5
