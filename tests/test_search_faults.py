"""`ats search` and `ats server` under faults, end to end: real `ats` processes, real Ray
instances and clusters on loopback, real MLflow tracking server processes, real study
folders. The study is the tiny 2-d Gaussian mixture one of test_search.py."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port, start_mlflow_server, stop_mlflow_server
from test_search import ATS, env, finished_trials, optuna_states, runs_of, study_folder, tiny_study, wait_for

ORACLE = {"oracle": {"options": {"loss": "lpips", "ld3": {"epochs": 2}}}}   # lpips: no weights here, always raises


def ats(args: list[str], cwd: Path, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(ATS + args, cwd=cwd, env={**env(), **extra}, capture_output=True, text=True,
                          timeout=timeout)


def ray_processes(ray_tmpdir: Path) -> list[int]:
    """Live processes started with this test's Ray temp folder (Ray's head processes and workers)."""
    marker = f"RAY_TMPDIR={ray_tmpdir}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                if (proc / "stat").read_text().split(") ")[-1][0] != "Z":
                    pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def assert_no_orphans(ray_tmpdir: Path) -> None:
    deadline = time.monotonic() + 30
    while ray_processes(ray_tmpdir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(ray_tmpdir), "Ray processes of the search outlived its driver"


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory) -> Path:
    """The working folder of a tiny search that finished (one trial), with its study folder."""
    cwd = tmp_path_factory.mktemp("finished")
    tiny_study(cwd / "tiny.yaml", trials=1, epochs=2)
    res = ats(["search", "--study", "tiny.yaml", "--no-live"], cwd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return cwd


def test_search_without_address_never_joins_the_current_cluster(tmp_path, ray_tmpdir):
    """A Ray cluster started outside the search names itself in Ray's current-cluster file;
    `ats search` without --address still starts a Ray instance of its own."""
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        assert (ray_tmpdir / "ray" / "ray_current_cluster").exists()
        tiny_study(tmp_path / "tiny.yaml", trials=1, epochs=2)
        res = ats(["search", "--study", "tiny.yaml", "--no-live"], tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        nodes = {r["node"] for r in finished_trials(study_folder(tmp_path)).values()}
        assert nodes and cluster.head_node.node_id not in nodes
    finally:
        cluster.shutdown()


def test_resume_refuses_a_folder_others_can_write(finished_study):
    """--resume unpickles Tune's state: a folder, or a file in it, that others can write is refused."""
    folder = study_folder(finished_study)
    pickle = next((folder / "ray" / "trials").glob("*.pkl"))
    for path in (folder, pickle):
        mode = path.stat().st_mode
        path.chmod(mode | 0o002)
        try:
            res = ats(["search", "--resume", str(folder), "--no-live"], finished_study, timeout=120)
        finally:
            path.chmod(mode)
        assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
        assert f"refusing to resume {folder}: {path} is writable by group or others" in res.stderr
        assert f"chmod -R go-w {folder}" in res.stderr and "Traceback" not in res.stderr


def test_resume_of_a_copied_folder_does_not_reopen_the_original_runs(finished_study, tmp_path):
    """A copy of a study folder names the original's MLflow runs: resuming it is refused, and
    the original's finished runs stay finished."""
    folder = study_folder(finished_study)
    copy = finished_study / "runs-copy" / folder.name
    shutil.copytree(folder, copy)
    try:
        res = ats(["search", "--resume", str(copy), "--no-live"], finished_study)
    finally:
        shutil.rmtree(copy.parent)
    assert res.returncode == 1 and f"belong to the study folder {folder}" in res.stderr, res.stderr[-3000:]
    _, _, (parent,), children = runs_of(f"sqlite:///{finished_study / 'mlflow.db'}")
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)


def test_server_on_a_port_in_use_fails(tmp_path):
    """`ats server` on a taken port exits non-zero and says so; off loopback it warns that MLflow
    has no authentication (the port is taken there too, so nothing is served to the network)."""
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as taken:
            taken.bind((host, 0))
            taken.listen()
            port = taken.getsockname()[1]
            res = ats(["server", "--host", host, "--port", str(port), "--backend-store-uri",
                       f"sqlite:///{tmp_path / 'db.sqlite'}"], tmp_path, timeout=60)
        assert res.returncode == 1 and f"cannot serve on {host}:{port}" in res.stderr, res.stderr
        assert "in use" in res.stderr and "MLflow tracking server on" not in res.stdout
        warned = "MLflow has no authentication" in res.stderr and "--app-name basic-auth" in res.stderr
        assert warned == (host != "127.0.0.1"), res.stderr


def test_resources_the_cluster_lacks_fail_before_any_trial(tmp_path, ray_tmpdir):
    """gpus_per_trial 1 on a machine without GPUs: one line and a non-zero exit, at once; no
    study folder, no Ray processes left."""
    tiny_study(tmp_path / "tiny.yaml", resources={"cpus_per_trial": 1, "gpus_per_trial": 1, "max_concurrent": 1})
    started = time.monotonic()
    res = ats(["search", "--study", "tiny.yaml", "--no-live"], tmp_path, timeout=180)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "a trial needs 1 CPUs and 1 GPUs on one node, but the largest node of the Ray cluster has" in res.stderr
    assert "--gpus-per-trial" in res.stderr and "Traceback" not in res.stderr
    assert time.monotonic() - started < 120
    assert not list((tmp_path / "runs").iterdir())
    assert_no_orphans(ray_tmpdir)


def test_a_failure_every_trial_hits_stops_the_search(tmp_path, ray_tmpdir):
    """Every trial of the study raises (after its retry): the search stops with the error and a
    non-zero exit instead of a table of baselines; nothing is left RUNNING, no Ray process left."""
    tiny_study(tmp_path / "tiny.yaml", trials=1, methods=ORACLE)
    res = ats(["search", "--study", "tiny.yaml", "--no-live"], tmp_path)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "every trial failed (1 trials)" in res.stderr and "the last error:" in res.stderr, res.stderr[-3000:]
    assert "(best baseline)" not in res.stdout
    folder = study_folder(tmp_path)
    assert optuna_states(folder) == ["FAIL"]
    _, _, (parent,), children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert parent.info.status == "FAILED" and all(c.info.status != "RUNNING" for c in children)
    assert_no_orphans(ray_tmpdir)


def test_lost_tracking_server_stops_the_search_and_resume_finishes_it(tmp_path, ray_tmpdir):
    """The tracking server dies after the first finished trial: the driver retries for a bounded
    time, then stops non-zero with the resume command, keeping what finished. A new server on
    the same store (another port, given by --tracking-uri) and --resume finish the study, with
    no run or Optuna trial left RUNNING and every trial logged once."""
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    server = start_mlflow_server(root, port, root / "server.log")
    uri = f"http://127.0.0.1:{port}"
    tiny_study(tmp_path / "tiny.yaml", trials=3, epochs=15,
               resources={"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 1})
    log = tmp_path / "search.log"
    proc = subprocess.Popen(ATS + ["search", "--study", "tiny.yaml", "--no-live", "--tracking-uri", uri],
                            cwd=tmp_path, env={**env(), "ATS_TRACKING_RETRY_S": "8"}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "runs").exists() and any((tmp_path / "runs").iterdir())
                 and finished_trials(study_folder(tmp_path)), 240, "a finished trial", proc, log)
        stop_mlflow_server(server, signal.SIGKILL)
        lost = time.monotonic()
        assert proc.wait(180) == 1, log.read_text()[-3000:]
        assert time.monotonic() - lost < 150
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop_mlflow_server(server)
    folder = study_folder(tmp_path)
    out = log.read_text()
    assert "did not answer for 8 s" in out and f"`ats search --resume {folder}`" in out, out[-3000:]
    before = finished_trials(folder)
    assert before and (folder / "state.json").exists()
    assert_no_orphans(ray_tmpdir)

    port = free_port()
    server = start_mlflow_server(root, port, root / "server.log")
    try:
        res = ats(["search", "--resume", str(folder), "--no-live", "--tracking-uri", f"http://127.0.0.1:{port}"],
                  tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        after = finished_trials(folder)
        assert len(after) == 3
        for trial_id, result in before.items():   # not refitted
            assert after[trial_id]["finished_at"] == result["finished_at"]
        _, _, (parent,), children = runs_of(f"http://127.0.0.1:{port}")
        trials = [c for c in children if c.data.tags["ats.kind"] == "trial"]
        assert len(trials) == 3 and len({c.data.tags["ats.key"] for c in trials}) == 3
        assert all(c.info.status == "FINISHED" and "fid_select" in c.data.metrics for c in trials)
        assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
        assert optuna_states(folder) == ["COMPLETE"] * 3
    finally:
        stop_mlflow_server(server)


def test_two_searches_started_together_on_a_new_store_both_finish(tmp_path):
    """Same --out, same brand-new sqlite MLflow store, started at the same moment: two study
    folders, two parent runs, both finished."""
    tiny_study(tmp_path / "tiny.yaml", trials=1, epochs=2)
    procs = [subprocess.Popen(ATS + ["search", "--study", "tiny.yaml", "--no-live"], cwd=tmp_path, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(finished_trials(f) for f in folders)
    _, _, parents, children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents + children)
    assert {r.data.tags["study_dir"] for r in parents} == {str(f) for f in folders}
