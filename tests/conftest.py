import os
import signal
import socket
import subprocess
import time

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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real tracking server on loopback (SQLite backend, proxied artifacts), for the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(serve(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), port=port),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                check_reachable(uri, timeout=1)
                break
            except TrackingError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the uvicorn workers it started
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
