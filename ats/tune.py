"""The ``ats search`` driver: Ray Tune runs the trials, Optuna picks their hyperparameters,
the driver alone writes MLflow (through ``ats.tracking``).

A study has cells (method, solver, NFE); every cell gets ``study.trials`` trials (one for a
method with nothing searched) from one OptunaSearch whose define-by-run space names each parameter after its cell, so the sampler
models every cell on its own while one Tuner runs them all in parallel. The objective is
the FID on the selection seeds. Trials are asked for in batches of ``max_concurrent`` and the
searcher hears of a batch only when all of it has finished, so the same study suggests the
same trials whatever order they finish in. When every trial has finished, the best trial of
each cell (by selection FID) is scored on the held-out evaluation seeds, which is what the
final table reports (``ats.summary``). The baselines (fixed discretizations, dmn, gits) are
scored once per study on both seed sets, as Ray tasks.

Study folder: ``study.yaml`` (the resolved study), ``state.json`` (tracking URI, parent run,
Optuna storage, finished baselines and evaluations), ``optuna.db`` (default Optuna storage),
``baselines/`` (result folders), ``ray/trials/`` (Tune's experiment: trial results and
checkpoints), ``summary/`` (``summary.json``, ``summary.md``, plots).
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from ray import tune

from . import tracking
from .atomic import write_atomic
from .cells import Cell
from .intervals import score_label
from .models.sources import get_dataset
from .report import Row
from .study import Study, load_study, write_study
from .summary import TrialRecord, best_trials, print_table, summarize
from .teacher import DEFAULT_CACHE

METRIC = "fid_select"
LOGGED = ("fid_select", "fid_select_low", "fid_select_high", "l2_select", "n_select", "fit_seconds",
          "valid_vs_start_pct", "valid_vs_start_low", "valid_vs_start_high", "kept_predictor")   # the last four: predictors only
EXPERIMENT = "trials"
BOARD = "ats-progress"
NAMESPACE = "ats"
REPORT = "report.json"   # a finished trial's reported metrics, inside its checkpoint
TRAINABLE = "run_trial"  # the trainable's name in Tune's experiment state: a study restores only under it


class SearchError(RuntimeError):
    """The search cannot start or go on; the message names the cause and the fix."""


# --- Optuna ------------------------------------------------------------------------------

def optuna_storage(url: str):
    """An Optuna storage object: a journal file for ``*.log``/``*.journal`` paths, else an RDB URL."""
    import optuna
    if url.endswith((".log", ".journal")) and "://" not in url:
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    return optuna.storages.RDBStorage(url)


def optuna_sampler(name: str, seed: int):
    """The Optuna sampler ``name`` (one of ats.study.SAMPLERS), seeded."""
    import optuna
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
                "gp": lambda: optuna.samplers.GPSampler(seed=seed),
                "qmc": lambda: optuna.samplers.QMCSampler(seed=seed)}
    return samplers[name]()


def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class ResumableOptunaSearch(OptunaSearch):
        """OptunaSearch for one final report per trial, safe to resume after a killed driver:
        no intermediate values (nothing to prune), and a trial that Optuna's storage already
        holds as finished (told before the driver died) is not told again."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pass

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None:
                stored = self._ot_study.get_trials(deepcopy=False)
                if ot_trial.number < len(stored) and stored[ot_trial.number].state.is_finished():
                    self._completed_trials.add(trial_id)
                    return
            super().on_trial_complete(trial_id, result, error)

    return ResumableOptunaSearch


class CellSpace:
    """Define-by-run space: the k-th trial goes to the k-th of ``Study.trial_cells`` and samples
    that method's parameters under names prefixed by the cell. The counter is pickled with
    the searcher, so a resumed study continues the same rotation."""

    def __init__(self, study: Study) -> None:
        self.cells = study.trial_cells()
        self.spaces = {m.name: m.space for m in study.methods}
        self.count = 0

    def __call__(self, trial) -> dict[str, Any]:
        cell = Cell(*self.cells[self.count % len(self.cells)])
        self.count += 1
        for p in self.spaces[cell.method]:
            name = f"{cell.key}/{p.name}"
            if p.kind == "choice":
                trial.suggest_categorical(name, list(p.values))
            elif p.kind == "int":
                trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
            else:
                trial.suggest_float(name, p.low, p.high, log=p.kind == "loguniform")
        return cell._asdict()


def trial_params(config: dict) -> dict[str, Any]:
    """The sampled hyperparameters of a trial's config (Tune nests them under the cell key)."""
    return dict(config.get(Cell.of(config).key, {}))


def trial_run_key(trial_id: str) -> str:
    """A trial's MLflow child run key (tag ``ats.key``)."""
    return f"trial/{trial_id}"


def run_tags(kind: str, cell: Cell, dataset: str) -> dict[str, str]:
    """The tags of a trial's or a baseline's MLflow run."""
    return {"ats.kind": kind, **cell.tags, "dataset": dataset, "git_commit": tracking.git_commit() or "unknown"}


# --- what runs on the workers -----------------------------------------------------------------

@ray.remote
class ProgressBoard:
    """Latest progress of each running trial, for the driver's live table."""

    def __init__(self) -> None:
        self.state: dict[str, dict] = {}

    def update(self, trial_id: str, info: dict) -> None:
        self.state[trial_id] = info

    def snapshot(self) -> dict[str, dict]:
        return dict(self.state)


def _board():
    try:
        return ray.get_actor(BOARD, namespace=NAMESPACE)
    except ValueError:
        return None


def _worker_setup(study: Study) -> str:
    """Torch threads from the trial's CPUs; the device: CUDA when Ray gave the trial a GPU."""
    import torch
    torch.set_num_threads(max(1, int(study.cpus_per_trial)))
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def tune_trial(config: dict, study: dict, cache: str) -> None:
    """Tune function trainable (registered as ``TRAINABLE``): one fit, scored, reported once
    with its result folder."""
    from .study import study_from_dict
    from .trial import run_trial as fit_and_score

    spec = study_from_dict(study, origin="study.yaml")
    device = _worker_setup(spec)
    board, trial_id, last = _board(), tune.get_context().get_trial_id(), [0.0]

    def progress(info: dict) -> None:
        now = time.monotonic()
        if board is not None and now - last[0] > 0.5:
            last[0] = now
            board.update.remote(trial_id, info)

    done = tune.get_checkpoint()
    if done is not None:   # finished before the driver died: report it again, do not refit
        with done.as_directory() as folder:
            tune.report(json.loads((Path(folder) / REPORT).read_text()))
        return
    options = spec.method_options(config["method"], trial_params(config))
    with tempfile.TemporaryDirectory(prefix="ats-trial-") as out:
        scored = fit_and_score(spec, config["method"], config["solver"], config["nfe"], options, out, cache,
                               progress, device=device, splits=("select",))
        metrics = {**scored.metrics, "node": ray.get_runtime_context().get_node_id(), "device": device,
                   "finished_at": time.time()}
        write_atomic(Path(out) / REPORT, lambda tmp: Path(tmp).write_text(json.dumps(metrics)))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(out))


@ray.remote
def run_baseline(study: dict, name: str, solver: str, nfe: int, out: str, cache: str) -> dict[str, float]:
    """A baseline's result folder and metrics (fixed discretization, dmn or gits)."""
    from .study import study_from_dict
    from .trial import run_trial as fit_and_score
    spec = study_from_dict(study, origin="study.yaml")
    return fit_and_score(spec, name, solver, nfe, {}, out, cache, device=_worker_setup(spec)).metrics


@ray.remote
def evaluate_trial(study: dict, method: str, params: dict, folder: str, cache: str) -> dict[str, float]:
    """The chosen trial of a cell on the held-out evaluation seeds (added to its result folder)."""
    from .study import study_from_dict
    from .trial import evaluate_folder
    spec = study_from_dict(study, origin="study.yaml")
    return evaluate_folder(spec, folder, spec.method_options(method, params), cache, device=_worker_setup(spec))


@ray.remote
def prepare_teacher(study: dict, cache: str) -> None:
    """Teacher data, once, before the trials that share it: the training and validation seeds
    the fits use, and the first seeds of the selection and evaluation sets (the L2 column)."""
    from .evaluate import L2_SAMPLES
    from .study import study_from_dict
    from .trial import split_data, split_size
    spec = study_from_dict(study, origin="study.yaml")
    device = _worker_setup(spec)
    source = spec.source().to(device)
    for split in ("train", "valid", "select", "eval"):
        split_data(spec, source, split, cache, device, n=min(split_size(spec, split), L2_SAMPLES)
                   if split in ("select", "eval") else None)


# --- the driver ----------------------------------------------------------------------------------

def trial_run(tracker: tracking.StudyTracker, trial_id: str, config: dict, study: dict) -> str:
    """A trial's MLflow child run (created, or reused on resume); returns its id."""
    cell = Cell.of(config)
    params = {**cell._asdict(), "trial_id": trial_id, "hyperparameters": trial_params(config), "study": study}
    return tracker.child(trial_run_key(trial_id), f"{cell.label} {trial_id}", params,
                         run_tags("trial", cell, study["dataset"]))


def log_trial(tracker: tracking.StudyTracker, run_id: str, result: dict, folder: Path | None) -> None:
    """A finished trial's metrics, loss curves and result folder on its run, then FINISHED."""
    tracker.log_metrics(run_id, {k: result[k] for k in LOGGED if k in result})
    if folder is not None:
        history = folder / "history.json"
        if history.exists():
            tracker.log_history(run_id, json.loads(history.read_text()))
        tracker.log_artifacts(run_id, folder, "result")
    tracker.finish(run_id, "FINISHED")


class TrackingCallback(tune.Callback):
    """Driver-side: one MLflow child run per trial (the only MLflow writer), and the live table.
    Pickled with the Tuner (for resume): the client and the display are rebuilt on setup, the
    tracking URI and parent run read from the study folder's state.json (a resume may move them).
    If the tracking server is lost, Tune is stopped as Ctrl-C stops it (its state saved, every
    trial resumable) and ``lost`` holds the error."""

    lost: tracking.TrackingLost | None = None   # set in the driver process, read by run_trials

    def __init__(self, folder: str, study: dict, live: bool = True) -> None:
        self.folder, self.study, self.live = folder, study, live
        self.runs: dict[str, str] = {}
        self._tracker = self._display = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_tracker", "_display")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _tracker=None, _display=None)

    @property
    def tracker(self) -> tracking.StudyTracker:
        if self._tracker is None:
            state = SearchState.load(Path(self.folder))
            self._tracker = tracking.StudyTracker(state.tracking_uri, self.study["name"])
            self._tracker.parent_id = state.parent_run_id
        return self._tracker

    def setup(self, **info) -> None:
        from .progress import TrialTable
        ProgressBoard.options(name=BOARD, namespace=NAMESPACE, get_if_exists=True, num_cpus=0).remote()
        score = get_dataset(self.study["dataset"]).score_name(**self.study["model"])
        self._display = TrialTable(live=self.live, score=score_label(score))

    def _run(self, trial) -> str:
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = trial_run(self.tracker, trial.trial_id, trial.config, self.study)
        return self.runs[trial.trial_id]

    def _logged(self, log: Callable[[], object]) -> None:
        """``log()`` unless the tracking server was lost; on losing it, stop Tune through its
        own SIGUSR1 handler (the one Ctrl-C takes); what was not logged is caught up on resume."""
        if TrackingCallback.lost is not None:
            return
        try:
            log()
        except tracking.TrackingLost as e:
            if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
                raise
            TrackingCallback.lost = e
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._logged(lambda: self._run(trial))
        self._display.update(trial, "RUNNING")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._display.update(trial, "RETRYING")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        folder = Path(trial.checkpoint.path) if trial.checkpoint is not None else None
        self._logged(lambda: log_trial(self.tracker, self._run(trial), trial.last_result, folder))
        self._display.update(trial, "DONE", trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = (trial.error_file and Path(trial.error_file).read_text().strip().splitlines() or ["error"])[-1]

        def log() -> None:
            run_id = self._run(trial)
            self.tracker.set_tag(run_id, "ats.error", error[:5000])
            self.tracker.finish(run_id, "FAILED")
        self._logged(log)
        self._display.update(trial, "FAILED", {"error": error})

    def on_step_end(self, iteration, trials, **info) -> None:
        board = _board()
        if board is not None and self._display.due():
            self._display.progress(ray.get(board.snapshot.remote()))

    def on_experiment_end(self, trials, **info) -> None:
        self._display.stop()


@dataclass
class SearchState:
    """What a resumed search needs besides study.yaml (state.json in the study folder)."""
    tracking_uri: str
    optuna_storage: str
    optuna_study: str
    parent_run_id: str | None = None
    baselines: dict[str, dict[str, float]] | None = None   # Cell.state_key -> metrics
    evaluated: dict[str, dict] | None = None               # Cell.key -> the chosen trial's evaluation

    def save(self, folder: Path) -> None:
        write_atomic(folder / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(self.__dict__, indent=2)))

    @classmethod
    def load(cls, folder: Path) -> "SearchState":
        path = folder / "state.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: --resume takes a study folder written by `ats search`")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a study state written by `ats search` ({type(e).__name__}); the folder "
                             "is damaged: start a new search") from None


def new_study_dir(root: Path, study: Study) -> Path:
    """runs/<study>-<date>-<time>, created here (empty) so that two searches started at the
    same moment never share it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        folder = root / (f"{study.name}-{stamp}" + (f"-{k}" if k > 1 else ""))
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise SearchError(f"no free study folder name under {root} for {study.name}-{stamp}; give another --out")


def check_trusted(folder: Path) -> None:
    """Refuse to resume a study folder that someone else could have written: resuming
    unpickles Tune's state from it, so it is trusted like code."""
    uid = os.getuid()
    for path in _folder_files(folder):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_uid != uid:
            raise SearchError(f"refusing to resume {folder}: {path} belongs to user id {st.st_uid}, not you, and "
                              "resuming unpickles it; resume a copy (cp -r) only if you trust who wrote it")
        if st.st_mode & 0o022:
            raise SearchError(f"refusing to resume {folder}: {path} is writable by group or others, and resuming "
                              f"unpickles it; if you trust its contents, run `chmod -R go-w {folder}` and resume again")


def _folder_files(folder: Path) -> Iterator[Path]:
    """The folder and every folder and file under it (Tune's state, trial checkpoints, state.json)."""
    yield folder
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            yield Path(root, name)


def ray_address(address: str | None) -> str:
    """A cluster only when one is named (``address``, else $RAY_ADDRESS); otherwise "local": a
    new Ray instance of this search's own, never the cluster Ray's current-cluster file names."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def start_ray(address: str | None, study: Study) -> bool:
    """Ray for the search, checked to have room for a trial; whether it was started here (and
    is to be shut down when the search ends)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address(address), include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False, namespace=NAMESPACE)
    try:
        check_resources(study)
    except SearchError:
        if started:
            ray.shutdown()
        raise
    return started


def check_resources(study: Study) -> None:
    """Stop before any task when no node of the Ray cluster has a trial's CPUs and GPUs (Ray
    would wait for them forever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    need = {"CPU": study.cpus_per_trial, "GPU": study.gpus_per_trial}
    if any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        return
    most = {k: max((node.get(k, 0) for node in nodes), default=0) for k in need}
    raise SearchError(f"a trial needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs on one node, but the largest "
                      f"node of the Ray cluster has {most['CPU']:g} CPUs and {most['GPU']:g} GPUs; lower "
                      "--cpus-per-trial/--gpus-per-trial (the study's resources) or add a node that has them")


def _client_defaults() -> None:
    """Tune's own status tables off (ats draws its own); MLflow's HTTP retries short, so that
    the driver's own bounded retry (``tracking.retry_seconds``) decides when a server is lost."""
    for key, value in (("RAY_AIR_NEW_OUTPUT", "0"), ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0"),
                       ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")):
        os.environ.setdefault(key, value)


def search(study: Study, folder: Path, tracking_uri: str | None = None, optuna_url: str | None = None,
           address: str | None = None, resume: bool = False, cache: Path | None = None, live: bool = True,
           console=None) -> tuple[list[Row], bool]:
    """Run (or, with ``resume``, finish) a study in ``folder``; returns the final table's rows
    and whether it stopped (Ctrl-C) before every trial finished. Ray is joined only at
    ``address`` (or $RAY_ADDRESS), else started for this search alone and shut down at its end."""
    from .report import console as report_console
    console = console or report_console()
    folder = folder.resolve()
    _client_defaults()
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if resume:
            check_trusted(folder)
            state = SearchState.load(folder)
            study = load_study(folder / "study.yaml")
            state.tracking_uri = tracking.resolve_tracking_uri(tracking_uri) if tracking_uri else state.tracking_uri
        else:
            state = SearchState(tracking.resolve_tracking_uri(tracking_uri),
                                optuna_url or f"sqlite:///{folder / 'optuna.db'}", folder.name)
        tracking.check_reachable(state.tracking_uri)
        started = start_ray(address, study)
        try:
            return run_study(study, folder, state, resume, (cache or Path(DEFAULT_CACHE)).resolve(), live, console)
        except tracking.TrackingLost as e:
            raise SearchError(f"{e}; nothing that finished is lost: start the tracking server again, then resume "
                              f"the study with `ats search --resume {folder}` (add --tracking-uri if it moved)") from e
        finally:
            if started:
                ray.shutdown()
    finally:
        if not resume and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()   # reserved by new_study_dir, nothing written


def run_study(study: Study, folder: Path, state: SearchState, resume: bool, cache: Path, live: bool,
              console) -> tuple[list[Row], bool]:
    """``search`` once Ray runs: baselines, trials, the chosen trials' evaluation, the table."""
    if not resume:
        folder.mkdir(parents=True, exist_ok=True)
        if any(folder.iterdir()):
            raise SearchError(f"{folder} is not empty; give a new study folder, or --resume it")
        write_study(study, folder / "study.yaml")
    spec = study.to_dict()
    tracker = tracking.StudyTracker(state.tracking_uri, study.name)
    state.parent_run_id = open_parent(tracker, study, spec, folder, state.parent_run_id)
    tracker.end_running("KILLED")   # left by a search that died: reopened when their trial runs again
    state.save(folder)
    tracker.log_artifact(state.parent_run_id, folder / "study.yaml")   # the resolved study
    console.print(f"study [bold]{study.name}[/]: {len(study.cells())} cells, {len(study.trial_cells())} trials, "
                  f"{len(study.baseline_cells())} baselines; folder {folder}")

    ray.get(prepare_teacher.options(num_cpus=study.cpus_per_trial, num_gpus=study.gpus_per_trial)
            .remote(spec, str(cache)))
    baselines = run_baselines(study, spec, folder, state, tracker, cache, console)
    try:
        trials, interrupted = run_trials(study, spec, folder, state, tracker, cache, resume, live)
    except SearchError:
        tracker.end_running("FAILED")
        tracker.finish(state.parent_run_id, "FAILED")
        raise
    chosen = evaluate_chosen(study, spec, folder, state, tracker, cache, trials, console)
    rows = summarize(study, folder, baselines, chosen, tracker, state.parent_run_id)
    tracker.end_running("KILLED")   # trials stopped mid-fit (Ctrl-C): their runs are reopened by --resume
    tracker.finish(state.parent_run_id, "KILLED" if interrupted else "FINISHED")
    print_table(console, study, rows, folder, interrupted, tracking.runs_url(tracker.uri, tracker.experiment_id))
    return rows, interrupted


def open_parent(tracker: tracking.StudyTracker, study: Study, spec: dict, folder: Path, run_id: str | None) -> str:
    """The search's parent run: new, or (resume) ``run_id`` after checking that no other study
    folder holds it (a copied folder must not reopen the original's runs)."""
    if run_id is not None:
        owner = tracker.run(run_id).data.tags.get("study_dir")
        if owner and owner != str(folder) and Path(owner, "state.json").exists():
            raise SearchError(f"the MLflow runs named in {folder / 'state.json'} belong to the study folder {owner} "
                              f"(is {folder} a copy?); resume {owner} instead, or start a new search")
    tags = {"ats.kind": "search", "dataset": study.dataset, "study_dir": str(folder),
            "git_commit": tracking.git_commit() or "unknown"}
    return tracker.start_parent(folder.name, {"study": spec}, tags, run_id=run_id)


def run_baselines(study: Study, spec: dict, folder: Path, state: SearchState, tracker, cache: Path,
                  console) -> dict[str, dict]:
    """Each baseline once per study (kept in state.json, so a resumed study skips them)."""
    done = dict(state.baselines or {})
    todo = [cell for cell in map(Cell._make, study.baseline_cells()) if cell.state_key not in done]
    opts = dict(num_cpus=study.cpus_per_trial, num_gpus=study.gpus_per_trial)
    pending = {run_baseline.options(**opts).remote(spec, *cell, str(cell.baseline_folder(folder)), str(cache)): cell
               for cell in todo}
    while pending:
        ready, _ = ray.wait(list(pending))
        cell = pending.pop(ready[0])
        metrics = ray.get(ready[0])
        run_id = tracker.child(cell.baseline_key, f"{cell.label} (baseline)", {**cell._asdict(), "study": spec},
                               run_tags("baseline", cell, study.dataset))
        tracker.log_metrics(run_id, metrics)
        tracker.log_artifacts(run_id, cell.baseline_folder(folder), "result")
        tracker.finish(run_id, "FINISHED")
        done[cell.state_key] = {**metrics, "run_id": run_id}
        state.baselines = done
        state.save(folder)
        console.print(f"baseline {cell.method:>14} {cell.solver} NFE {cell.nfe}: "
                      f"{score_label(study.score_name())} select {metrics['fid_select']:.4g}, "
                      f"eval {metrics['fid_eval']:.4g}")
    return done


def _trainable(study: Study, spec: dict, cache: Path):
    trainable = tune.with_parameters(tune_trial, study=spec, cache=str(cache))
    trainable.__name__ = TRAINABLE
    return tune.with_resources(trainable, {"cpu": study.cpus_per_trial, "gpu": study.gpus_per_trial})


def run_trials(study: Study, spec: dict, folder: Path, state: SearchState, tracker: tracking.StudyTracker,
               cache: Path, resume: bool, live: bool) -> tuple[list[TrialRecord], bool]:
    """The Tuner over every cell: the trials that finished, and whether it stopped before all
    trials ended. Raises TrackingLost when the tracking server was lost, SearchError when
    every trial failed."""
    path = folder / "ray" / EXPERIMENT
    trainable = _trainable(study, spec, cache)
    TrackingCallback.lost = None
    if resume and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        from ray.tune.search import ConcurrencyLimiter
        searcher = _searcher_class()(CellSpace(study), metric=METRIC, mode="min",
                                storage=optuna_storage(state.optuna_storage), study_name=state.optuna_study,
                                sampler=optuna_sampler(study.sampler, study.seed))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, study.max_concurrent, batch=True),
                                        num_samples=len(study.trial_cells())),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(folder / "ray"), verbose=0,
                                      callbacks=[TrackingCallback(str(folder), spec, live)],
                                      failure_config=tune.FailureConfig(max_failures=study.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    if TrackingCallback.lost is not None:
        raise TrackingCallback.lost
    sync_runs(tracker, spec, grid)
    records = _records(grid)
    finished = sum(1 for r in grid if r.error is not None or METRIC in (r.metrics or {}))
    interrupted = finished < len(study.trial_cells())
    if not interrupted:
        end_stale_trials(state)
        if not records:
            errors = [r.error for r in grid if r.error is not None]
            raise SearchError(f"every trial failed ({len(errors)} trials), so there is nothing to choose; the last "
                              f"error: {_last_line(errors[-1]) if errors else 'none'}; fix it and start a new search")
    return records, interrupted


def _last_line(error: BaseException) -> str:
    lines = [x for x in str(error).strip().splitlines() if x.strip()]
    return (lines or [type(error).__name__])[-1][:500]


def sync_runs(tracker: tracking.StudyTracker, spec: dict, grid) -> None:
    """MLflow caught up with Tune: the run of every trial that finished is FINISHED with its
    metrics and result folder (a trial can finish while the tracking server is lost)."""
    logged = {r.data.tags.get(tracking.KEY_TAG) for r in tracker.children() if r.info.status == "FINISHED"}
    for r in grid:
        metrics = r.metrics or {}
        if r.error is None and METRIC in metrics and trial_run_key(metrics["trial_id"]) not in logged:
            run_id = trial_run(tracker, metrics["trial_id"], r.config, spec)
            log_trial(tracker, run_id, metrics, Path(r.checkpoint.path) if r.checkpoint is not None else None)


def end_stale_trials(state: SearchState) -> None:
    """Optuna trials still RUNNING once every Tune trial has ended (asked by a search that
    died, never told) are marked FAIL."""
    import optuna
    storage = optuna_storage(state.optuna_storage)
    try:
        study = optuna.load_study(study_name=state.optuna_study, storage=storage)
    except KeyError:
        return
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


def _records(grid) -> list[TrialRecord]:
    """The trials of a ResultGrid that reported their selection FID with a result folder."""
    return [TrialRecord(Cell.of(r.config), r.metrics["trial_id"], trial_params(r.config), Path(r.checkpoint.path))
            for r in grid if r.error is None and METRIC in (r.metrics or {}) and r.checkpoint is not None]


def evaluate_chosen(study: Study, spec: dict, folder: Path, state: SearchState, tracker, cache: Path,
                    trials: list[TrialRecord], console) -> dict[str, dict]:
    """The best trial of every cell (lowest selection FID) scored on the held-out evaluation
    seeds, as Ray tasks; kept in state.json, so a resumed study does not score it again.
    Returns Cell.key -> {trial_id, folder, run_id, method, solver, nfe, metrics}."""
    runs = {r.data.tags.get(tracking.KEY_TAG): r.info.run_id for r in tracker.children()}
    best = best_trials(trials)
    done = dict(state.evaluated or {})
    pending = {}
    for cell in map(Cell._make, study.cells()):
        trial = best.get(cell)
        if trial is None or (cell.key in done and done[cell.key]["trial_id"] == trial.trial_id):
            continue
        entry = {"trial_id": trial.trial_id, "folder": str(trial.folder),
                 "run_id": runs.get(trial_run_key(trial.trial_id)), **cell._asdict()}
        ref = evaluate_trial.options(num_cpus=study.cpus_per_trial, num_gpus=study.gpus_per_trial).remote(
            spec, cell.method, trial.params, entry["folder"], str(cache))
        pending[ref] = (cell.key, entry)
    while pending:
        ready, _ = ray.wait(list(pending))
        key, entry = pending.pop(ready[0])
        entry["metrics"] = ray.get(ready[0])
        if entry["run_id"] is not None:
            m = entry["metrics"]
            tracker.log_metrics(entry["run_id"], {k: m[k] for k in ("fid_eval", "fid_eval_low", "fid_eval_high",
                                                                   "l2_eval", "n_eval")})
            tracker.set_tag(entry["run_id"], "ats.chosen", "true")
            tracker.log_artifacts(entry["run_id"], entry["folder"], "result")
        done[key] = entry
        state.evaluated = done
        state.save(folder)
        console.print(f"chosen {entry['method']:>10} {entry['solver']} NFE {entry['nfe']} (trial {entry['trial_id']}): "
                      f"{score_label(study.score_name())} eval {entry['metrics']['fid_eval']:.4g}")
    return done

