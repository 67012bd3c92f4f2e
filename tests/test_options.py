"""Declared options: the method registry's schemas, the one validator, and the CLI that uses it."""
import pytest
from click.testing import CliRunner

from ats.methods import METHODS, SEARCHABLE, FitContext, Method, OptionError, parse_method_options
from ats.methods.ld3 import fit_ld3
from ats.models.sources import DATASETS
from ats.options import Option, declare, parse_options
from ats.cli import main, model_options


def test_every_method_declares_its_options_from_its_fit_function():
    assert SEARCHABLE == ("ld3", "timetuner", "oracle", "oneshot", "delta")
    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.name == name
        assert all(isinstance(o, Option) and o.name == k for k, o in method.options.items())
        assert all(n in METHODS for n in method.nested)
    ld3 = METHODS["ld3"].options
    assert ld3["epochs"].default == 150 and ld3["epochs"].kinds == {"int"}
    assert ld3["xi_lr"].kinds == {"float", "None"} and ld3["start"].choices[0] == "best"
    assert "seed" not in ld3 and "progress" not in ld3 and "init" not in ld3     # inputs, not options
    assert METHODS["oneshot"].nested == ("ld3", "oracle") and "start_samples" in METHODS["oneshot"].options
    assert METHODS["timetuner"].options["ratio_range"].kinds == {"pair"}


def test_a_parameter_that_is_neither_input_nor_option_is_a_declaration_error():
    with pytest.raises(TypeError, match="'train' is neither an input nor an option"):
        declare(fit_ld3, ("source", "valid", "solver", "steps", "order", "seed", "init", "progress"))
    with pytest.raises(TypeError, match="bounds for unknown options"):
        declare(fit_ld3, ("source", "train", "valid", "solver", "steps", "order", "seed", "init", "progress",
                          "calls"), low={"epoch": 1})


@pytest.mark.parametrize("options, message", [
    ({"epochs": "abc"}, "epochs: must be an integer, got 'abc'"),
    ({"epochs": 2.5}, "epochs: must be an integer, got 2.5"),
    ({"epochs": -1}, "epochs: must be >= 0, got -1"),
    ({"lr": float("nan")}, "lr: must be a number, got nan"),
    ({"lr": float("inf")}, "lr: must be a number, got inf"),
    ({"lr": 0}, "lr: must be > 0, got 0.0"),
    ({"loss": "huber"}, "loss: unknown value 'huber' (did you mean 'pseudo_huber'?)"),
    ({"epoch": 3}, "epoch: unknown key (did you mean 'epochs'?)"),
    ({"learn_xi": "yes"}, "learn_xi: must be true or false, got 'yes'"),
])
def test_bad_ld3_options_name_the_option_and_the_fix(options, message):
    with pytest.raises(OptionError) as e:
        parse_method_options("ld3", options, path="")
    assert str(e.value).startswith(message), str(e.value)


def test_nested_options_are_checked_against_their_method():
    assert parse_method_options("oneshot", {"ld3": {"epochs": 3}, "oracle": {"restarts": 0}}) == \
        {"ld3": {"epochs": 3}, "oracle": {"restarts": 0}}
    with pytest.raises(OptionError, match=r"options\.ld3\.epochs: must be an integer, got 'x'"):
        parse_method_options("oneshot", {"ld3": {"epochs": "x"}})
    with pytest.raises(OptionError, match=r"options\.ld3: unknown key"):
        parse_method_options("ld3", {"ld3": {}})


def test_dataset_options_have_defaults_and_bounds():
    gmm = DATASETS["gmm"]
    assert gmm.parse({"dim": 3}) == {"preset": "16d", "dim": 3, "components": None, "seed": 0}
    with pytest.raises(OptionError, match=r"model\.components: must be >= 1, got 0"):
        gmm.parse({"components": 0})
    assert parse_options(DATASETS["digits"].options, {"guidance_scale": 2}, "model") == {"guidance_scale": 2.0}
    assert not DATASETS["cifar10"].has_real_data and DATASETS["digits"].has_real_data


def test_a_method_refuses_what_it_cannot_do():
    assert "needs at least 2 steps" in METHODS["delta"].unsupported(["uni_pc"], [1], True)
    assert "real data" in METHODS["timetuner"].unsupported(["uni_pc"], [4], False)
    assert "dmn supports solvers" in METHODS["dmn"].unsupported(["heun"], [4], True)
    assert METHODS["ld3"].unsupported(["heun"], [1], False) is None


@pytest.mark.parametrize("option, message", [
    ("epochs=abc", "epochs: must be an integer, got 'abc'"),
    ("epochs=2.5", "epochs: must be an integer, got 2.5"),
    ("lr=nan", "lr: must be a number, got 'nan'"),
    ('ld3={"epochs":"x"}', "ld3.epochs: must be an integer, got 'x'"),
    ("epoch=3", "epoch: unknown key (did you mean 'epochs'?)"),
])
def test_ats_fit_checks_options_before_any_work(tmp_path, option, message):
    method = "oneshot" if option.startswith("ld3") else "ld3"
    result = CliRunner().invoke(main, ["fit", "--method", method, "--dataset", "gmm", "--option", option,
                                       "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and f"(method {method})" in result.output
    assert not (tmp_path / "cache").exists()   # refused before any teacher data was made


def test_model_flags_apply_to_their_dataset():
    result = CliRunner().invoke(main, ["compare", "--dataset", "digits", "--checkpoint", "x"])
    assert result.exit_code == 2
    assert "--checkpoint is an option of datasets cifar10, diffusers, not digits" in result.output
    result = CliRunner().invoke(main, ["compare", "--dataset", "gmm", "--dim", "3", "--components", "2",
                                       "--mixture-seed", "5", "--n", "8", "--solvers", "ddim", "--nfe", "4",
                                       "--discretizations", "logSNR"])
    assert result.exit_code == 0, result.output
    assert model_options("gmm", {"--dim": 3, "--mixture-seed": 5}) == {"dim": 3, "seed": 5}


def test_fit_context_hands_out_real_data_only_where_there_is_some():
    from ats.models.sources import load_source
    ctx = FitContext(load_source("gmm", preset="2d"), "ddim", 4, seed=3)
    assert ctx.real_data(5).shape == (5, 2)


def test_a_new_method_is_one_class_and_one_registry_entry(monkeypatch, tmp_path):
    """The README's recipe: a fit function, a Method subclass, an entry in METHODS."""
    import torch

    from ats.discretize import get_timesteps
    from ats.methods import fit_method
    from ats.methods.common import FitResult
    from ats.models.sources import load_source

    def fit_mine(source, train, valid, solver, steps, order=None, lr: float = 1e-3, seed: int = 0) -> FitResult:
        ts = get_timesteps(source.noise_schedule, "logSNR", steps, dtype=train.latents.dtype)
        return FitResult("mine", solver, order, steps, timesteps=ts, info={"lr": lr, "n": len(train.latents)})

    class Mine(Method):
        name = "mine"
        options = declare(fit_mine, ("source", "train", "valid", "solver", "steps", "order", "seed"),
                          positive=("lr",))

        def fit(self, ctx: FitContext, **options) -> FitResult:
            return fit_mine(ctx.source, ctx.train, ctx.valid, ctx.solver, ctx.steps, ctx.order, seed=ctx.seed,
                            **options)

    monkeypatch.setitem(METHODS, "mine", Mine())
    source = load_source("gmm", preset="2d")
    result = fit_method("mine", source, "heun", 5, n_train=4, n_valid=4, cache=tmp_path, options={"lr": 0.5})
    assert (result.steps, result.nfe, result.info["lr"], result.info["n"]) == (3, 5, 0.5, 4)
    assert result.info["source"] == "gmm-2d-8k-s0"
    assert torch.equal(result.timesteps, get_timesteps(source.noise_schedule, "logSNR", 3, dtype=torch.float64))
    with pytest.raises(OptionError, match="lr: must be > 0"):
        fit_method("mine", source, "heun", 5, cache=tmp_path, options={"lr": -1})
