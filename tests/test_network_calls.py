"""How the solver calls the network: checkpointing (same gradients, fewer kept tensors) and
precision (autocast), and the method options that set both for a whole fit."""
import pytest
import torch
from click.testing import CliRunner

from ats.cli import main
from ats.discretize import get_timesteps
from ats.methods import OptionError, fit_method, parse_method_options
from ats.methods.ld3 import Student
from ats.methods.predictors import DeltaPredictor, OneShotPredictor, PredictorSampler
from ats.models.gmm import gmm_source
from ats.models.sources import load_source
from ats.params import logits_from_timesteps
from ats.solvers import NetworkCalls, sample
from ats.study import StudyError, study_from_dict


@pytest.fixture(scope="module")
def digits():
    source = load_source("digits")
    x = source.latents(list(range(4)), dtype=torch.float32)
    return source, x, 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))


def kept_for_backward(fn):
    """fn() and the bytes of the distinct storages autograd keeps for its backward pass
    (tensors kept inside a checkpoint are the checkpoint's, and not counted)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def ld3_gradients(source, x, target, solver, steps, checkpoint):
    """LD3's loss through the solver; its value, the gradients of theta, xi and the latents,
    and the bytes kept for the backward pass."""
    ns = source.noise_schedule
    student = Student(source, solver, None, calls=NetworkCalls(checkpoint=checkpoint))
    theta = logits_from_timesteps(get_timesteps(ns, "time_uniform", steps), ns).float().requires_grad_(True)
    xi = (1e-3 * torch.randn(steps + 1, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    u = (x / student.sigma_T).clone().requires_grad_(True)
    loss, kept = kept_for_backward(lambda: ((student(theta, xi, u, None) - target) ** 2).mean())
    loss.backward()
    return loss.detach(), (theta.grad, xi.grad, u.grad), kept


@pytest.mark.parametrize("solver, steps", [("uni_pc", 5), ("dpm_solver++", 5), ("heun", 3)])
def test_checkpointing_gives_ld3_the_same_gradients_and_keeps_far_less(digits, solver, steps):
    """Multistep solvers (history of outputs across steps, UniPC's corrector reusing the next
    call) and Heun (two calls a step): the gradients match to float tolerance."""
    source, x, target = digits
    loss, grads, kept = ld3_gradients(source, x, target, solver, steps, checkpoint=False)
    loss_c, grads_c, kept_c = ld3_gradients(source, x, target, solver, steps, checkpoint=True)
    assert torch.equal(loss, loss_c)
    for g, g_c in zip(grads, grads_c):
        assert g.abs().max() > 0 and torch.allclose(g, g_c, rtol=1e-5, atol=1e-7)
    assert kept_c < kept / 20   # only the calls' inputs, outputs and the solver's arithmetic stay


@pytest.mark.parametrize("kind, solver", [("oneshot", "uni_pc"), ("delta", "dpm_solver++")])
def test_checkpointing_gives_a_predictor_the_same_gradients(digits, kind, solver):
    source, x, target = digits
    grads = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        net = OneShotPredictor(source.shape, 4, torch.zeros(5)) if kind == "oneshot" \
            else DeltaPredictor(source.shape, 4)
        torch.nn.init.normal_(net.head[-1].weight, std=0.1)   # a trained-like head: gradients everywhere
        sampler = PredictorSampler(net, source, solver, None, calls=NetworkCalls(checkpoint=checkpoint))
        out, _ = sampler(x)
        ((out - target) ** 2).mean().backward()
        grads.append([p.grad for p in net.parameters()])
    assert any(g.abs().max() > 0 for g in grads[0])
    for g, g_c in zip(*grads):
        assert torch.allclose(g, g_c, rtol=1e-5, atol=1e-8)


def test_precision_runs_the_network_under_autocast_and_the_solver_in_the_sampling_dtype(digits):
    source, x, _ = digits
    ns = source.noise_schedule
    ts = get_timesteps(ns, "time_uniform", 4)
    seen = []

    def model_fn(x, t):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return source.model_fn(x, t)
    with torch.no_grad():
        ref = sample(model_fn, ns, x, ts, "uni_pc")
        low = sample(model_fn, ns, x, ts, "uni_pc", precision="bf16")
    assert seen == [False] * 4 + [torch.bfloat16] * 4
    # bf16 keeps 8 bits of mantissa: close on average (not everywhere: README, Memory and precision)
    assert low.dtype == x.dtype and 0 < (low - ref).abs().mean() < 0.05 * ref.abs().mean()
    with pytest.raises(ValueError, match="^precision fp16 needs a CUDA device; on the CPU use bf16 or fp32$"):
        sample(model_fn, ns, x, ts, "uni_pc", precision="fp16")
    with pytest.raises(ValueError, match="unknown precision 'fp8'; choose one of fp32, bf16, fp16"):
        sample(model_fn, ns, x, ts, "uni_pc", precision="fp8")
    assert len(seen) == 8   # refused before any network call


def test_the_options_are_declared_once_and_set_for_the_whole_fit(tmp_path):
    for method in ("ld3", "oracle", "oneshot", "delta"):
        assert parse_method_options(method, {"checkpoint": True, "precision": "bf16"}) == \
            {"checkpoint": True, "precision": "bf16"}
    with pytest.raises(OptionError, match=r"options.precision: unknown value 'fp8'.*choose one of fp32, bf16, fp16"):
        parse_method_options("ld3", {"precision": "fp8"})
    with pytest.raises(OptionError, match="options.checkpoint: must be true or false, got 'yes'"):
        parse_method_options("oracle", {"checkpoint": "yes"})
    with pytest.raises(OptionError, match="options.ld3.checkpoint: unknown key"):   # once, at the top level
        parse_method_options("oneshot", {"ld3": {"checkpoint": True}})
    with pytest.raises(OptionError, match="options.checkpoint: unknown key"):       # no solver to backpropagate
        parse_method_options("timetuner", {"checkpoint": True})

    # Every phase's network calls run as asked: recomputed in the backward pass (checkpoint)
    # and under autocast (precision), the starting LD3 fit of the oracle and a predictor too.
    source = gmm_source(dim=8, components=4)
    inner = source.model_fn_for
    calls = []

    def model_fn_for(labels):
        fn = inner(labels)

        def spy(x, t):
            calls.append((torch._C._current_graph_task_id() != -1, torch.is_autocast_enabled("cpu")))
            return fn(x, t)
        return spy
    source.model_fn_for = model_fn_for
    runs = {"ld3": {"epochs": 1}, "oracle": {"ld3": {"epochs": 0}, "iterations": 1, "restarts": 0},
            "delta": {"ld3": {"epochs": 0}, "epochs": 1}}
    for method, options in runs.items():
        results = []
        for extra in ({}, {"checkpoint": True, "precision": "bf16"}):
            calls.clear()
            results.append(fit_method(method, source, "dpm_solver++", 4, n_train=8, n_valid=8, cache=tmp_path,
                                      options={**options, **extra}))
            in_backward = [b for b, _ in calls]
            autocast = {a for _, a in calls}
            assert (any(in_backward), autocast) == ((False, {False}) if not extra else (True, {True})), method
        plain, checkpointed = results    # float64 mixture: autocast changes nothing, checkpointing neither
        a, b = (r.timesteps if r.timesteps is not None else r.per_sample if r.per_sample is not None
                else torch.cat([p.flatten() for p in r.predictor.parameters()]) for r in results)
        assert torch.allclose(a, b, rtol=1e-9, atol=0), method


def test_study_files_and_ats_fit_take_the_options(tmp_path):
    doc = {"name": "t", "dataset": "gmm", "model": {"preset": "2d"}, "solvers": ["uni_pc"], "nfes": [4],
           "methods": {"oracle": {"options": {"checkpoint": True, "precision": "bf16", "ld3": {"epochs": 1}}}}}
    assert study_from_dict(doc).method("oracle").options["checkpoint"] is True
    doc["methods"]["oracle"]["space"] = {"ld3.precision": {"type": "choice", "values": ["fp32", "bf16"]}}
    with pytest.raises(StudyError, match="methods.oracle.space.ld3.precision: 'precision' is not an option of ld3"):
        study_from_dict(doc)
    doc["methods"]["oracle"] = {"options": {"checkpoint": True},
                                "space": {"precision": {"type": "choice", "values": ["fp32", "fp16"]}}}
    with pytest.raises(StudyError, match=r"methods.oracle.space.precision: fp16 needs CUDA and this study's trials "
                                         r"get no GPU \(resources.gpus_per_trial is 0\); use bf16 or fp32"):
        study_from_dict(doc)
    assert study_from_dict({**doc, "resources": {"gpus_per_trial": 1}}).method("oracle").space[0].values == \
        ("fp32", "fp16")

    args = ["fit", "--method", "ld3", "--dataset", "gmm", "--preset", "2d", "--solver", "uni_pc", "--nfe", "4",
            "--n-train", "8", "--n-valid", "8", "--n-eval", "16", "--cache", str(tmp_path / "cache")]
    bad = CliRunner().invoke(main, args + ["--option", "precision=fp64", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "precision: unknown value 'fp64'" in " ".join(bad.output.split())
    cpu = CliRunner().invoke(main, args + ["--option", "precision=fp16", "--out", str(tmp_path / "cpu")])
    assert cpu.exit_code == 2 and "precision fp16 needs a CUDA device" in " ".join(cpu.output.split())
    assert not (tmp_path / "cache").exists()   # both refused before any teacher data was made
    good = CliRunner().invoke(main, args + ["--option", "epochs=1", "--option", "checkpoint=true",
                                            "--option", "precision=bf16", "--out", str(tmp_path / "good")])
    assert good.exit_code == 0, good.output
    assert (tmp_path / "good" / "schedule.json").is_file()
