"""`ats search` end to end, as a user runs it: real `ats` processes, a real local Ray instance
or a two-node Ray cluster on loopback, Optuna's sqlite storage, MLflow's sqlite store or a
real tracking server. The study is a tiny 2-d Gaussian mixture one (seconds per trial)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import free_port

ATS = [sys.executable, "-m", "ats.cli"]
ROOT = Path(__file__).resolve().parents[1]


def tiny_study(path: Path, trials: int = 2, epochs: int = 3, methods: dict | None = None, **top) -> Path:
    study = {"name": "tiny", "dataset": "gmm", "model": {"preset": "2d"}, "solvers": ["dpm_solver++"],
             "nfes": [4], "teacher": {"solver": "uni_pc", "nfe": 20, "discretization": "edm"},
             "data": {"n_train": 32, "n_valid": 64, "n_select": 96, "n_eval": 128}, "baselines": ["time_uniform", "logSNR"],
             "methods": methods or {"ld3": {"options": {"epochs": epochs},
                                            "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}}}},
             "trials": trials, "sampler": "tpe", "seed": 0,
             "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 2}, "max_failures": 1}
    study.update(top)
    path.write_text(yaml.safe_dump(study))
    return path


def env() -> dict:
    out = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
    out.pop("RAY_ADDRESS", None)
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def ats(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(ATS + args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`ats ...` in its own session, so the driver and the Ray processes it started can be killed together."""
    return subprocess.Popen(ATS + args, cwd=cwd, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def study_folder(cwd: Path) -> Path:
    (folder,) = (cwd / "runs").iterdir()
    return folder


def finished_trials(folder: Path) -> dict[str, dict]:
    """trial id -> its final Tune result, for trials that reported their FID."""
    out = {}
    for path in (folder / "ray" / "trials").glob("*/result.json"):
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if lines and "fid_select" in lines[-1]:
            out[lines[-1]["trial_id"]] = lines[-1]
    return out


def runs_of(uri: str, experiment: str = "tiny"):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("ats.kind") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, exp, parents, children


def optuna_states(folder: Path) -> list[str]:
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return sorted(t.state.name for t in study.trials)


def worker_pids(marker: str, session: int) -> list[int]:
    """Processes of the session ``session`` (an `ats` process from ``start`` and the Ray
    processes it started) whose command line (Ray sets it to the actor's name) contains
    ``marker``; Ray workers of other searches on the machine, or still exiting from an
    earlier test, are not counted."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace") and \
                        os.getsid(int(proc.name)) == session:
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"`ats search` ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f":\n{log.read_text()[-4000:]}" if log else ""))
        time.sleep(0.2)


def test_search_with_the_default_local_tracking_store_and_a_killed_trial(tmp_path):
    """No server: MLflow's local sqlite store. One trial's worker is SIGKILLed mid-fit; Tune
    retries it (max_failures 1) and the study finishes with every run in MLflow."""
    tiny_study(tmp_path / "tiny.yaml", trials=2, epochs=40)
    log = tmp_path / "search.log"
    proc = start(["search", "--study", "tiny.yaml", "--no-live"], tmp_path, log)
    try:
        wait_for(lambda: worker_pids("ImplicitFunc", proc.pid), 180, "a trial started", proc, log)
        time.sleep(1.0)
        victim = worker_pids("ImplicitFunc", proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(300) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert "retrying" in out, out[-3000:]
    assert "ld3" in out and "(best baseline)" in out and "#/experiments/" in out and "best method ld3" in out
    folder = study_folder(tmp_path)
    assert len(finished_trials(folder)) == 2
    assert optuna_states(folder) == ["COMPLETE", "COMPLETE"]

    client, exp, parents, children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    trials = [c for c in children if c.data.tags["ats.kind"] == "trial"]
    baselines = [c for c in children if c.data.tags["ats.kind"] == "baseline"]
    assert len(trials) == 2 and sorted(b.data.tags["method"] for b in baselines) == ["logSNR", "time_uniform"]
    for run in children:
        assert run.info.status == "FINISHED"
        m = run.data.metrics
        assert m["fid_select_low"] <= m["fid_select"] <= m["fid_select_high"] and m["n_select"] == 96
        assert run.data.params["solver"] == "dpm_solver++"
        files = {f.path for f in client.list_artifacts(run.info.run_id, "result")}
        assert {"result/schedule.json", "result/result.pt", "result/schedule.png", "result/fid.json"} <= files
    for run in trials:
        assert run.data.tags["method"] == "ld3" and run.data.tags["nfe"] == "4"
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2  # the loss curve by step
    # only the trial of lowest selection FID is scored on the held-out seeds, with paired changes
    (chosen,) = [r for r in trials if r.data.tags.get("ats.chosen") == "true"]
    assert chosen.data.metrics["fid_select"] == min(r.data.metrics["fid_select"] for r in trials)
    assert {"fid_eval", "fid_eval_low", "fid_eval_high", "vs_best_baseline_pct", "vs_best_baseline_low",
            "vs_best_baseline_high"} <= set(chosen.data.metrics)
    assert all(b.data.metrics["n_eval"] == 128 for b in baselines)
    summary = {f.path for f in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/summary.md", "summary/summary.json", "summary/schedules-dpm_solver++-nfe4.png",
            "summary/samples-dpm_solver++-nfe4.png", "summary/fid-dpm_solver++-nfe4.png", "study.yaml"} <= summary | {
        f.path for f in client.list_artifacts(parent.info.run_id)}
    rows = json.loads((folder / "summary" / "summary.json").read_text())
    ld3 = next(r for r in rows if r["name"] == "ld3")
    assert ld3["n"] == 128 and ld3["fid_low"] <= ld3["fid"] <= ld3["fid_high"]
    assert ld3["vs_best_baseline_low"] <= ld3["vs_best_baseline_pct"] <= ld3["vs_best_baseline_high"]


def test_search_against_a_tracking_server_with_a_failing_method(tmp_path, mlflow_server):
    """Results reach a real tracking server; a method whose every trial raises is retried,
    then recorded as failed in Optuna and MLflow while the rest of the study goes on."""
    methods = {"ld3": {"options": {"epochs": 3}, "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}}},
               "oracle": {"options": {"loss": "lpips", "ld3": {"epochs": 2}}}}  # lpips: no weights here
    tiny_study(tmp_path / "tiny.yaml", trials=1, methods=methods)
    res = ats(["search", "--study", "tiny.yaml", "--no-live", "--tracking-uri", mlflow_server], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILED" in res.stdout
    folder = study_folder(tmp_path)
    assert optuna_states(folder) == ["COMPLETE", "FAIL"]
    client, _, (parent,), children = runs_of(mlflow_server)
    status = {c.data.tags["method"]: c.info.status for c in children if c.data.tags["ats.kind"] == "trial"}
    assert status == {"ld3": "FINISHED", "oracle": "FAILED"}
    failed = next(c for c in children if c.data.tags["method"] == "oracle")
    assert failed.data.tags["ats.error"]
    ld3 = next(c for c in children if c.data.tags["method"] == "ld3")
    local = client.download_artifacts(ld3.info.run_id, "result/schedule.json", str(tmp_path))
    assert len(json.loads(Path(local).read_text())["timesteps"]) == 5


def test_search_resumes_after_the_driver_is_killed(tmp_path):
    """SIGKILL the driver and its Ray processes after a trial finished; `ats search --resume`
    finishes the other trials without rerunning the finished one or duplicating MLflow runs."""
    tiny_study(tmp_path / "tiny.yaml", trials=4, epochs=15, resources={"cpus_per_trial": 1, "gpus_per_trial": 0,
                                                                         "max_concurrent": 1})
    log = tmp_path / "search.log"
    proc = start(["search", "--study", "tiny.yaml", "--no-live"], tmp_path, log)
    try:
        wait_for(lambda: (tmp_path / "runs").exists() and finished_trials(study_folder(tmp_path)), 240,
                 "a finished trial", proc, log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    folder = study_folder(tmp_path)
    time.sleep(1.0)
    before = finished_trials(folder)
    assert 1 <= len(before) < 4
    res = ats(["search", "--resume", str(folder), "--no-live"], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    after = finished_trials(folder)
    assert len(after) == 4
    for trial_id, result in before.items():   # not refitted: the result it finished with before the kill
        assert after[trial_id]["finished_at"] == result["finished_at"]
        assert after[trial_id]["fid_select"] == result["fid_select"]
    client, _, (parent,), children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trials = [c for c in children if c.data.tags["ats.kind"] == "trial"]
    assert len(trials) == 4 and len({c.data.tags["ats.key"] for c in trials}) == 4
    assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"


def test_ctrl_c_stops_the_search_and_resume_finishes_it(tmp_path):
    """SIGINT (Ctrl-C) to the driver: Tune stops, the runs it stopped are marked killed, the
    exit status is 130 and the message says how to resume; --resume then finishes the study."""
    tiny_study(tmp_path / "tiny.yaml", trials=4, epochs=40)
    log = tmp_path / "search.log"
    proc = start(["search", "--study", "tiny.yaml", "--no-live"], tmp_path, log)
    try:
        wait_for(lambda: worker_pids("ImplicitFunc", proc.pid), 180, "a trial started", proc, log)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    folder = study_folder(tmp_path)
    assert f"ats search --resume {folder}" in log.read_text()
    _, _, (parent,), children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert parent.info.status == "KILLED" and all(c.info.status != "RUNNING" for c in children)
    res = ats(["search", "--resume", str(folder), "--no-live"], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert len(finished_trials(folder)) == 4
    _, _, (parent,), children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)


def test_two_runs_of_a_study_reach_the_same_table(tmp_path):
    """4 trials, 2 at a time: the searcher hears of a batch only when all of it has finished,
    so the second run suggests the same trials, chooses the same one and reports the same FIDs,
    whichever trial finishes first."""
    tables = []
    for k in range(2):
        cwd = tmp_path / f"run{k}"
        cwd.mkdir()
        tiny_study(cwd / "tiny.yaml", trials=4, epochs=3)
        res = ats(["search", "--study", "tiny.yaml", "--no-live"], cwd)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        rows = json.loads((study_folder(cwd) / "summary" / "summary.json").read_text())
        params = sorted(json.dumps(r["config"], sort_keys=True) for r in finished_trials(study_folder(cwd)).values())
        tables.append(([(r["name"], r["fid"], r.get("vs_best_baseline_pct")) for r in rows], params))
    assert tables[0] == tables[1]


def test_search_on_a_two_node_ray_cluster(tmp_path, ray_tmpdir):
    """A head and a worker node (one CPU each) on loopback: two concurrent trials land on both.
    The cluster lives in a private Ray temp folder; its current-cluster file goes with it."""
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        tiny_study(tmp_path / "tiny.yaml", trials=2, epochs=30)
        res = ats(["search", "--study", "tiny.yaml", "--no-live", "--address", cluster.address], tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        nodes = {r["node"] for r in finished_trials(study_folder(tmp_path)).values()}
        assert len(nodes) == 2
    finally:
        cluster.shutdown()


def test_unreachable_server_fails_before_any_trial(tmp_path):
    tiny_study(tmp_path / "tiny.yaml")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start_time = time.monotonic()
    res = ats(["search", "--study", "tiny.yaml", "--tracking-uri", uri], tmp_path, timeout=120)
    assert res.returncode != 0 and uri in res.stderr and "not reachable" in res.stderr
    assert time.monotonic() - start_time < 60
    assert not list(tmp_path.glob("runs/*/ray"))


def test_cifar10_without_files_names_every_file(tmp_path):
    res = ats(["search", "--dataset", "cifar10"], tmp_path, timeout=120)
    assert res.returncode == 2
    for needed in ("--checkpoint", "weights-inception-2015-12-05-6726825d.pth", "--fid-reference"):
        assert needed in res.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_study_input_is_one_line_before_anything_runs(tmp_path):
    tiny_study(tmp_path / "tiny.yaml")
    res = ats(["search", "--study", "tiny.yaml", "--methods", "ld4"], tmp_path, timeout=120)
    assert res.returncode == 2 and "ld4" in res.stderr and "ld3" in res.stderr
    res = ats(["search", "--dataset", "digits", "--study", "tiny.yaml"], tmp_path, timeout=120)
    assert res.returncode == 2 and "one of --dataset" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_ats_server_starts_a_tracking_server(tmp_path):
    port = free_port()
    proc = start(["server", "--backend-store-uri", f"sqlite:///{tmp_path / 'db.sqlite'}", "--artifacts-destination",
                  str(tmp_path / "artifacts"), "--port", str(port)], tmp_path, tmp_path / "server.log")
    try:
        from ats.tracking import StudyTracker
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}"), 90, "the server to answer", proc,
                 tmp_path / "server.log")
        tracker = StudyTracker(f"http://127.0.0.1:{port}", "served")
        run_id = tracker.start_parent("p", {"a": 1}, {})
        assert MlflowClient(f"http://127.0.0.1:{port}").get_run(run_id).data.params == {"a": "1"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _answers(uri: str) -> bool:
    from ats.tracking import TrackingError, check_reachable
    try:
        check_reachable(uri, timeout=1)
        return True
    except TrackingError:
        return False


def test_optuna_storages_from_urls_and_journal_files(tmp_path):
    from ats.tune import optuna_storage
    for url in (f"sqlite:///{tmp_path / 'o.db'}", str(tmp_path / "journal.log")):
        study = optuna.create_study(storage=optuna_storage(url), study_name="s")
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        again = optuna.load_study(study_name="s", storage=optuna_storage(url))
        assert len(again.trials) == 2
