"""LD3, the batched oracle and the predictors on the analytic mixture (fast, exact model)."""
import pytest
import torch

from ats.discretize import get_timesteps
from ats.methods.common import FitDiverged
from ats.methods.ld3 import fit_ld3
from ats.methods.oracle import fit_oracle
from ats.methods.predictors import DeltaPredictor, PredictorSampler, fit_predictor
from ats.models.gmm import gmm_source
from ats.params import timesteps_from_logits
from ats.teacher import TeacherConfig, generate_teacher, split_seeds


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    source = gmm_source(dim=8, components=4)
    cache = tmp_path_factory.mktemp("teacher")
    cfg = TeacherConfig(nfe=20)
    train = generate_teacher(source, split_seeds("train", 48), cfg, cache, dtype=torch.float64)
    valid = generate_teacher(source, split_seeds("valid", 32), cfg, cache, dtype=torch.float64)
    return source, train, valid


def test_ld3_improves_on_its_start_and_is_reproducible(setup):
    source, train, valid = setup
    a = fit_ld3(source, train, valid, "dpm_solver++", 4, epochs=25)
    b = fit_ld3(source, train, valid, "dpm_solver++", 4, epochs=25)
    assert torch.equal(a.timesteps, b.timesteps)
    ts = a.timesteps
    assert ts[0] == source.noise_schedule.T and ts[-1] == source.noise_schedule.eps and (ts.diff() < 0).all()
    assert a.info["best_valid_loss"] < 0.95 * a.info["start_valid_loss"]   # it improves on its start
    assert a.info["best_valid_loss"] == pytest.approx(min([a.info["start_valid_loss"]] + a.history["valid_loss"]))
    assert a.cond_timesteps is not None and a.cond_timesteps.shape == ts.shape


def test_ld3_starts_where_asked(setup):
    from ats.discretize import get_timesteps
    source, train, valid = setup
    for kind in ("time_quadratic", "edm"):
        res = fit_ld3(source, train, valid, "dpm_solver++", 4, epochs=0, start=kind)
        expected = get_timesteps(source.noise_schedule, kind, 4, dtype=torch.float64)
        assert torch.allclose(res.timesteps, expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="start must be 'best' or one of"):
        fit_ld3(source, train, valid, "dpm_solver++", 4, epochs=0, start="cosine")


def test_ld3_interrupt_and_divergence_keep_the_best(setup):
    source, train, valid = setup

    def stop(phase, epoch, valid_loss):
        assert phase == "ld3"
        if epoch == 2:
            raise KeyboardInterrupt
    res = fit_ld3(source, train, valid, "uni_pc", 4, epochs=50, progress=stop)
    assert res.info["interrupted"] and (res.timesteps.diff() < 0).all()

    calls = []
    bad = gmm_source(dim=8, components=4)
    inner = bad.model_fn_for
    bad.model_fn_for = lambda labels: (lambda x, t: calls.append(1) or (inner(labels)(x, t) * (float("nan") if len(calls) > 60 else 1.)))
    with pytest.raises(FitDiverged, match="at step") as info:
        fit_ld3(bad, train, valid, "uni_pc", 4, epochs=50)
    assert (info.value.result.timesteps.diff() < 0).all()


def test_oracle_keeps_the_best_iterate_per_sample(setup):
    source, train, _ = setup
    res = fit_oracle(source, train, "dpm_solver++", 4, iterations=30, restarts=1, explore_trials=5)
    start, best = torch.tensor(res.info["start_loss"]), torch.tensor(res.info["loss"])
    assert res.per_sample.shape == (48, 5) and (res.per_sample.diff(dim=1) < 0).all()
    assert (best <= start).all() and best.mean() < 0.8 * start.mean()
    assert torch.equal(res.seeds, train.seeds)
    with pytest.raises(ValueError, match="unknown explore sampler"):
        fit_oracle(source, train, "dpm_solver++", 4, iterations=1, restarts=0, explore_trials=1, explore_sampler="grid")


def test_untrained_predictors_give_their_base_schedules(setup):
    source, train, _ = setup
    base = torch.randn(6, dtype=torch.float64)
    res = fit_predictor("oneshot", source, train, train, "dpm_solver++", 5, base=base, epochs=0)
    sampler = PredictorSampler(res.predictor, source, "dpm_solver++", None)
    ts = sampler.timesteps(train.latents[:4])
    torch.testing.assert_close(ts, timesteps_from_logits(base, source.noise_schedule).expand(4, -1), rtol=1e-5, atol=1e-6)
    delta = DeltaPredictor(source.shape, 5)
    _, times = PredictorSampler(delta, source, "dpm_solver++", None)(train.latents[:3])
    torch.testing.assert_close(times, get_timesteps(source.noise_schedule, "logSNR", 5).expand(3, -1),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["oneshot", "delta"])
@pytest.mark.parametrize("objective", ["end_to_end", "regression"])
def test_predictors_train_and_keep_the_best_checkpoint(setup, kind, objective):
    source, train, valid = setup
    extra = {}
    if objective == "regression":
        extra = dict(oracle_train=fit_oracle(source, train, "dpm_solver++", 4, iterations=10, restarts=0).per_sample,
                     finetune_epochs=2, patience=0)   # the regression phase ends at its first epoch, not the fit
    phases = []
    res = fit_predictor(kind, source, train, valid, "dpm_solver++", 4, objective=objective, epochs=4,
                        batch_size=16, progress=lambda phase, epoch, loss: phases.append(phase), **extra)
    assert res.info["best_valid_loss"] == pytest.approx(min(res.history["valid_loss"]))
    if objective == "regression":   # fine-tuning follows, whenever regression stopped
        assert phases[0] == f"{kind} regression" and phases[-1] == f"{kind} end_to_end"
    else:
        assert len(res.history["train_loss"]) == 4
    out, times = PredictorSampler(res.predictor, source, "dpm_solver++", None)(valid.latents)
    assert torch.isfinite(out).all() and (times.diff(dim=1) < 0).all()


def test_fine_tuning_starts_from_the_best_state_of_the_regression(setup):
    """A regression epoch that makes the validation loss worse is not where fine-tuning starts:
    it starts from the best state (here the start), so its first epoch is an end-to-end epoch
    from the start."""
    source, train, valid = setup
    optimum = fit_oracle(source, train, "dpm_solver++", 4, iterations=10, restarts=0).per_sample
    common = dict(epochs=1, lr=1.0, batch_size=len(train.latents))
    tuned = fit_predictor("oneshot", source, train, valid, "dpm_solver++", 4, objective="regression",
                          oracle_train=optimum, finetune_epochs=1, **common)
    plain = fit_predictor("oneshot", source, train, valid, "dpm_solver++", 4, **common)
    start, after_regression, after_tuning = tuned.history["valid_loss"]
    assert after_regression > start   # the premise: regression at this rate overshoots
    assert after_tuning == pytest.approx(plain.history["valid_loss"][-1], rel=1e-6)


def test_bad_method_input(setup):
    source, train, valid = setup
    with pytest.raises(ValueError, match="unknown predictor"):
        fit_predictor("tree", source, train, valid, "ddim", 3)
    with pytest.raises(ValueError, match="needs the optimum's schedules"):
        fit_predictor("oneshot", source, train, valid, "ddim", 3, objective="regression")
    with pytest.raises(ValueError, match="unknown loss"):
        fit_ld3(source, train, valid, "ddim", 3, loss="l7")
    with pytest.raises(ValueError, match="unknown optimizer"):
        fit_ld3(source, train, valid, "ddim", 3, optimizer="sgd")


def test_auto_width_follows_the_input_and_saved_predictors_reload(setup, tmp_path):
    from ats.methods.results import save_result
    from ats.methods.predictors import OneShotPredictor, auto_width, load_predictor
    assert auto_width((1, 8, 8)) == 16 and auto_width((3, 32, 32)) == 64 and auto_width((4, 64, 64)) == 64
    assert auto_width((16,)) == 16 and auto_width((2,)) == 16 and auto_width((128,)) == 64
    assert OneShotPredictor((1, 8, 8), 5, torch.zeros(6)).config["width"] == 16
    assert OneShotPredictor((1, 8, 8), 5, torch.zeros(6), width=64).config["width"] == 64
    with pytest.raises(ValueError, match="multiple of 8"):
        OneShotPredictor((1, 8, 8), 5, torch.zeros(6), width=12)
    source, train, valid = setup
    for kind in ("oneshot", "delta"):
        res = fit_predictor(kind, source, train, valid, "dpm_solver++", 4, epochs=1, batch_size=16)
        assert res.predictor.config["width"] == auto_width(source.shape)
        saved = torch.load(save_result(res, tmp_path / f"{kind}.pt"), weights_only=False)["predictor"]
        net = load_predictor(saved)
        assert net.config == res.predictor.config
        a, ta = PredictorSampler(res.predictor, source, "dpm_solver++", None)(valid.latents)
        b, tb = PredictorSampler(net, source, "dpm_solver++", None)(valid.latents)
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(tb, ta)
    image = OneShotPredictor((1, 8, 8), 5, torch.randn(6)).eval()
    saved = {"class": "OneShotPredictor", "config": image.config, "state_dict": image.state_dict()}
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(load_predictor(saved)(x), image(x))
    with pytest.raises(ValueError, match="unknown predictor class"):
        load_predictor({"class": "Tree", "config": {}, "state_dict": {}})


@pytest.mark.parametrize("method", ["oneshot", "delta", "oracle"])
def test_ctrl_c_in_the_starting_ld3_fit_returns_ld3s_best_state(tmp_path, method):
    from ats.methods import fit_method

    def stop(phase, step, loss):
        if phase == "ld3" and step == 2:
            raise KeyboardInterrupt
    res = fit_method(method, gmm_source(dim=2), "uni_pc", 4, n_train=8, n_valid=8, cache=tmp_path, progress=stop,
                     options={"ld3": {"epochs": 50}})
    assert res.method == "ld3" and res.info["interrupted"] and res.info["interrupted_in"] == "ld3_start"
    assert res.info["epochs"] == 2 and (res.timesteps.diff() < 0).all()


def test_predictors_start_exactly_at_the_global_schedule_with_its_offsets(setup):
    """Untrained one-shot and delta predictors, and the optimum before its first step, sample as
    LD3 does: its schedule and its conditioning offsets."""
    from ats.methods.common import FitResult
    from ats.methods.results import sample_result
    source, train, valid = setup
    ld3 = fit_ld3(source, train, valid, "uni_pc", 4, epochs=3, xi_lr=0.05)
    assert ld3.cond_timesteps is not None and not torch.equal(ld3.cond_timesteps, ld3.timesteps)
    base, xi = torch.tensor(ld3.info["theta"]), ld3.cond_timesteps - ld3.timesteps
    x = valid.latents
    expected = sample_result(source, ld3, x)[0]
    one = fit_predictor("oneshot", source, train, valid, "uni_pc", 4, base=base, base_xi=xi, epochs=0)
    out, ts = PredictorSampler(one.predictor, source, "uni_pc", None)(x)
    torch.testing.assert_close(ts, ld3.timesteps.expand_as(ts), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert "base_xi" in dict(one.predictor.named_parameters())   # learned on from LD3's when trained end to end
    delta = fit_predictor("delta", source, train, valid, "uni_pc", 4, base=base, base_xi=xi, epochs=0)
    out, times = PredictorSampler(delta.predictor, source, "uni_pc", None)(x)
    torch.testing.assert_close(times, ld3.timesteps.expand_as(times), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    optimum = fit_oracle(source, valid, "uni_pc", 4, init=base, offsets=xi, iterations=0, restarts=0)
    torch.testing.assert_close(sample_result(source, optimum, x)[0], expected, rtol=1e-4, atol=1e-5)
    without = FitResult("ld3", "uni_pc", None, 4, timesteps=ld3.timesteps)   # the offsets matter here
    assert not torch.allclose(sample_result(source, without, x)[0], expected, rtol=1e-4, atol=1e-5)


def test_a_predictor_no_better_than_its_start_falls_back_to_it(tmp_path):
    """Through fit_method: an untrained predictor is the start, so the start is kept (and said
    so); a trained one is kept only with a significant paired gain on the validation seeds."""
    from ats.methods import fit_method
    from ats.models.sources import load_source
    source = load_source("gmm", preset="2d")
    common = dict(n_train=32, n_valid=48, cache=tmp_path)
    same = fit_method("oneshot", source, "uni_pc", 4, options={"epochs": 0, "ld3": {"epochs": 2}}, **common)
    assert same.predictor is None and same.timesteps is not None and same.method == "oneshot"
    assert same.info["vs_start"]["kept"] == "start" and same.info["vs_start"]["pct"] == pytest.approx(0, abs=1e-3)
    ld3 = fit_method("ld3", source, "uni_pc", 4, options={"epochs": 2}, **common)
    torch.testing.assert_close(same.timesteps, ld3.timesteps)
    trained = fit_method("delta", source, "uni_pc", 4, options={"epochs": 5, "ld3": {"epochs": 2}}, **common)
    record = trained.info["vs_start"]
    assert (record["kept"] == "predictor") == (record["high"] < 0 and record["pct"] <= -0.5) and record["n"] == 48
    assert (trained.predictor is not None) == (record["kept"] == "predictor")


def test_a_cell_fits_ld3s_start_and_the_training_optimum_once_for_all_its_trials(tmp_path):
    """The oracle and a regression predictor of one cell share LD3's start and the optimum of the
    training samples (kept in the cache): the second fit reads them and reports no LD3 or
    optimum progress; another seed fits its own."""
    from ats.methods import fit_method
    from ats.models.sources import load_source
    source = load_source("gmm", preset="2d")
    calls: list[str] = []
    common = dict(n_train=16, n_valid=16, cache=tmp_path, progress=lambda phase, step, loss: calls.append(phase))
    shared = {"ld3": {"epochs": 2}, "oracle": {"iterations": 3, "restarts": 0}}
    fit_method("oracle", source, "uni_pc", 4, options={"ld3": shared["ld3"], **shared["oracle"]}, **common)
    assert {"ld3", "descent"} <= set(calls)
    calls.clear()
    fit_method("oneshot", source, "uni_pc", 4, options={**shared, "objective": "regression", "epochs": 1}, **common)
    assert not {"ld3", "descent"} & set(calls) and "oneshot regression" in calls
    assert len(list((tmp_path / "shared").glob("*.pt"))) == 2
    calls.clear()
    fit_method("oracle", source, "uni_pc", 4, seed=1, options={"ld3": shared["ld3"], **shared["oracle"]}, **common)
    assert {"ld3", "descent"} <= set(calls) and len(list((tmp_path / "shared").glob("*.pt"))) == 4


def test_the_fallback_compares_samples_in_the_features_of_the_tables_score():
    """paired_distance: per-sample distances in the FID's features (the digits classifier's),
    which rank samples otherwise than pixel L2; the teacher distance where there is no FID."""
    from ats.metrics import TeacherDistance, fake_features, paired_distance
    from ats.models.sources import load_source
    source = load_source("digits")
    metric = source.make_metric()
    g = torch.Generator().manual_seed(0)
    target = torch.rand((8, *source.shape), generator=g) * 2 - 1
    near, blurred = target + 0.3 * torch.randn(target.shape, generator=g), target * 0.1
    distance = paired_distance(metric, source.images)
    expected = (fake_features(metric, near) - fake_features(metric, target)).norm(dim=1)
    torch.testing.assert_close(distance(near, target), expected)
    pixels = paired_distance(TeacherDistance(), source.images)
    torch.testing.assert_close(pixels(near, target), (near - target).flatten(1).norm(dim=1).double())
    assert (distance(near, target) > 0).all() and not torch.equal(distance(blurred, target).argsort(),
                                                                  pixels(blurred, target).argsort())
