"""The final table of `ats search` (ats.summary) from recorded trial results, without Ray: result
folders as a trial writes them, with fid.json estimates whose changes are known in advance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from ats.cells import Cell
from ats.intervals import FidEstimate
from ats.methods.common import FitResult
from ats.noise import NoiseScheduleVP
from ats.study import study_from_dict
from ats.summary import (TrialRecord, best_trials, print_table, summarize, summary_metrics,
                         summary_rows)
from ats.trial import Scored, write_folder

SOLVER, NFE = "dpm_solver++", 4
STUDY = {"name": "tiny", "dataset": "gmm", "model": {"preset": "2d"}, "solvers": [SOLVER], "nfes": [NFE],
         "teacher": {"solver": "uni_pc", "nfe": 20, "discretization": "edm"},
         "data": {"n_train": 16, "n_valid": 16, "n_select": 96, "n_eval": 128},
         "baselines": ["time_uniform", "logSNR"], "methods": {"ld3": {}, "delta": {}}, "trials": 2}
COMMON = np.random.default_rng(0).standard_normal(200)   # the seed-set noise every schedule shares


def estimate(fid: float, split: str, k: int) -> FidEstimate:
    """A FID on the split's seeds whose replicates share most of their noise with the others'."""
    own = np.random.default_rng(k).standard_normal(200)
    n = {"select": 96, "eval": 128}[split]
    return FidEstimate(fid, n, f"{split}:0+{n}", fid * (1 + 0.03 * COMMON + 0.01 * own))


def result_folder(path: Path, method: str, fids: dict[str, FidEstimate], source, per_sample: bool = False) -> Path:
    """A result folder as ats.trial writes it: a global schedule, or per-sample ones (delta)."""
    ts = torch.linspace(1., 1e-3, NFE + 1).double() ** (1 + 0.1 * len(method))
    result = FitResult(method, SOLVER, None, NFE, timesteps=None if per_sample else ts,
                       per_sample=ts.expand(8, -1).clone() if per_sample else None)
    metrics = {f"fid_{split}": f.fid for split, f in fids.items()} | {"l2_eval": 0.1}
    return write_folder(Scored(result, metrics, torch.randn(8, 2)), source, path, fids)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A finished study folder: the baselines and trials (selection FID, evaluation FID) in
    state.json's layout, the chosen trial of each method evaluated like ``evaluate_folder``."""
    folder = tmp_path_factory.mktemp("study")
    study = study_from_dict(STUDY)
    source = study.source()
    baselines = {}
    # time_uniform has the lower evaluation FID, logSNR the lower selection FID: the reference
    for k, (name, select, fid) in enumerate((("time_uniform", 10., 9.), ("logSNR", 8., 9.5))):
        cell = Cell(name, SOLVER, NFE)
        fids = {"select": estimate(select, "select", k), "eval": estimate(fid, "eval", k)}
        result_folder(cell.baseline_folder(folder), name, fids, source)
        baselines[cell.state_key] = {"fid_select": select, "fid_eval": fid, "l2_eval": 0.2, "run_id": f"run-{name}"}
    trials = []
    for k, (method, select) in enumerate((("ld3", 7.5), ("ld3", 6.), ("ld3", 6.), ("delta", 7.), ("delta", 9.))):
        trial_id = f"t{k}"
        path = result_folder(folder / "trials" / trial_id, method, {"select": estimate(select, "select", 10 + k)},
                             source, per_sample=method == "delta")
        trials.append(TrialRecord(Cell(method, SOLVER, NFE), trial_id, {"lr": 0.01 * (k + 1)}, path))
    chosen = {}
    for cell, trial in best_trials(trials).items():
        fid = {"ld3": 8., "delta": 10.}[cell.method]
        fids = {"select": FidEstimate.from_dict(json.loads((trial.folder / "fid.json").read_text())["select"]),
                "eval": estimate(fid, "eval", 20 + len(chosen))}
        result_folder(trial.folder, cell.method, fids, source, per_sample=cell.method == "delta")
        chosen[cell.key] = {"trial_id": trial.trial_id, "folder": str(trial.folder), "run_id": f"run-{trial.trial_id}",
                            **cell._asdict(), "metrics": {"fid_select": fids["select"].fid, "fid_eval": fid,
                                                          "l2_eval": 0.05}}
    return study, folder, baselines, chosen


class Recorder:
    """A StudyTracker stand-in that keeps what it was asked to log."""

    def __init__(self) -> None:
        self.metrics: dict[str, dict[str, float]] = {}
        self.artifacts: list[tuple[str, Path, str]] = []

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        self.metrics.setdefault(run_id, {}).update(metrics)

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        self.artifacts.append((run_id, Path(local_dir), artifact_path))


def test_cell_spellings_are_the_stored_ones(tmp_path):
    cell = Cell("ld3", SOLVER, NFE)
    assert (cell.key, cell.state_key, cell.baseline_key, cell.label) == (
        "ld3.dpm_solver++.nfe4", "ld3/dpm_solver++/4", "baseline/ld3/dpm_solver++/4", "ld3 dpm_solver++ nfe4")
    assert cell.baseline_folder(tmp_path) == tmp_path / "baselines" / "ld3-dpm_solver++-nfe4"
    assert Cell.from_state_key(cell.state_key) == cell == Cell.of({"method": "ld3", "solver": SOLVER, "nfe": 4, "x": 1})
    assert cell._asdict() == {"method": "ld3", "solver": SOLVER, "nfe": 4}
    assert cell.tags == {"method": "ld3", "solver": SOLVER, "nfe": "4"}


def test_best_trial_per_cell_by_selection_fid(recorded):
    _, _, _, chosen = recorded
    assert {k: e["trial_id"] for k, e in chosen.items()} == {"ld3.dpm_solver++.nfe4": "t1",   # t2 ties: first wins
                                                             "delta.dpm_solver++.nfe4": "t3"}


def test_rows_and_paired_changes_against_the_baseline_chosen_on_selection_seeds(recorded):
    study, folder, baselines, chosen = recorded
    rows = summary_rows(study, folder, baselines, chosen)
    assert [(r.name, r.kind, r.run_id) for r in rows] == [
        ("time_uniform", "baseline", "run-time_uniform"), ("logSNR", "baseline", "run-logSNR"),
        ("ld3", "method", "run-t1"), ("delta", "method", "run-t3")]
    by = {r.name: r for r in rows}
    assert all(r.reference == "logSNR" for r in rows)   # lowest selection FID, not lowest evaluation FID
    assert by["ld3"].vs_baseline.pct == pytest.approx(100 * (8. - 9.5) / 9.5)
    assert by["ld3"].vs_baseline.high < 0 and by["ld3"].vs_baseline.significant
    assert by["time_uniform"].vs_baseline.pct == pytest.approx(100 * (9. - 9.5) / 9.5)
    assert by["delta"].vs_ld3.pct == pytest.approx(25.)
    assert by["ld3"].fid_select == 6. and by["ld3"].l2 == 0.05 and by["ld3"].fid.n == 128
    metrics = summary_metrics(rows)
    assert metrics["fid_eval.ld3.dpm_solver++.nfe4"] == 8.
    assert metrics["vs_best_baseline_pct.ld3.dpm_solver++.nfe4"] == pytest.approx(by["ld3"].vs_baseline.pct)
    assert metrics["vs_ld3_pct.delta.dpm_solver++.nfe4"] == pytest.approx(25.)
    assert not any(k.startswith("vs_") and ".logSNR." in k for k in metrics)
    # a method whose chosen trial is not evaluated yet is left out, and so is its LD3 change
    partial = summary_rows(study, folder, baselines, {k: v for k, v in chosen.items() if k.startswith("delta")})
    assert [r.name for r in partial] == ["time_uniform", "logSNR", "delta"] and partial[-1].vs_ld3.text() == ""


def test_a_predictor_that_fell_back_says_so_in_the_table(recorded):
    study, folder, baselines, chosen = recorded
    fell_back = {k: ({**v, "metrics": {**v["metrics"], "kept_predictor": 0.0}} if k.startswith("delta") else v)
                 for k, v in chosen.items()}
    labels = [r.label for r in summary_rows(study, folder, baselines, fell_back)]
    assert labels[-2:] == ["ld3", "delta (LD3's schedule: the predictor was not better on the validation seeds)"]
    assert [r.label for r in summary_rows(study, folder, baselines, chosen)][-1] == "delta"


def test_summary_files_logs_and_table(recorded):
    study, folder, baselines, chosen = recorded
    tracker = Recorder()
    rows = summarize(study, folder, baselines, chosen, tracker, "parent")
    out = folder / "summary"
    assert {p.name for p in out.iterdir()} >= {"summary.json", "summary.md", f"fid-{SOLVER}-nfe{NFE}.png",
                                               f"schedules-{SOLVER}-nfe{NFE}.png", f"samples-{SOLVER}-nfe{NFE}.png"}
    data = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in data] == ["time_uniform", "logSNR", "ld3", "delta"]
    ld3 = data[2]
    assert ld3["reference"] == "logSNR" and ld3["fid"] == 8. and ld3["n"] == 128 and ld3["seeds"] == "eval:0+128"
    assert ld3["vs_best_baseline_low"] < ld3["vs_best_baseline_pct"] == pytest.approx(-15.789, abs=1e-3)
    assert "vs_best_baseline_pct" not in data[1]   # the reference itself
    md = (out / "summary.md").read_text()
    assert "| logSNR (baseline) | dpm_solver++ | 4 | 9.5 ± " in md and "| ld3 | dpm_solver++ | 4 | 8 ± " in md
    assert "best method ld3" in md and "significantly better than the best baseline" in md
    assert tracker.metrics["run-t1"]["vs_best_baseline_pct"] == pytest.approx(-15.789, abs=1e-3)
    assert set(tracker.metrics) == {"run-t1", "run-t3", "parent"}
    assert tracker.metrics["parent"] == summary_metrics(rows)
    assert tracker.artifacts == [("parent", out, "summary")]

    console = Console(record=True, width=200)
    print_table(console, study, rows, folder, True, "http://mlflow/#/experiments/1/runs")
    text = console.export_text()
    for needed in ("logSNR (baseline)", "vs logSNR (best baseline)", "best method ld3", "ld3 run-t1, delta run-t3",
                   f"ats search --resume {folder}", "MLflow: http://mlflow/#/experiments/1/runs"):
        assert needed in text


def test_noise_schedule_of_a_cifar10_study_without_its_network(tmp_path):
    """Only the checkpoint's scheduler config is read: a folder without the UNet will do."""
    diffusers = pytest.importorskip("diffusers")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.03).save_pretrained(tmp_path)
    study = study_from_dict({**STUDY, "dataset": "cifar10", "model": {"checkpoint": str(tmp_path)},
                             "methods": {"ld3": {}}})
    t = torch.linspace(0.01, 1., 7, dtype=torch.float64)
    expected = NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.03, 1000, dtype=torch.float64))
    torch.testing.assert_close(study.noise_schedule().marginal_lambda(t), expected.marginal_lambda(t))
