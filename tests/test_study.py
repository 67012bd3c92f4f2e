"""The study specification: shipped studies, round trips, validation messages, overrides."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from ats.models.sources import DATASETS
from ats.study import (Param, Study, StudyError, load_study, shipped_studies, study_from_dict, study_path,
                       write_study)
from ats.teacher import TeacherConfig


def base() -> dict:
    """A small valid study document (the YAML layout)."""
    return {
        "name": "t", "dataset": "gmm", "model": {"preset": "2d"}, "solvers": ["dpm_solver++", "uni_pc"],
        "nfes": [5, 7], "data": {"n_train": 8, "n_valid": 8, "n_eval": 16},
        "baselines": ["edm", "dmn"],
        "methods": {
            "ld3": {"options": {"epochs": 2}, "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}}},
            "oneshot": {"options": {"epochs": 1, "ld3": {"epochs": 1}},
                        "space": {"width": {"type": "int", "low": 8, "high": 32, "log": True},
                                  "ld3.lr": {"type": "uniform", "low": 0.001, "high": 0.01},
                                  "loss": {"type": "choice", "values": ["l2", "pseudo_huber"]}}},
        },
        "trials": 2,
    }


def edited(path: str, value) -> dict:
    """``base()`` with the field at a dotted path set to ``value`` (``...`` deletes it)."""
    doc = base()
    *parents, leaf = path.split("/")
    target = doc
    for part in parents:
        target = target[part]
    if value is ...:
        del target[leaf]
    else:
        target[leaf] = value
    return doc


def error(doc: dict) -> str:
    with pytest.raises(StudyError) as e:
        study_from_dict(doc, origin="my.yaml")
    message = str(e.value)
    assert "\n" not in message and message.startswith("my.yaml: ")
    return message


@pytest.mark.parametrize("dataset", DATASETS)
def test_shipped_studies_load(dataset):
    study = load_study(study_path(dataset))
    assert study.dataset == dataset and study.cells() and study.trials >= 1
    assert study_from_dict(study.to_dict()) == study


@pytest.mark.parametrize("name", ["gmm-per-sample", "digits-per-sample"])
def test_shipped_per_sample_studies_run_the_whole_pipeline(name):
    """The oracle and both predictors trained on the optimum of the training seeds, sharing one
    LD3 start and one optimum (the same nested options in every method)."""
    study = load_study(study_path(name))
    assert name in shipped_studies() and study.name == name
    methods = {m.name: m for m in study.methods}
    assert {"ld3", "oracle", "oneshot", "delta"} <= set(methods)
    one, delta = methods["oneshot"].options, methods["delta"].options
    for options in (one, delta):
        assert options["objective"] == "regression" and options["finetune_epochs"] > 0
        assert options["ld3"] == methods["oracle"].options["ld3"]
    assert one["oracle"] == delta["oracle"]


def test_shipped_gmm_and_digits_build_their_sources():
    for dataset in ("gmm", "digits"):
        study = load_study(study_path(dataset))
        assert study.source().shape


def test_study_path_names_the_file_and_the_flag():
    with pytest.raises(StudyError, match=r"imagenet\.yaml.*--study"):
        study_path("imagenet")


def test_defaults_are_resolved():
    doc = base()
    for key in ("model", "data", "baselines", "trials", "name"):
        del doc[key]
    study = study_from_dict(doc)
    assert study.name == "gmm" and study.model == {"preset": "16d", "dim": None, "components": None, "seed": 0}
    assert study.teacher == TeacherConfig() and study.baselines[-2:] == ("dmn", "gits")
    assert (study.n_train, study.n_valid, study.n_select, study.n_eval) == (50, 50, 2000, 5000)
    assert (study.sampler, study.seed, study.max_failures, study.max_concurrent) == ("tpe", 0, 0, 1)


def test_round_trip_through_a_file(tmp_path):
    study = study_from_dict(base())
    path = write_study(study, tmp_path / "sub" / "study.yaml")
    assert path.exists() and not list(path.parent.glob(".*tmp*"))
    assert load_study(path) == study
    assert yaml.safe_load(path.read_text()) == study.to_dict()
    assert study_from_dict(study.to_dict()) == study


def test_parsed_values():
    study = study_from_dict(base())
    ld3, oneshot = study.methods
    assert ld3.space == (Param("lr", "loguniform", 1e-3, 1e-1),)
    assert oneshot.space[0] == Param("width", "int", 8, 32, log=True)
    assert oneshot.space[2] == Param("loss", "choice", values=("l2", "pseudo_huber"))
    assert study.model == {"preset": "2d", "dim": None, "components": None, "seed": 0}
    assert study.source().name == "gmm-2d-8k-s0"


def test_mixture_of_any_size_and_seed():
    doc = base()
    doc["model"] = {"dim": 5, "components": 3, "seed": 4}
    study = study_from_dict(doc)
    source = study.source()
    assert source.shape == (5,) and source.name == "gmm-5d-3k-s4"
    assert source.info["gmm"].means.shape == (3, 5)
    doc["model"] = {"dim": 0}
    assert "model.dim: must be >= 1, got 0" in error(doc)


def test_yaml_exponent_without_dot(tmp_path):
    """PyYAML reads ``1e-3`` as a string; numeric fields accept it."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base()).replace("0.001", "1e-3"))
    assert "1e-3" in path.read_text()
    assert load_study(path).methods[0].space[0].low == 1e-3


def test_cells_order():
    study = study_from_dict(base())
    assert study.cells() == [("ld3", "dpm_solver++", 5), ("ld3", "dpm_solver++", 7), ("ld3", "uni_pc", 5),
                             ("ld3", "uni_pc", 7), ("oneshot", "dpm_solver++", 5), ("oneshot", "dpm_solver++", 7),
                             ("oneshot", "uni_pc", 5), ("oneshot", "uni_pc", 7)]
    assert study.baseline_cells()[:3] == [("edm", "dpm_solver++", 5), ("edm", "dpm_solver++", 7),
                                          ("edm", "uni_pc", 5)]
    assert len(study.baseline_cells()) == 8


def test_a_method_with_nothing_searched_gets_one_trial_per_cell_and_n_scored_round_trips():
    doc = base()
    doc["nfes"] = [5]
    doc["methods"]["oracle"] = {"options": {"iterations": 3}, "n_scored": 10}
    study = study_from_dict(doc)
    assert study.trial_cells() == [("ld3", "dpm_solver++", 5), ("ld3", "uni_pc", 5), ("oneshot", "dpm_solver++", 5),
                                   ("oneshot", "uni_pc", 5), ("oracle", "dpm_solver++", 5), ("oracle", "uni_pc", 5),
                                   ("ld3", "dpm_solver++", 5), ("ld3", "uni_pc", 5), ("oneshot", "dpm_solver++", 5),
                                   ("oneshot", "uni_pc", 5)]
    assert study.method("oracle").n_scored == 10 and study.method("ld3").n_scored is None
    assert study_from_dict(study.to_dict()) == study


def test_method_options_deep_merge():
    study = study_from_dict(base())
    merged = study.method_options("oneshot", {"width": 16.0, "ld3.lr": 0.005, "loss": "l2"})
    assert merged == {"epochs": 1, "width": 16, "loss": "l2", "ld3": {"epochs": 1, "lr": 0.005}}
    assert isinstance(merged["width"], int)
    assert study.methods[1].options == {"epochs": 1, "ld3": {"epochs": 1}}   # not mutated
    assert study.method_options("ld3", {}) == {"epochs": 2}
    with pytest.raises(StudyError, match="no parameter 'dropout'"):
        study.method_options("ld3", {"dropout": 0.1})
    with pytest.raises(StudyError, match="no method 'delta'"):
        study.method_options("delta", {})


def test_nested_option_created_by_a_dotted_parameter():
    doc = base()
    doc["methods"]["oneshot"] = {"space": {"oracle.restarts": {"type": "int", "low": 0, "high": 3}}}
    study = study_from_dict(doc)
    assert study.method_options("oneshot", {"oracle.restarts": 2}) == {"oracle": {"restarts": 2}}


def test_overrides():
    study = study_from_dict(base())
    new = study.with_overrides(solvers=["uni_pc"], nfes=(3,), trials=5, methods=["oneshot"], n_train=4,
                               n_eval=32, cpus_per_trial=0.5, gpus_per_trial=0.25, max_concurrent=3,
                               sampler="random", seed=7, max_failures=2, model={"preset": "16d"}, n_valid=None)
    assert new.cells() == [("oneshot", "uni_pc", 3)]
    assert (new.trials, new.n_train, new.n_valid, new.n_eval) == (5, 4, 8, 32)
    assert (new.cpus_per_trial, new.gpus_per_trial, new.max_concurrent) == (0.5, 0.25, 3)
    assert (new.sampler, new.seed, new.max_failures) == ("random", 7, 2)
    assert new.model == {"preset": "16d", "dim": None, "components": None, "seed": 0}
    assert study.trials == 2                       # the original is unchanged


def test_overrides_are_validated():
    study = study_from_dict(base())
    with pytest.raises(StudyError, match=r"overrides.*trials: must be >= 1"):
        study.with_overrides(trials=0)
    with pytest.raises(StudyError, match=r"tirals: cannot be overridden \(did you mean 'trials'\?\)"):
        study.with_overrides(tirals=3)
    with pytest.raises(StudyError, match=r"methods: 'delta' is not a method of study t; choose from ld3, oneshot"):
        study.with_overrides(methods=["delta"])
    with pytest.raises(StudyError, match=r"model\.checkpoint: is an option of dataset cifar10, not gmm"):
        study.with_overrides(model={"checkpoint": Path("ckpt")})


def test_cifar10_model_paths():
    doc = edited("dataset", "cifar10")
    doc["model"] = {}
    study = study_from_dict(doc)                   # no checkpoint yet: checked later, by the CLI
    assert study.model == {"checkpoint": None, "inception_weights": None, "fid_reference": None}
    new = study.with_overrides(model={"checkpoint": Path("ckpt"), "fid_reference": "ref.npz"})
    assert new.model["checkpoint"] == "ckpt" and new.model["fid_reference"] == "ref.npz"
    assert study_from_dict(new.to_dict()) == new


def test_digits_guidance():
    doc = edited("dataset", "digits")
    doc["model"] = {"guidance_scale": 2}
    assert study_from_dict(doc).model == {"guidance_scale": 2.0}
    assert study_from_dict(doc).source().num_classes == 10
    doc["model"] = {}
    assert study_from_dict(doc).model == {"guidance_scale": None}


@pytest.mark.parametrize("path, value, expected", [
    # unknown keys, with a suggestion and the allowed ones
    ("nfe", [5], r"my\.yaml: nfe: unknown key \(did you mean 'nfes'\?\); allowed: name, dataset"),
    ("data/n_trian", 3, r"data\.n_trian: unknown key \(did you mean 'n_train'\?\); allowed: n_train, n_valid, n_select, n_eval"),
    ("methods/ld3/opts", {}, r"methods\.ld3\.opts: unknown key \(did you mean 'options'\?\); allowed: options, space, "
                             r"n_scored"),
    ("methods/ld3/n_scored", 0, r"methods\.ld3\.n_scored: must be >= 2, got 0"),
    ("methods/ld3/n_scored", 1.5, r"methods\.ld3\.n_scored: must be an integer >= 2, got 1\.5"),
    ("resources", {"gpus": 1}, r"resources\.gpus: unknown key \(did you mean 'gpus_per_trial'\?\)"),
    ("teacher", {"steps": 20}, r"teacher\.steps: unknown key; allowed: solver, nfe, discretization, order"),
    # wrong types
    ("trials", "many", r"trials: must be an integer >= 1, got 'many'"),
    ("solvers", "uni_pc", r"solvers: must be a non-empty list of names from ddim, euler"),
    ("methods", [], r"methods: must be a non-empty mapping of methods \(ld3, timetuner, oracle, oneshot, delta\)"),
    ("methods/ld3/options/epochs", 2.5, r"methods\.ld3\.options\.epochs: must be an integer, got 2\.5"),
    ("methods/ld3/options/learn_xi", "yes", r"learn_xi: must be true or false"),
    ("methods/ld3/options/lr", "fast", r"methods\.ld3\.options\.lr: must be a number, got 'fast'"),
    # names and values outside their lists
    ("dataset", "mnist", r"dataset: unknown value 'mnist'; choose one of gmm, digits, cifar10"),
    ("solvers", ["uni_pc", "dpm_solver"],
     r"solvers\[1\]: unknown value 'dpm_solver' \(did you mean 'dpm_solver\+\+'\?\)"),
    ("solvers", ["uni_pc", "uni_pc"], r"solvers: lists a name twice"),
    ("baselines", ["edm", "karras"], r"baselines\[1\]: unknown value 'karras'; choose one of time_uniform, logSNR, "
                                     r"time_quadratic, edm, dmn, gits"),
    ("sampler", "grid", r"sampler: unknown value 'grid'; choose one of tpe, random, cmaes, gp, qmc"),
    ("teacher", {"solver": "heun", "nfe": 20},
     r"teacher\.nfe: solver heun cannot spend exactly 20 network calls; use 21"),
    ("teacher", {"discretization": "karras"}, r"teacher\.discretization: unknown value 'karras'"),
    ("order", 4, r"order: solver 'dpm_solver\+\+' supports order 1, 2, 3, got 4"),
    ("methods/ld3/options/loss", "huber", r"options\.loss: unknown value 'huber' \(did you mean 'pseudo_huber'\?\); "
                                          r"choose one of l2, pseudo_huber, lpips"),
    # NFEs a solver cannot spend
    ("nfes", [0], r"nfes\[0\]: must be >= 1, got 0"),
    # methods
    ("methods/dmn", {}, r"methods\.dmn: dmn has nothing to search; list it under baselines"),
    ("methods/ld4", {}, r"methods\.ld4: unknown method \(did you mean 'ld3'\?\); choose from ld3, timetuner, oracle, "
                        r"oneshot, delta"),
    ("methods/ld3/options/seed", 1, r"methods\.ld3\.options\.seed: unknown key; allowed: space, loss, epochs"),
    ("methods/ld3/options/ld3", {}, r"methods\.ld3\.options\.ld3: unknown key"),
    ("methods/oneshot/options/ld3", {"width": 3}, r"methods\.oneshot\.options\.ld3\.width: unknown key; allowed: "
                                                  r"space, loss, epochs"),
    ("methods/oneshot/options/oracle", {"restart": 1},
     r"oneshot\.options\.oracle\.restart: unknown key \(did you mean 'restarts'\?\)"),
    # search spaces
    ("methods/ld3/space/lr", {"type": "normal", "low": 0, "high": 1},
     r"methods\.ld3\.space\.lr\.type: unknown value 'normal'.*; choose one of uniform, loguniform, int, choice"),
    ("methods/ld3/space/lr", {"type": "uniform", "low": 0.1, "high": 0.1},
     r"methods\.ld3\.space\.lr\.low: must be below high \(0\.1\), got 0\.1"),
    ("methods/ld3/space/lr", {"type": "loguniform", "low": 0, "high": 0.1},
     r"methods\.ld3\.space\.lr\.low: must be > 0 for a loguniform parameter, got 0"),
    ("methods/ld3/space/lr", {"type": "uniform", "low": 0.1},
     r"methods\.ld3\.space\.lr\.high: is required for type uniform"),
    ("methods/ld3/space/lr", {"type": "uniform", "low": 0.1, "high": 1, "values": [1]},
     r"methods\.ld3\.space\.lr\.values: unknown key; allowed: type, low, high"),
    ("methods/ld3/space/loss", {"type": "choice", "values": []},
     r"methods\.ld3\.space\.loss\.values: must be a non-empty list"),
    ("methods/ld3/space/loss", {"type": "choice", "values": ["l2", "l1"]},
     r"methods\.ld3\.space\.loss\.values\[1\]: unknown value 'l1'; choose one of l2, pseudo_huber, lpips"),
    ("methods/ld3/space/epochs", {"type": "uniform", "low": 1, "high": 9},
     r"methods\.ld3\.space\.epochs\.type: epochs takes int, not a float; use type int"),
    ("methods/ld3/space/epochs", {"type": "int", "low": 1.5, "high": 9},
     r"methods\.ld3\.space\.epochs\.low: must be an integer"),
    ("methods/ld3/space/epochs", {"type": "int", "low": 0, "high": 9, "log": True},
     r"methods\.ld3\.space\.epochs\.low: must be >= 1 for a log-scaled int parameter"),
    ("methods/ld3/space/lrr", {"type": "uniform", "low": 0, "high": 1},
     r"methods\.ld3\.space\.lrr: 'lrr' is not an option of ld3 \(did you mean 'lr'\?\); options: space, loss"),
    ("methods/ld3/space/ld3.lr", {"type": "uniform", "low": 0, "high": 1},
     r"methods\.ld3\.space\.ld3\.lr: unknown parameter; ld3 has no nested options"),
    ("methods/oneshot/space/oracle.step", {"type": "uniform", "low": 0, "high": 1},
     r"oneshot\.space\.oracle\.step: 'step' is not an option of oracle; options: space, loss, iterations"),
    ("methods/oneshot/space/epochs", {"type": "int", "low": 1, "high": 3},
     r"methods\.oneshot\.space\.epochs: is also fixed under methods\.oneshot\.options; set it in one place"),
    ("methods/oneshot/space/ld3.epochs", {"type": "int", "low": 1, "high": 3}, r"space\.ld3\.epochs: is also fixed"),
    ("methods/ld3/space/lr", 0.01, r"methods\.ld3\.space\.lr: must be a mapping with a type"),
    # resources and counts
    ("resources", {"cpus_per_trial": 0}, r"resources\.cpus_per_trial: must be > 0, got 0"),
    ("resources", {"gpus_per_trial": -0.5}, r"resources\.gpus_per_trial: must be >= 0, got -0\.5"),
    ("resources", {"max_concurrent": 0}, r"resources\.max_concurrent: must be >= 1, got 0"),
    ("trials", 0, r"trials: must be >= 1, got 0"),
    ("max_failures", -1, r"max_failures: must be >= 0, got -1"),
    ("data/n_eval", 1, r"data\.n_eval: must be >= 2, got 1"),
    ("data/n_train", 0, r"data\.n_train: must be >= 1, got 0"),
    # model fields of another dataset
    ("model", {"guidance_scale": 2.0},
     r"model\.guidance_scale: is an option of dataset digits, not gmm; gmm takes: preset"),
    ("model", {"preset": "8d"}, r"model\.preset: unknown value '8d'; choose one of 2d, 16d, 64d"),
    ("name", "my study", r"name: must be a word"),
    ("dataset", ..., r"dataset: is required; choose one of gmm, digits, cifar10"),
])
def test_validation_errors(path, value, expected):
    message = error(edited(path, value))
    assert re.search(expected, message), message


def test_errors_that_depend_on_other_fields():
    doc = edited("solvers", ["heun", "uni_pc"])
    doc["nfes"], doc["baselines"] = [5, 6], []
    assert "my.yaml: nfes[1]: solver heun cannot spend exactly 6 network calls; it can spend 5 or 7" in error(doc)
    doc = edited("solvers", ["ipndm"])
    assert "baselines: dmn supports solvers dpm_solver++, uni_pc, ddim, not ipndm" in error(doc)
    doc = edited("dataset", "digits")
    doc["model"] = {"preset": "16d"}
    assert "model.preset: is an option of dataset gmm, not digits; digits takes: guidance_scale" in error(doc)
    doc = edited("dataset", "cifar10")
    doc["model"] = {}
    doc["methods"]["timetuner"] = {}
    assert "methods.timetuner: timetuner trains on real data" in error(doc)
    doc = edited("nfes", [1, 5])
    doc["methods"]["delta"] = {}
    assert "methods.delta: delta needs at least 2 steps" in error(doc)
    doc = edited("methods/ld3/options/ratio_range", [0.5, 2.0])
    assert "methods.ld3.options.ratio_range: unknown key" in error(doc)
    doc = edited("baselines", ["logSNR", "ays"])
    assert "baselines: ays (Align Your Steps) has reference schedules for Stable Diffusion-family pipelines" \
        in error(doc)


def test_timetuner_options():
    doc = base()
    doc["methods"] = {"timetuner": {"options": {"ratio_range": ["0.5", 2], "n_data": 64, "pool_size": None},
                                    "space": {"discretization": {"type": "choice", "values": ["edm", "logSNR"]}}}}
    study = study_from_dict(doc)
    assert study.methods[0].options == {"ratio_range": [0.5, 2.0], "n_data": 64, "pool_size": None}
    doc["methods"]["timetuner"]["space"] = {"ratio_range": {"type": "choice", "values": [1, 2]}}
    assert "ratio_range is a pair and cannot be searched" in error(doc)
    doc["methods"]["timetuner"]["space"] = {"variant": {"type": "choice", "values": ["bh1", "bh2"]}}
    assert "'variant' is not an option of timetuner" in error(copy.deepcopy(doc))


def test_load_errors(tmp_path):
    with pytest.raises(StudyError, match=r"missing\.yaml: cannot read the study file.*--study"):
        load_study(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(StudyError, match=r"bad\.yaml: not valid YAML") as e:
        load_study(bad)
    assert "\n" not in str(e.value)
    bad.write_text("- a list\n")
    with pytest.raises(StudyError, match=r"bad\.yaml: <top level>: must be a mapping"):
        load_study(bad)


def test_study_is_frozen():
    study = study_from_dict(base())
    assert isinstance(study, Study)
    with pytest.raises(AttributeError):
        study.trials = 3


def test_duplicate_yaml_key_is_refused_with_its_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(base(), sort_keys=False) + "trials: 50\n")
    with pytest.raises(StudyError) as e:
        load_study(path)
    line = len(path.read_text().splitlines())
    assert str(e.value) == f"{path}: line {line}: key 'trials' is given twice in the same mapping; keep one of them"
    nested = tmp_path / "nested.yaml"
    nested.write_text("dataset: gmm\nteacher:\n  nfe: 20\n  solver: uni_pc\n  nfe: 30\n")
    with pytest.raises(StudyError, match=r"nested\.yaml: line 5: key 'nfe' is given twice"):
        load_study(nested)


@pytest.mark.parametrize("path, value, expected", [
    ("data/n_eval", 10**9, r"data\.n_eval: must be at most 10000000 \(the seeds of one split\), got 1000000000"),
    ("data/n_select", 10_000_001, r"data\.n_select: must be at most 10000000"),
    ("data/n_train", 10**12, r"data\.n_train: must be at most 10000000"),
    ("data/n_valid", float("inf"), r"data\.n_valid: must be an integer >= 2, got inf"),
    ("resources", {"cpus_per_trial": float("inf")}, r"resources\.cpus_per_trial: must be a number, got inf"),
    ("resources", {"gpus_per_trial": float("nan")}, r"resources\.gpus_per_trial: must be a number, got nan"),
    ("teacher", {"nfe": float("inf")}, r"teacher\.nfe: must be an integer >= 1, got inf"),
    ("teacher", {"order": float("nan")}, r"teacher\.order: must be an integer >= 1, got nan"),
    ("methods/ld3/space/lr", {"type": "loguniform", "low": 1e-3, "high": float("inf")},
     r"methods\.ld3\.space\.lr\.high: must be a number, got inf"),
    ("methods/ld3/space/lr", {"type": "uniform", "low": float("nan"), "high": 1},
     r"methods\.ld3\.space\.lr\.low: must be a number, got nan"),
    ("methods/ld3/space/epochs", {"type": "int", "low": 1, "high": 2**63},
     r"methods\.ld3\.space\.epochs: the range low\.\.high is too wide to sample; integer bounds"),
    ("methods/ld3/space/epochs", {"type": "int", "low": 1, "high": 10**400},
     r"methods\.ld3\.space\.epochs: the range low\.\.high is too wide"),
    ("methods/ld3/options/lr", float("inf"), r"methods\.ld3\.options\.lr: must be a number, got inf"),
    ("model", {"preset": "2d", "seed": float("nan")}, r"model\.seed: must be"),
])
def test_huge_or_non_finite_values_are_refused(path, value, expected):
    message = error(edited(path, value))
    assert re.search(expected, message), message


def test_nfe_beyond_the_gits_fine_grid_is_refused():
    doc = edited("nfes", [5, 1000])
    doc["baselines"] = ["edm", "gits"]
    assert error(doc) == ("my.yaml: baselines: gits picks its steps from a fine grid of 60 intervals, so it takes "
                          "at most 60 steps, not 1000; lower the NFE; drop gits or the solver")
    doc["nfes"] = [5, 60]
    assert study_from_dict(doc).nfes == (5, 60)


def test_non_finite_yaml_numbers_are_refused_from_a_file(tmp_path):
    path = tmp_path / "inf.yaml"
    text = yaml.safe_dump(base(), sort_keys=False).replace("high: 0.1", "high: .inf")
    assert ".inf" in text
    path.write_text(text)
    with pytest.raises(StudyError, match=r"inf\.yaml: methods\.ld3\.space\.lr\.high: must be a number, got inf"):
        load_study(path)


def test_an_integer_range_on_a_float_option_is_refused():
    doc = edited("methods/ld3/space/lr", {"type": "int", "low": 1, "high": 5})
    assert "methods.ld3.space.lr.type: lr takes float, not an integer; use type uniform or loguniform" in error(doc)
    doc = edited("nfes", [5, 2000])
    assert "nfes[1]: must be at most 1000" in error(doc)
