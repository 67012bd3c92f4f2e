"""The ``ats search`` driver: Ray Tune runs the trials, Optuna picks their hyperparameters,
the driver alone writes MLflow (through ``ats.tracking``).

A study has cells (method, solver, NFE); every cell gets ``study.trials`` trials from one
OptunaSearch whose define-by-run space names each parameter after its cell, so the sampler
models every cell on its own while one Tuner runs them all in parallel. The objective is
the validation FID; the held-out evaluation FID is what the final table reports. The
baselines (fixed discretizations, dmn, gits) are evaluated once per study, as Ray tasks.

Study folder: ``study.yaml`` (the resolved study), ``state.json`` (tracking URI, parent run,
Optuna storage), ``optuna.db`` (default Optuna storage), ``baselines/`` (result folders),
``ray/trials/`` (Tune's experiment: trial results and checkpoints), ``summary.{json,md}``.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from . import tracking
from .atomic import write_atomic
from .study import Study, load_study, write_study

METRIC = "fid_valid"
EXPERIMENT = "trials"
BOARD = "ats-progress"
NAMESPACE = "ats"
REPORT = "report.json"   # a finished trial's reported metrics, inside its checkpoint


@dataclass
class Row:
    """One line of the final table: the best trial of a cell (by validation FID) or a baseline."""
    method: str
    solver: str
    nfe: int
    fid_valid: float
    fid_eval: float
    run_id: str | None
    vs_baseline_pct: float = math.nan
    vs_ld3_pct: float = math.nan
    kind: str = "method"


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
    """Define-by-run space: the k-th trial goes to cell k mod (number of cells) and samples
    that method's parameters under names prefixed by the cell. The counter is pickled with
    the searcher, so a resumed study continues the same rotation."""

    def __init__(self, study: Study) -> None:
        self.cells = study.cells()
        self.spaces = {m.name: m.space for m in study.methods}
        self.count = 0

    def __call__(self, trial) -> dict[str, Any]:
        method, solver, nfe = self.cells[self.count % len(self.cells)]
        self.count += 1
        prefix = cell_key(method, solver, nfe)
        for p in self.spaces[method]:
            name = f"{prefix}/{p.name}"
            if p.kind == "choice":
                trial.suggest_categorical(name, list(p.values))
            elif p.kind == "int":
                trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
            else:
                trial.suggest_float(name, p.low, p.high, log=p.kind == "loguniform")
        return {"method": method, "solver": solver, "nfe": nfe}


def cell_key(method: str, solver: str, nfe: int) -> str:
    return f"{method}.{solver}.nfe{nfe}"


def trial_params(config: dict) -> dict[str, Any]:
    """The sampled hyperparameters of a trial's config (Tune nests them under the cell key)."""
    return dict(config.get(cell_key(config["method"], config["solver"], config["nfe"]), {}))


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


def run_trial(config: dict, study: dict, cache: str) -> None:
    """Tune function trainable: one fit, scored, reported once with its result folder."""
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
                               progress, device=device)
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
def prepare_teacher(study: dict, cache: str) -> None:
    """Teacher data of every split, once, before the trials that share it."""
    from .study import study_from_dict
    from .trial import split_data, study_source
    spec = study_from_dict(study, origin="study.yaml")
    device = _worker_setup(spec)
    source = study_source(spec).to(device)
    for split in ("train", "valid", "eval"):
        split_data(spec, source, split, cache, device)


# --- the driver ----------------------------------------------------------------------------------

class TrackingCallback(tune.Callback):
    """Driver-side: one MLflow child run per trial (the only MLflow writer), and the live table.
    Pickled with the Tuner (for resume): the client and the display are rebuilt on setup."""

    def __init__(self, uri: str, experiment: str, parent_id: str, study: dict, live: bool = True) -> None:
        self.uri, self.experiment, self.parent_id, self.study = uri, experiment, parent_id, study
        self.live = live
        self.runs: dict[str, str] = {}
        self._tracker = self._display = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_tracker", "_display")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _tracker=None, _display=None)

    @property
    def tracker(self) -> tracking.StudyTracker:
        if self._tracker is None:
            self._tracker = tracking.StudyTracker(self.uri, self.experiment)
            self._tracker.start_parent(self.experiment, {}, {}, run_id=self.parent_id)
        return self._tracker

    def setup(self, **info) -> None:
        from .progress import TrialTable
        ProgressBoard.options(name=BOARD, namespace=NAMESPACE, get_if_exists=True, num_cpus=0).remote()
        self._display = TrialTable(live=self.live)

    def _run(self, trial) -> str:
        if trial.trial_id not in self.runs:
            c = trial.config
            params = {"method": c["method"], "solver": c["solver"], "nfe": c["nfe"], "trial_id": trial.trial_id,
                      "hyperparameters": trial_params(c), "study": self.study}
            tags = {"ats.kind": "trial", "method": c["method"], "solver": c["solver"], "nfe": str(c["nfe"]),
                    "dataset": self.study["dataset"], "git_commit": tracking.git_commit() or "unknown"}
            name = f"{c['method']} {c['solver']} nfe{c['nfe']} {trial.trial_id}"
            self.runs[trial.trial_id] = self.tracker.child(f"trial/{trial.trial_id}", name, params, tags)
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run(trial)
        self._display.update(trial, "RUNNING")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._display.update(trial, "RETRYING")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id, result = self._run(trial), trial.last_result
        self.tracker.log_metrics(run_id, {k: result[k] for k in ("fid_valid", "fid_eval", "l2_valid", "l2_eval",
                                                                  "fit_seconds") if k in result})
        if trial.checkpoint is not None:
            folder = Path(trial.checkpoint.path)
            history = folder / "history.json"
            if history.exists():
                self.tracker.log_history(run_id, json.loads(history.read_text()))
            self.tracker.log_artifacts(run_id, folder, "result")
        self.tracker.finish(run_id, "FINISHED")
        self._display.update(trial, "DONE", result)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self._run(trial)
        error = (trial.error_file and Path(trial.error_file).read_text().strip().splitlines() or ["error"])[-1]
        self.tracker.client.set_tag(run_id, "ats.error", error[:5000])
        self.tracker.finish(run_id, "FAILED")
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
    baselines: dict[str, dict[str, float]] | None = None   # key "name/solver/nfe" -> metrics

    def save(self, folder: Path) -> None:
        write_atomic(folder / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(self.__dict__, indent=2)))

    @classmethod
    def load(cls, folder: Path) -> "SearchState":
        path = folder / "state.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: --resume takes a study folder written by `ats search`")
        return cls(**json.loads(path.read_text()))


def new_study_dir(root: Path, study: Study) -> Path:
    """runs/<study>-<date>-<time>, unique."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = root / f"{study.name}-{stamp}"
    k = 1
    while folder.exists():
        k += 1
        folder = root / f"{study.name}-{stamp}-{k}"
    return folder


def search(study: Study, folder: Path, tracking_uri: str | None = None, optuna_url: str | None = None,
           address: str | None = None, resume: bool = False, cache: Path | None = None, live: bool = True,
           console=None) -> tuple[list[Row], bool]:
    """Run (or, with ``resume``, finish) a study in ``folder``; returns the final table's rows
    and whether it stopped (Ctrl-C) before every trial finished."""
    from rich.console import Console
    console = console or Console(width=None if os.isatty(1) else 160)
    folder = folder.resolve()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # Tune's own status tables off: ats draws its own
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if resume:
        state = SearchState.load(folder)
        study = load_study(folder / "study.yaml")
    else:
        folder.mkdir(parents=True, exist_ok=False)
        write_study(study, folder / "study.yaml")
        state = SearchState(tracking.resolve_tracking_uri(tracking_uri),
                            optuna_url or f"sqlite:///{folder / 'optuna.db'}", folder.name)
    tracking.check_reachable(state.tracking_uri)
    cache = (cache or Path(".ats-cache/teacher")).resolve()
    spec = study.to_dict()

    tracker = tracking.StudyTracker(state.tracking_uri, study.name)
    state.parent_run_id = tracker.start_parent(
        folder.name, {"study": spec}, {"ats.kind": "search", "dataset": study.dataset, "study_dir": str(folder),
                                       "git_commit": tracking.git_commit() or "unknown"},
        run_id=state.parent_run_id)
    state.save(folder)
    tracker.client.log_artifact(state.parent_run_id, str(folder / "study.yaml"))   # the resolved study
    console.print(f"study [bold]{study.name}[/]: {len(study.cells())} cells x {study.trials} trials, "
                  f"{len(study.baseline_cells())} baselines; folder {folder}")

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 namespace=NAMESPACE)
    ray.get(prepare_teacher.options(num_cpus=study.cpus_per_trial, num_gpus=study.gpus_per_trial)
            .remote(spec, str(cache)))
    baselines = run_baselines(study, spec, folder, state, tracker, cache, console)

    grid, interrupted = run_trials(study, spec, folder, state, cache, resume, live)
    rows = summarize(study, folder, tracker, state.parent_run_id, baselines, grid)
    if interrupted:   # trials stopped mid-fit: their runs are reopened by --resume
        for run in tracker.children():
            if run.info.status == "RUNNING":
                tracker.finish(run.info.run_id, "KILLED")
    tracker.finish(state.parent_run_id, "KILLED" if interrupted else "FINISHED")
    print_table(console, study, rows, tracker, folder, interrupted)
    return rows, interrupted


def run_baselines(study: Study, spec: dict, folder: Path, state: SearchState, tracker, cache: Path,
                  console) -> dict[str, dict]:
    """Each baseline once per study (kept in state.json, so a resumed study skips them)."""
    done = dict(state.baselines or {})
    todo = [c for c in study.baseline_cells() if "/".join(map(str, c)) not in done]
    opts = dict(num_cpus=study.cpus_per_trial, num_gpus=study.gpus_per_trial)
    pending = {run_baseline.options(**opts).remote(spec, name, solver, nfe, str(folder / "baselines" /
                                                    f"{name}-{solver}-nfe{nfe}"), str(cache)): (name, solver, nfe)
               for name, solver, nfe in todo}
    while pending:
        ready, _ = ray.wait(list(pending))
        name, solver, nfe = pending.pop(ready[0])
        metrics = ray.get(ready[0])
        out = folder / "baselines" / f"{name}-{solver}-nfe{nfe}"
        tags = {"ats.kind": "baseline", "method": name, "solver": solver, "nfe": str(nfe),
                "dataset": study.dataset, "git_commit": tracking.git_commit() or "unknown"}
        run_id = tracker.child(f"baseline/{name}/{solver}/{nfe}", f"{name} {solver} nfe{nfe} (baseline)",
                               {"method": name, "solver": solver, "nfe": nfe, "study": spec}, tags)
        tracker.log_metrics(run_id, metrics)
        tracker.log_artifacts(run_id, out, "result")
        tracker.finish(run_id, "FINISHED")
        done[f"{name}/{solver}/{nfe}"] = {**metrics, "run_id": run_id}
        state.baselines = done
        state.save(folder)
        console.print(f"baseline {name:>14} {solver} NFE {nfe}: FID valid {metrics['fid_valid']:.4f}, "
                      f"eval {metrics['fid_eval']:.4f}")
    return done


def _trainable(study: Study, spec: dict, cache: Path):
    resources = {"cpu": study.cpus_per_trial, "gpu": study.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(run_trial, study=spec, cache=str(cache)), resources)


def run_trials(study: Study, spec: dict, folder: Path, state: SearchState, cache: Path, resume: bool,
               live: bool):
    """The Tuner over every cell: its ResultGrid, and whether it stopped before all trials ended."""
    path = folder / "ray" / EXPERIMENT
    trainable = _trainable(study, spec, cache)
    if resume and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        searcher = _searcher_class()(CellSpace(study), metric=METRIC, mode="min",
                                storage=optuna_storage(state.optuna_storage), study_name=state.optuna_study,
                                sampler=optuna_sampler(study.sampler, study.seed))
        callback = TrackingCallback(state.tracking_uri, study.name, state.parent_run_id, spec, live)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=study.trials * len(study.cells()),
                                        max_concurrent_trials=study.max_concurrent),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(folder / "ray"), verbose=0,
                                      callbacks=[callback],
                                      failure_config=tune.FailureConfig(max_failures=study.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    finished = sum(1 for r in grid if r.error is not None or METRIC in (r.metrics or {}))
    return grid, finished < study.trials * len(study.cells())


def _pct(value: float, ref: float) -> float:
    return 100 * (value - ref) / ref if ref and math.isfinite(ref) else math.nan


def summarize(study: Study, folder: Path, tracker, parent_id: str, baselines: dict[str, dict], grid) -> list[Row]:
    """Best trial per cell (by validation FID) and every baseline, with the improvement in % of
    the evaluation FID against the best baseline (by validation FID) and against the best ld3;
    logged to each run and to the parent (metrics, summary files, plots)."""
    runs = {r.data.tags.get("ats.key"): r.info.run_id for r in tracker.children()}
    trials = [r for r in grid if r.error is None and METRIC in (r.metrics or {})]
    rows: list[Row] = []
    schedules: dict[tuple[str, int], dict[str, Any]] = {}
    for solver in study.solvers:
        for nfe in study.nfes:
            base = [Row(name, s, n, m["fid_valid"], m["fid_eval"], m.get("run_id"), kind="baseline")
                    for key, m in baselines.items() for name, s, n in [_split_key(key)] if (s, n) == (solver, nfe)]
            cell_rows, per_trial = list(base), []
            for method in [m.name for m in study.methods]:
                mine = [r for r in trials if (r.config["method"], r.config["solver"], r.config["nfe"]) ==
                        (method, solver, nfe)]
                per_trial += [(r, runs.get(f"trial/{r.metrics['trial_id']}")) for r in mine]
                if mine:
                    best = min(mine, key=lambda r: r.metrics[METRIC])
                    cell_rows.append(Row(method, solver, nfe, best.metrics[METRIC], best.metrics["fid_eval"],
                                         runs.get(f"trial/{best.metrics['trial_id']}")))
                    schedules[(solver, nfe)] = {**schedules.get((solver, nfe), {}), method: best.checkpoint}
            ref_base = min(base, key=lambda r: r.fid_valid).fid_eval if base else math.nan
            ld3 = next((r.fid_eval for r in cell_rows if r.method == "ld3" and r.kind == "method"), math.nan)
            for row in cell_rows:
                row.vs_baseline_pct, row.vs_ld3_pct = _pct(row.fid_eval, ref_base), _pct(row.fid_eval, ld3)
            for r, run_id in per_trial:
                if run_id is not None:
                    tracker.log_metrics(run_id, {"vs_best_baseline_pct": _pct(r.metrics["fid_eval"], ref_base),
                                                 "vs_ld3_pct": _pct(r.metrics["fid_eval"], ld3)})
            rows += cell_rows
    _log_summary(study, folder, tracker, parent_id, rows, schedules)
    return rows


def _split_key(key: str) -> tuple[str, str, int]:
    name, solver, nfe = key.rsplit("/", 2)
    return name, solver, int(nfe)


def _log_summary(study: Study, folder: Path, tracker, parent_id: str, rows: list[Row], schedules: dict) -> None:
    import torch

    from .plots import plot_fid_vs_nfe, plot_schedules
    from .trial import study_source
    out = folder / "summary"
    metrics = {}
    for r in rows:
        key = f"{r.method}.{r.solver}.nfe{r.nfe}"
        metrics[f"fid_eval.{key}"] = r.fid_eval
        if r.kind == "method":
            metrics[f"vs_best_baseline_pct.{key}"] = r.vs_baseline_pct
            metrics[f"vs_ld3_pct.{key}"] = r.vs_ld3_pct
    tracker.log_metrics(parent_id, {k: v for k, v in metrics.items() if math.isfinite(v)})
    write_atomic(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps([r.__dict__ for r in rows],
                                                                                    indent=2)))
    write_atomic(out / "summary.md", lambda tmp: Path(tmp).write_text(summary_markdown(rows)))
    for solver in study.solvers:
        curves = {}
        for r in rows:
            if r.solver == solver:
                curves.setdefault(r.method, {})[r.nfe] = r.fid_eval
        plot_fid_vs_nfe(curves, out / f"fid_vs_nfe-{solver}.png")
    ns = study_source(study).noise_schedule
    for (solver, nfe), checkpoints in schedules.items():
        lines = {}
        for name in ("time_uniform", "logSNR", "time_quadratic", "edm", "dmn", "gits"):
            path = folder / "baselines" / f"{name}-{solver}-nfe{nfe}" / "schedule.json"
            if path.exists():
                lines[name] = torch.tensor(json.loads(path.read_text())["timesteps"])
        for method, ckpt in checkpoints.items():
            path = Path(ckpt.path) / "schedule.json" if ckpt is not None else None
            if path is not None and path.exists():
                lines[method] = torch.tensor(json.loads(path.read_text())["timesteps"])
        if lines:
            plot_schedules(lines, ns, out / f"schedules-{solver}-nfe{nfe}.png", title=f"{solver}, NFE {nfe}")
        _samples_side_by_side(study, folder, solver, nfe, checkpoints, out / f"samples-{solver}-nfe{nfe}.png")
    tracker.log_artifacts(parent_id, out, "summary")


def _samples_side_by_side(study: Study, folder: Path, solver: str, nfe: int, checkpoints: dict, path: Path) -> None:
    """The first evaluation seeds under every baseline and the best trial of every method."""
    import torch

    from .plots import plot_points, save_side_by_side
    folders = {name: folder / "baselines" / f"{name}-{solver}-nfe{nfe}" for name in study.baselines}
    folders.update({m: Path(c.path) for m, c in checkpoints.items() if c is not None})
    samples = {name: torch.load(f / "samples.pt", weights_only=True) for name, f in folders.items()
               if (f / "samples.pt").exists()}
    if not samples:
        return
    if next(iter(samples.values())).ndim == 4:
        save_side_by_side(samples, path, scale=4 if next(iter(samples.values())).shape[-1] <= 16 else 1)
    else:
        plot_points(samples, path)


def summary_markdown(rows: list[Row]) -> str:
    lines = ["| method | solver | NFE | FID (eval) | FID (valid) | vs best baseline | vs ld3 | MLflow run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method}{' (baseline)' if r.kind == 'baseline' else ''} | {r.solver} | {r.nfe} | "
                     f"{r.fid_eval:.4f} | {r.fid_valid:.4f} | {_fmt_pct(r.vs_baseline_pct)} | "
                     f"{_fmt_pct(r.vs_ld3_pct)} | {r.run_id or ''} |")
    return "\n".join(lines) + "\n"


def _fmt_pct(v: float) -> str:
    return "" if not math.isfinite(v) else f"{v:+.1f} %"


def print_table(console, study: Study, rows: list[Row], tracker, folder: Path, interrupted: bool) -> None:
    from rich.table import Table
    table = Table(title=f"{study.name}: FID on {study.n_eval} held-out evaluation samples "
                        f"(best trial per method chosen by validation FID)")
    for col in ("method", "solver", "NFE", "FID", "vs best baseline", "vs ld3", "MLflow run"):
        table.add_column(col, justify="left" if col in ("method", "solver", "MLflow run") else "right")
    for r in rows:
        table.add_row(r.method + (" (baseline)" if r.kind == "baseline" else ""), r.solver, str(r.nfe),
                      f"{r.fid_eval:.4f}", _fmt_pct(r.vs_baseline_pct) if r.kind == "method" else "",
                      _fmt_pct(r.vs_ld3_pct) if r.kind == "method" else "", r.run_id or "")
    console.print(table)
    if interrupted:
        console.print(f"[yellow]stopped before every trial finished[/]: resume with "
                      f"`ats search --resume {folder}`")
    console.print(f"MLflow: {tracking.runs_url(tracker.uri, tracker.experiment_id)}")
