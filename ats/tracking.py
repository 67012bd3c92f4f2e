"""The MLflow layout of a study: one experiment per study, one parent run per ``ats search``,
one child run per trial and per baseline (tag ``mlflow.parentRunId``).

Only the driver process writes (one writer): SQLite does not take many concurrent writers,
and a tracking server (``ats server``) serves runs to a cluster. The default store is a local
SQLite database, ``./mlflow.db``, as in MLflow 3; no server is needed for it.
"""
from __future__ import annotations

import fcntl
import http.client
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import unquote, urlparse

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH,
                                     MAX_TAG_VAL_LENGTH)

if TYPE_CHECKING:
    from .methods.common import FitResult
    from .study import Study

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the MLflow 3 UI shows model training, not GenAI
PARENT_TAG = "mlflow.parentRunId"
KEY_TAG = "ats.key"
RESULT_ARTIFACT = "result/result.pt"
STUDY_ARTIFACT = "study.yaml"   # the resolved study, on a search's parent run
STATUSES = ("FINISHED", "FAILED", "KILLED")
RETRY_ENV = "ATS_TRACKING_RETRY_S"   # how long the driver retries a tracking server that stopped answering
RETRY_S = 120.0


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and the fix."""


class TrackingLost(TrackingError):
    """The tracking server stopped answering for longer than the retry time."""


def resolve_tracking_uri(uri: str | None) -> str:
    """None: $MLFLOW_TRACKING_URI if set, else a SQLite database ``mlflow.db`` in the working
    directory (absolute URI); ``http(s)://``, ``sqlite:///`` and ``postgresql://`` URIs pass through."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    if uri.startswith(("http://", "https://", "sqlite:///")) or urlparse(uri).scheme.startswith("postgresql"):
        return uri
    raise TrackingError(f"unsupported MLflow tracking URI {uri!r}; give http(s)://host:port (a tracking server), "
                        "sqlite:///path/to/mlflow.db or postgresql://user@host/db, or leave out --tracking-uri "
                        "to use a local sqlite database")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail early and clearly: a server must answer ``/health``, a SQLite database's folder
    must exist or be creatable, a PostgreSQL host must accept connections."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                body = response.read(16).decode(errors="replace").strip()
            if body != "OK":
                raise OSError(f"/health answered {body!r}, not 'OK'")
        except (OSError, ValueError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise TrackingError(f"MLflow tracking server at {uri} is not reachable ({reason}); start one with "
                                "`ats server` or leave out --tracking-uri to use a local sqlite database") from e
    elif scheme == "sqlite":
        folder = Path(unquote(uri[len("sqlite:///"):].split("?")[0])).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create the folder {folder} of the MLflow database {uri} ({e}); "
                                "give a writable sqlite:/// path") from e
    elif scheme.startswith("postgresql"):
        parsed = urlparse(uri)
        try:
            socket.create_connection((parsed.hostname or "localhost", parsed.port or 5432), timeout=timeout).close()
        except OSError as e:
            raise TrackingError(f"PostgreSQL server of {parsed.hostname}:{parsed.port or 5432} for MLflow "
                                f"is not reachable ({e}); start it or give another --tracking-uri") from e
    else:
        resolve_tracking_uri(uri)


def runs_url(uri: str, experiment_id: str) -> str:
    """Where to see the experiment's runs table (the MLflow 3 UI opens experiments in another view)."""
    page = f"/#/experiments/{experiment_id}/runs"
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/") + page
    return f"{shlex.quote(mlflow_command())} ui --backend-store-uri {shlex.quote(uri)}  then open http://127.0.0.1:5000{page}"


def mlflow_command() -> str:
    """The ``mlflow`` executable beside this Python (a virtual environment's, runnable without
    activating it), else plain ``mlflow``."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.exists() and shutil.which("mlflow") != str(beside) else "mlflow"


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts to dotted keys, values as strings cut to MLflow's length limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:MAX_PARAM_VAL_LENGTH]
    return out


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def log_run_metrics(run_id: str, tracking_uri: str | None, metrics: dict[str, float]) -> None:
    """Metrics on an existing run (``ats evaluate``), names cleaned as ``StudyTracker`` cleans them."""
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    now = int(time.time() * 1000)
    items = [Metric(_metric_name(k), float(v), now, 0) for k, v in metrics.items()]
    client = MlflowClient(tracking_uri=uri)
    for chunk in _chunks(items, 1000):
        client.log_batch(run_id, metrics=chunk)


def retry_seconds() -> float:
    """How long a call to a tracking server that stopped answering is retried (``$ATS_TRACKING_RETRY_S``)."""
    return float(os.environ.get(RETRY_ENV) or RETRY_S)


class RetryingClient:
    """An ``MlflowClient`` whose calls are retried while the tracking server does not answer,
    for up to ``seconds``; then ``TrackingLost``. Errors of a server that answers pass through."""

    def __init__(self, client: MlflowClient, uri: str, seconds: float) -> None:
        self.client, self.uri, self.seconds = client, uri, seconds

    def __getattr__(self, name: str) -> Callable:
        call = getattr(self.client, name)
        return lambda *args, **kwargs: self._retry(call, args, kwargs)

    def _retry(self, call: Callable, args: tuple, kwargs: dict) -> Any:
        deadline = time.monotonic() + self.seconds
        while True:
            try:
                return call(*args, **kwargs)
            except (MlflowException, OSError) as e:
                if not self._lost():
                    raise
                if time.monotonic() > deadline:
                    raise TrackingLost(f"MLflow tracking server at {self.uri} did not answer for "
                                       f"{self.seconds:.0f} s ({str(e).splitlines()[0][:200]})") from e
                time.sleep(1.0)

    def _lost(self) -> bool:
        try:
            check_reachable(self.uri, timeout=5.0)
            return False
        except TrackingError:
            return True


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """For a SQLite store, an exclusive lock beside the database while the first process
    creates its schema and experiments (two searches on a brand-new database); else nothing."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(unquote(uri[len("sqlite:///"):].split("?")[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class StudyTracker:
    """One experiment per study (tag ``mlflow.experimentKind=custom_model_development`` so the
    MLflow 3 UI shows it as model training, not GenAI), one parent run per ``ats search``, one
    child run per trial and per baseline (tag ``mlflow.parentRunId``). Only the driver process
    uses it (one writer). Runs may be resumed: reopening a run keeps its params and logs
    only new ones."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None) -> None:
        check_reachable(uri)
        self.uri = uri
        self.parent_id: str | None = None
        with store_lock(uri):   # the client creates a new database's schema
            self.client = RetryingClient(MlflowClient(tracking_uri=uri), uri, retry_seconds())
            self._open_experiment(experiment, artifact_location)

    def _open_experiment(self, experiment: str, artifact_location: str | None) -> None:
        """The study's experiment, created if missing (another search may create it at the same moment)."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                return
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self.client.get_experiment_by_name(experiment)
        if found.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment {experiment!r} at {self.uri} is deleted; restore it with "
                                f"`mlflow experiments restore --experiment-id {found.experiment_id}` "
                                "or choose another study name")
        self.experiment_id = found.experiment_id
        if EXPERIMENT_KIND_TAG not in found.tags:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def start_parent(self, name: str, params: dict, tags: dict, run_id: str | None = None) -> str:
        """Create the search's parent run, or reopen ``run_id`` (resume); returns its id."""
        if run_id is None:
            run_id = self._create(name, tags)
        else:
            run = self.run(run_id)
            if run.info.experiment_id != self.experiment_id:
                raise TrackingError(f"run {run_id} at {self.uri} belongs to experiment {run.info.experiment_id}, "
                                    f"not {self.experiment_id}; resume with the study it was started with")
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        self.parent_id = run_id
        self._log(run_id, params, tags)
        return run_id

    def run(self, run_id: str):
        """The run ``run_id`` (``mlflow.entities.Run``); TrackingError if this store does not hold it."""
        try:
            return self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise TrackingError(f"no run {run_id} at {self.uri}; resume with the tracking store the study was "
                                "started with (--tracking-uri)") from e

    def child(self, key: str, name: str, params: dict, tags: dict) -> str:
        """The parent's child run tagged ``ats.key = key``: reused if it exists (reopened if it
        was left killed or failed; a finished one keeps its status), created otherwise;
        returns its id."""
        if self.parent_id is None:
            raise RuntimeError("start_parent() comes before child()")
        tags = {**tags, KEY_TAG: key, PARENT_TAG: self.parent_id}
        existing = [r for r in self.children() if r.data.tags.get(KEY_TAG) == key]
        if existing:
            run_id = existing[0].info.run_id
            if existing[0].info.status in ("KILLED", "FAILED", "SCHEDULED"):
                self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self._create(name, tags)
        self._log(run_id, params, tags)
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        """Metrics at ``step``; characters MLflow refuses in names (e.g. the '+' of dpm_solver++)
        become 'p'."""
        now = int(time.time() * 1000)
        self._log_metrics(run_id, [Metric(_metric_name(k), float(v), now, step or 0) for k, v in metrics.items()])

    def log_history(self, run_id: str, history: dict[str, list[float]]) -> None:
        """Loss curves: one metric per key, the step is the index."""
        now = int(time.time() * 1000)
        self._log_metrics(run_id, [Metric(_metric_name(k), float(v), now, i) for k, vs in history.items()
                                   for i, v in enumerate(vs)])

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        if status not in STATUSES:
            raise ValueError(f"run status must be one of {', '.join(STATUSES)}, got {status!r}")
        self.client.set_terminated(run_id, status)

    def end_running(self, status: str = "KILLED") -> None:
        """Mark the parent's child runs still RUNNING (left by a search that died) as ``status``."""
        for run in self.children():
            if run.info.status == "RUNNING":
                self.finish(run.info.run_id, status)

    def children(self) -> list:
        """The parent's child runs (``mlflow.entities.Run``), oldest first."""
        if self.parent_id is None:
            return []
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], f"tags.{PARENT_TAG} = '{self.parent_id}'",
                                           order_by=["attributes.start_time ASC"], page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def _create(self, name: str, tags: dict) -> str:
        run = self.client.create_run(self.experiment_id, tags={k: str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()},
                                     run_name=name)
        return run.info.run_id

    def _log(self, run_id: str, params: dict, tags: dict) -> None:
        """Set ``tags`` and log the params MLflow does not have yet (params are immutable:
        logging a known key again with another value is refused)."""
        known = self.client.get_run(run_id).data.params
        flat = flatten(params)
        changed = sorted(k for k, v in flat.items() if k in known and known[k] != v)
        if changed:
            raise TrackingError(f"run {run_id} at {self.uri} was logged with other values of {', '.join(changed)}; "
                                "resume with the same settings or start a new search")
        new = [Param(k, v) for k, v in flat.items() if k not in known]
        tag_list = [RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)
        for chunk in _chunks(tag_list, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    def _log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)


def _metric_name(key: str) -> str:
    return re.sub(r"[^\w\-. :/]", "p", key)


def git_commit() -> str | None:
    """HEAD of the git checkout ``ats`` runs from (an editable install), else None."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_result(run_id: str, tracking_uri: str | None = None) -> FitResult:
    """A run's learned schedule or predictor, from its ``result/result.pt`` artifact, in one call."""
    from .methods.results import load_result as load_result_file
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = MlflowClient(tracking_uri=uri).download_artifacts(run_id, RESULT_ARTIFACT, tmp)
        except (MlflowException, OSError) as e:
            raise TrackingError(f"cannot fetch {RESULT_ARTIFACT} of run {run_id} from {uri} ({e}); check the run id "
                                "and --tracking-uri (the run must come from a trial that finished)") from e
        return load_result_file(path)


def load_run_study(run_id: str, tracking_uri: str | None = None) -> Study:
    """The resolved study of a trial or baseline run: its parent run's ``study.yaml``."""
    from .study import load_study
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        parent = client.get_run(run_id).data.tags.get(PARENT_TAG)
    except MlflowException as e:
        raise TrackingError(f"no run {run_id} at {uri} ({e.message}); check the run id and --tracking-uri") from e
    if parent is None:
        raise TrackingError(f"run {run_id} at {uri} is not a trial or baseline of `ats search` (it has no parent "
                            "run); give a run id from the search's table")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent, STUDY_ARTIFACT, tmp)
        except (MlflowException, OSError) as e:
            raise TrackingError(f"cannot fetch {STUDY_ARTIFACT} of run {parent} (the parent of {run_id}) from {uri} "
                                f"({e})") from e
        return load_study(path)


def exposed_warning(host: str) -> str | None:
    """Why serving on ``host`` is unsafe, unless it is a loopback address: MLflow has no
    authentication, so whoever reaches the port can read and change every run."""
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (f"MLflow has no authentication: anyone who can reach {host} can read, change and delete every run; "
            "bind to a private interface only your cluster reaches, or put `mlflow server --app-name basic-auth` "
            "or a reverse proxy with authentication in front (mlflow_server/README.md)")


def check_port_free(host: str, port: int) -> None:
    """TrackingError naming the port when something already listens on ``host:port``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server's own socket: TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise TrackingError(f"cannot serve on {host}:{port}: {e.strerror or e}; stop what listens there "
                                "or give another --port") from e


def serve(backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1", port: int = 5000,
          workers: int = 1) -> list[str]:
    """The ``mlflow server`` command line: runs kept in ``backend_store_uri`` (sqlite or
    postgresql), artifacts proxied by the server into ``artifacts_destination`` (so clients
    need no access to it). Clients that reach the server by a name other than localhost or a
    private IP need that name in ``$MLFLOW_SERVER_ALLOWED_HOSTS``."""
    if not backend_store_uri.startswith("sqlite:///") and not urlparse(backend_store_uri).scheme.startswith("postgresql"):
        raise TrackingError(f"the server's --backend-store-uri must be a database (sqlite:///path/to/mlflow.db or "
                            f"postgresql://user@host/db), got {backend_store_uri!r}")
    store = resolve_tracking_uri(backend_store_uri)
    if "://" not in artifacts_destination:
        artifacts_destination = str(Path(artifacts_destination).resolve())
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
            "--artifacts-destination", artifacts_destination, "--host", host, "--port", str(port),
            "--workers", str(workers)]
