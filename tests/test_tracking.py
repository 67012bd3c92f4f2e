"""The MLflow layer against real stores: a local `mlflow server` process and a SQLite file."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import free_port

from ats.methods.common import FitResult
from ats.methods.results import save_result
from ats.methods.predictors import OneShotPredictor
from ats.noise import NoiseScheduleVP
from ats.intervals import FidEstimate
from ats.plots import plot_fid_intervals, plot_fid_vs_nfe, plot_schedule_spread, plot_schedules
from ats.report import Row, compare
from ats.tracking import (StudyTracker, TrackingError, check_reachable, load_result, resolve_tracking_uri,
                          runs_url)


def _round_trip(uri: str, tmp_path: Path) -> None:
    """A search's layout written by StudyTracker, read back with MLflow's own client, then resumed."""
    params = {"study": "gmm", "method": {"lr": 0.005, "layers": [1, 2]}, "long": "x" * 7000}
    tracker = StudyTracker(uri, "study-a")
    parent = tracker.start_parent("search", params, {"ats.dataset": "gmm"})
    first = tracker.child("ld3/dpm_solver++/5", "ld3 nfe 5", {"lr": 0.005}, {"ats.method": "ld3"})
    second = tracker.child("baseline/logSNR/5", "logSNR nfe 5", {}, {"ats.method": "logSNR"})
    tracker.log_metrics(first, {"fid": 3.5}, step=5)
    tracker.log_metrics(first, {"fid": 2.5}, step=7)
    tracker.log_history(first, {"train_loss": [float(i) for i in range(1500)]})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "schedule.json").write_text('{"nfe": 5}')
    tracker.log_artifacts(first, tmp_path / "out", "result")
    tracker.finish(second)
    tracker.finish(first, "KILLED")

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert {r.info.run_id for r in tracker.children()} == {first, second}
    run = client.get_run(first)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["ats.key"] == "ld3/dpm_solver++/5"
    assert run.data.params == {"lr": "0.005"} and run.info.status == "KILLED"
    assert [(m.step, m.value) for m in client.get_metric_history(first, "fid")] == [(5, 3.5), (7, 2.5)]
    assert len(client.get_metric_history(first, "train_loss")) == 1500
    parent_params = client.get_run(parent).data.params
    assert parent_params["method.layers"] == "[1, 2]" and len(parent_params["long"]) == 6000
    got = client.download_artifacts(first, "result/schedule.json", str(tmp_path))
    assert Path(got).read_text() == '{"nfe": 5}'
    assert runs_url(uri, tracker.experiment_id).endswith(f"/#/experiments/{tracker.experiment_id}/runs")

    resumed = StudyTracker(uri, "study-a")
    assert resumed.experiment_id == tracker.experiment_id
    assert resumed.start_parent("search", params, {"ats.dataset": "gmm"}, run_id=parent) == parent
    assert resumed.child("ld3/dpm_solver++/5", "ld3 nfe 5", {"lr": 0.005}, {"ats.method": "ld3"}) == first
    assert client.get_run(first).info.status == "RUNNING"  # reopened after the kill
    assert len(resumed.children()) == 2
    with pytest.raises(TrackingError, match="other values of lr"):
        resumed.child("ld3/dpm_solver++/5", "ld3 nfe 5", {"lr": 0.1}, {})


def test_tracker_against_a_server(mlflow_server, tmp_path):
    _round_trip(mlflow_server, tmp_path)


def test_tracker_against_the_local_sqlite_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    _round_trip(uri, tmp_path)
    assert "mlflow ui --backend-store-uri" in runs_url(uri, "1")


def test_unreachable_server_and_bad_uris(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"{uri} is not reachable.*ats server"):
        check_reachable(uri, timeout=2)
    assert time.monotonic() - start < 3
    with pytest.raises(TrackingError, match="unsupported"):
        resolve_tracking_uri("./mlruns")
    check_reachable(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert (tmp_path / "new").is_dir()


def test_load_result_round_trip(mlflow_server, tmp_path):
    net = OneShotPredictor((4,), 3, torch.randn(4), width=16)
    torch.nn.init.normal_(net.head[-1].weight)
    results = {"global": FitResult("ld3", "uni_pc", 2, 3, timesteps=torch.linspace(1., 1e-3, 4),
                                   history={"loss": [1., .5]}, info={"theta": [0., 1., 2., 3.]}),
               "oneshot": FitResult("oneshot", "uni_pc", 2, 3, predictor=net)}
    tracker = StudyTracker(mlflow_server, "study-load")
    tracker.start_parent("search", {}, {})
    for name, result in results.items():
        save_result(result, tmp_path / name / "result.pt")
        run_id = tracker.child(name, name, {}, {})
        tracker.log_artifacts(run_id, tmp_path / name, "result")
        loaded = load_result(run_id, mlflow_server)
        assert (loaded.method, loaded.nfe, loaded.history, loaded.info) == (result.method, 3, result.history,
                                                                            result.info)
        if result.predictor is None:
            torch.testing.assert_close(loaded.timesteps, result.timesteps)
        else:
            x = torch.randn(5, 4)
            assert type(loaded.predictor) is OneShotPredictor and not loaded.predictor.training
            torch.testing.assert_close(loaded.predictor(x), net(x))
    with pytest.raises(TrackingError, match="result/result.pt"):
        load_result(tracker.parent_id, mlflow_server)


def test_plots_write_pngs(tmp_path):
    ns = NoiseScheduleVP("linear")
    ts = torch.linspace(1., 1e-3, 6)
    per_sample = (ts + 0.01 * torch.rand(16, 6)).clamp(1e-3, 1.)
    def row(name, nfe, fid, kind="method"):
        return Row(name, "uni_pc", nfe, FidEstimate(fid, 100, "e", fid * (1 + 0.05 * np.random.randn(200))), kind)
    rows = [row("ld3", 3, 20.), row("ld3", 5, 8.), *(row("logSNR", n, f, "baseline") for n, f in ((3, 40.), (5, 12.)))]
    compare([r for r in rows if r.nfe == 5])
    paths = [plot_schedules({"logSNR": ts, "ld3": ts ** 2}, ns, tmp_path / "a.png", title="NFE 5",
                            cond={"ld3": ts ** 2 * 0.9}),
             plot_schedule_spread(per_sample, ns, tmp_path / "b.png", reference=ts),
             plot_fid_vs_nfe(rows, tmp_path / "c.png"),
             plot_fid_intervals([r for r in rows if r.nfe == 5], tmp_path / "d.png")]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png", "d.png"]
