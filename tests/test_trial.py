"""One trial without Ray (ats.trial): every method and baseline on a tiny Gaussian mixture,
scored on validation and evaluation seeds, with a complete result folder."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ats.methods.results import load_result
from ats.study import study_from_dict
from ats.trial import run_trial

STUDY = {"name": "t", "dataset": "gmm", "model": {"preset": "2d"}, "solvers": ["dpm_solver++"], "nfes": [4],
         "teacher": {"solver": "uni_pc", "nfe": 20, "discretization": "edm"},
         "data": {"n_train": 16, "n_valid": 32, "n_select": 40, "n_eval": 48}, "baselines": ["time_uniform", "dmn", "gits"],
         "methods": {"ld3": {"options": {"epochs": 2}}}, "trials": 1, "sampler": "tpe", "seed": 0}

CASES = {"time_uniform": {}, "dmn": {}, "gits": {}, "ld3": {"epochs": 2},
         "timetuner": {"iterations": 3}, "oracle": {"iterations": 3, "restarts": 0, "ld3": {"epochs": 1}},
         "oneshot": {"epochs": 2, "ld3": {"epochs": 1}}, "delta": {"epochs": 2, "ld3": {"epochs": 1}}}


@pytest.mark.parametrize("method", list(CASES))
def test_every_method_gives_a_scored_result_folder(method, tmp_path):
    study = study_from_dict(STUDY)
    steps = []
    scored = run_trial(study, method, "dpm_solver++", 4, CASES[method], tmp_path / "out", tmp_path / "cache",
                       progress=steps.append)
    m = scored.metrics
    for key in ("fid_select", "fid_eval", "l2_select", "l2_eval"):
        assert math.isfinite(m[key]) and m[key] >= 0
    for split, n in (("select", 40), ("eval", 48)):
        assert m[f"fid_{split}_low"] <= m[f"fid_{split}"] <= m[f"fid_{split}_high"] and m[f"n_{split}"] == n
    fids = json.loads((tmp_path / "out" / "fid.json").read_text())
    assert fids["eval"]["seeds"] == "eval:0+48" and len(fids["eval"]["replicates"]) == 200
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"result.pt", "metrics.json", "history.json", "schedule.png"} <= files
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["fid_eval"] == m["fid_eval"]
    loaded = load_result(tmp_path / "out" / "result.pt")
    if method in ("oneshot", "delta"):   # a predictor, or its start where it was no better
        assert loaded.info["vs_start"]["kept"] == ("predictor" if loaded.predictor is not None else "start")
    if loaded.predictor is not None or loaded.tied_to_seeds:   # per-sample schedules of the evaluation seeds
        npz = np.load(tmp_path / "out" / "per_sample.npz")
        assert npz["timesteps"].shape == (48, 5) and npz["seeds"][0] == 20_000_000
        assert (np.diff(npz["timesteps"], axis=1) < 0).all()
    else:
        ts = torch.tensor(json.loads((tmp_path / "out" / "schedule.json").read_text())["timesteps"])
        assert ts.shape == (5,) and torch.equal(ts, loaded.timesteps.to(ts.dtype))
    if method in ("ld3", "oneshot", "delta", "oracle", "timetuner"):
        assert steps and {"phase", "step", "loss"} <= set(steps[-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("method", ["gits", "ld3", "oneshot", "timetuner"])
def test_a_trial_on_cuda_scores_like_on_the_cpu(method, tmp_path):
    study = study_from_dict(STUDY)
    cpu = run_trial(study, method, "dpm_solver++", 4, CASES[method], tmp_path / "cpu", tmp_path / "cache")
    gpu = run_trial(study, method, "dpm_solver++", 4, CASES[method], tmp_path / "gpu", tmp_path / "cache",
                    device="cuda")
    assert load_result(tmp_path / "gpu" / "result.pt").method == method   # saved on the CPU, loads anywhere
    assert gpu.metrics["fid_eval"] == pytest.approx(cpu.metrics["fid_eval"], rel=0.05)


@pytest.mark.parametrize("method", [m for m in CASES if m != "dmn"])   # DMN's bound is for multistep solvers
def test_heun_runs_through_every_method_at_its_network_calls(method, tmp_path):
    """Heun's N steps cost 2N - 1 calls: at NFE 5 every method fits 3 steps, and the result
    says NFE 5 (steps 3), whichever method made it."""
    study = study_from_dict({**STUDY, "solvers": ["heun"], "nfes": [5], "baselines": ["time_uniform"]})
    scored = run_trial(study, method, "heun", 5, CASES[method], tmp_path / "out", tmp_path / "cache")
    loaded = load_result(tmp_path / "out" / "result.pt")
    assert (loaded.steps, loaded.nfe, loaded.order) == (3, 5, 2)
    assert math.isfinite(scored.metrics["fid_eval"])
    if loaded.timesteps is not None:
        data = json.loads((tmp_path / "out" / "schedule.json").read_text())
        assert (data["steps"], data["nfe"], len(data["timesteps"])) == (3, 5, 4)
    else:
        assert np.load(tmp_path / "out" / "per_sample.npz")["timesteps"].shape == (48, 4)


def test_results_written_before_steps_load_with_the_right_nfe(tmp_path):
    """Old files stored ``nfe``: the steps for ld3, the oracle and the predictors, the network
    calls for the others; both load as the same 3 Heun steps (NFE 5)."""
    from ats.evaluate import load_schedule_file
    ts = torch.linspace(1., 1e-3, 4).tolist()
    for method, old_nfe in (("ld3", 3), ("gits", 5), ("time_uniform", 5)):
        path = tmp_path / f"{method}.json"
        path.write_text(json.dumps({"method": method, "solver": "heun", "order": None, "nfe": old_nfe,
                                    "timesteps": ts}))
        loaded = load_schedule_file(path)
        assert (loaded.steps, loaded.nfe, loaded.order) == (3, 5, 2), method
    path.write_text(json.dumps({"method": "gits", "solver": "heun", "nfe": 4, "timesteps": ts}))
    with pytest.raises(ValueError, match="cannot spend exactly 4 network calls"):
        load_schedule_file(path)
