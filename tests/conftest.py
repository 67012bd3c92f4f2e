import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from ats.models import GaussianMixture
from ats.tracking import TrackingError, check_reachable, serve


@pytest.fixture(scope="session")
def gmm() -> GaussianMixture:
    return GaussianMixture.random(4, 5, seed=3, std_range=(0.1, 0.4))


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The models here are small: a second thread adds little and, on a shared 2-core
    machine, can make the suite many times slower. Restored after the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int, log: Path) -> subprocess.Popen:
    """A real tracking server on loopback (SQLite backend and proxied artifacts under ``root``),
    in its own session; returns once it answers."""
    uri = f"http://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(serve(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), port=port),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                     "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 60
    while True:
        try:
            check_reachable(uri, timeout=1)
            return proc
        except TrackingError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_mlflow_server(proc)
                pytest.fail(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)


def stop_mlflow_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """The server and the uvicorn workers it started."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real tracking server on loopback (SQLite backend, proxied artifacts), for the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = start_mlflow_server(root, port, root / "server.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_mlflow_server(proc)


@pytest.fixture
def ray_tmpdir(monkeypatch) -> Path:
    """A private Ray temp folder ($RAY_TMPDIR, inherited by the `ats` processes a test starts):
    Ray's current-cluster file and sessions of a test stay in it, and the test fails if a
    current-cluster file is left behind. Short, for Ray's socket paths."""
    folder = Path(tempfile.mkdtemp(prefix="atsray-", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    yield folder
    left = (folder / "ray" / "ray_current_cluster").exists() or (folder / "ray_current_cluster").exists()
    shutil.rmtree(folder, ignore_errors=True)
    assert not left, "a test left Ray's current-cluster file behind"
