"""The final table of ``ats search``, from recorded results and without Ray: the best trial of
each cell by selection FID, then every baseline and chosen trial on the held-out evaluation
seeds (the ``fid.json`` of their result folders) with paired changes (``ats.report``); the
``summary/`` files and plots, and what goes to MLflow, through the tracker it is given.

``baselines`` and ``chosen`` are the search's state (``state.json``): a baseline's metrics and
run id by ``Cell.state_key``, a chosen trial's entry (trial_id, folder, run_id, method,
solver, nfe, metrics) by ``Cell.key``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .atomic import write_atomic
from .cells import Cell
from .intervals import score_label
from .report import Row, compare, markdown, rich_table, verdict, write_json
from .study import Study


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial: its cell, its id, its sampled hyperparameters and its result folder."""
    cell: Cell
    trial_id: str
    params: dict[str, Any]
    folder: Path


def best_trials(trials: Iterable[TrialRecord]) -> dict[Cell, TrialRecord]:
    """The trial of lowest selection FID (its folder's ``fid.json``) in each cell; the first on a tie."""
    from .trial import load_fids
    best: dict[Cell, tuple[float, TrialRecord]] = {}
    for t in trials:
        fid = load_fids(t.folder)["select"].fid
        if t.cell not in best or fid < best[t.cell][0]:
            best[t.cell] = (fid, t)
    return {cell: t for cell, (_, t) in best.items()}


def summary_rows(study: Study, folder: Path, baselines: dict[str, dict], chosen: dict[str, dict]) -> list[Row]:
    """Per (solver, NFE): every baseline and each method's chosen trial on the evaluation seeds,
    with paired changes against the baseline of lowest selection FID (chosen on other seeds
    than it is reported on) and against LD3. Schedules not evaluated yet are left out."""
    rows: list[Row] = []
    for solver in study.solvers:
        for nfe in study.nfes:
            cell = [r for r in _cell_rows(study, folder, baselines, chosen, solver, nfe) if r is not None]
            compare(cell, by_select=True)
            rows += cell
    return rows


def _cell_rows(study: Study, folder: Path, baselines: dict[str, dict], chosen: dict[str, dict], solver: str,
               nfe: int) -> Iterator[Row | None]:
    """The rows of the baselines and chosen trials at (solver, nfe); None for one not evaluated."""
    for key, m in baselines.items():
        cell = Cell.from_state_key(key)
        if (cell.solver, cell.nfe) == (solver, nfe):
            yield _row(cell, "baseline", cell.baseline_folder(folder), m, m.get("run_id"))
    for method in study.methods:
        entry = chosen.get(Cell(method.name, solver, nfe).key)
        if entry is not None:
            yield _row(Cell.of(entry), "method", Path(entry["folder"]), entry["metrics"], entry["run_id"])


def _row(cell: Cell, kind: str, folder: Path, metrics: dict[str, float], run_id: str | None) -> Row | None:
    """A schedule's row from its result folder's evaluation FID; None before it has one."""
    from .trial import load_fids
    fids = load_fids(folder)
    if "eval" not in fids:
        return None
    fell_back = metrics.get("kept_predictor") == 0
    return Row(cell.method, cell.solver, cell.nfe, fids["eval"], kind, metrics.get("l2_eval", math.nan), run_id,
               metrics.get("fid_select", math.nan), others={f.seeds: f for f in fids.values()},
               note="LD3's schedule: the predictor was not better on the validation seeds" if fell_back else "")


def change_metrics(r: Row, suffix: str = "") -> dict[str, float]:
    """A row's paired changes (against the best baseline and LD3) as MLflow metrics."""
    out = {}
    for name, c in (("vs_best_baseline", r.vs_baseline), ("vs_ld3", r.vs_ld3)):
        out.update({f"{name}_pct{suffix}": c.pct, f"{name}_low{suffix}": c.low, f"{name}_high{suffix}": c.high})
    return {k: v for k, v in out.items() if math.isfinite(v)}


def summary_metrics(rows: list[Row]) -> dict[str, float]:
    """The parent run's metrics: every row's evaluation FID and the methods' changes, by cell."""
    metrics = {}
    for r in rows:
        key = "." + Cell(r.name, r.solver, r.nfe).key
        metrics.update({f"fid_eval{key}": r.fid.fid, f"fid_eval_low{key}": r.fid.low,
                        f"fid_eval_high{key}": r.fid.high})
        if r.kind == "method":
            metrics.update(change_metrics(r, key))
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def summarize(study: Study, folder: Path, baselines: dict[str, dict], chosen: dict[str, dict], tracker,
              parent_id: str) -> list[Row]:
    """The final rows, written to ``folder/summary`` and logged: each method's changes to its
    run, every row's metrics and the summary files to the parent run."""
    rows = summary_rows(study, folder, baselines, chosen)
    out = write_summary(study, folder, rows, chosen)
    for r in rows:
        if r.kind == "method" and r.run_id is not None:
            tracker.log_metrics(r.run_id, change_metrics(r))
    tracker.log_metrics(parent_id, summary_metrics(rows))
    tracker.log_artifacts(parent_id, out, "summary")
    return rows


def write_summary(study: Study, folder: Path, rows: list[Row], chosen: dict[str, dict]) -> Path:
    """``folder/summary``: summary.json, summary.md (table and verdicts), the FID plot of each
    solver, and per (solver, NFE) the schedules and the first samples side by side."""
    from .plots import plot_fid_intervals, plot_fid_vs_nfe
    out = folder / "summary"
    write_json(rows, out / "summary.json")
    text = markdown(rows) + "\n".join(verdict(_at(rows, cell)) for cell in _solver_nfes(rows)) + "\n"
    write_atomic(out / "summary.md", lambda tmp: Path(tmp).write_text(text))
    for solver in study.solvers:
        mine = [r for r in rows if r.solver == solver]
        if len(study.nfes) > 1:
            plot_fid_vs_nfe(mine, out / f"fid_vs_nfe-{solver}.png")
        else:
            plot_fid_intervals(mine, out / f"fid-{solver}-nfe{study.nfes[0]}.png")
    noise_schedule = None
    for solver in study.solvers:
        for nfe in study.nfes:
            folders = _result_folders(study, folder, chosen, solver, nfe)
            if noise_schedule is None and any((f / "schedule.json").exists() for f in folders.values()):
                noise_schedule = study.noise_schedule()
            _plot_schedules(folders, noise_schedule, out / f"schedules-{solver}-nfe{nfe}.png", f"{solver}, NFE {nfe}")
            _samples_side_by_side(folders, out / f"samples-{solver}-nfe{nfe}.png")
    return out


def _result_folders(study: Study, folder: Path, chosen: dict[str, dict], solver: str, nfe: int) -> dict[str, Path]:
    """Schedule name -> result folder: every baseline and each method's chosen trial at (solver, nfe)."""
    folders = {name: Cell(name, solver, nfe).baseline_folder(folder) for name in study.baselines}
    folders.update({e["method"]: Path(e["folder"]) for e in chosen.values()
                    if (e["solver"], e["nfe"]) == (solver, nfe)})
    return folders


def _plot_schedules(folders: dict[str, Path], noise_schedule, path: Path, title: str) -> None:
    """The global schedules (and conditioning times) of the folders that have one, in one plot."""
    import torch

    from .plots import plot_schedules
    lines, cond = {}, {}
    for name, f in folders.items():
        if (f / "schedule.json").exists():
            data = json.loads((f / "schedule.json").read_text())
            lines[name] = torch.tensor(data["timesteps"])
            if data.get("cond_timesteps") is not None:
                cond[name] = torch.tensor(data["cond_timesteps"])
    if lines:
        plot_schedules(lines, noise_schedule, path, title=title, cond=cond)


def _samples_side_by_side(folders: dict[str, Path], path: Path) -> None:
    """The first evaluation seeds under every baseline and the chosen trial of every method: their
    folders' image grids (``samples.png``: for latent models the decoded images, which
    ``samples.pt`` does not hold), else scatter plots of their points."""
    import numpy as np
    import torch
    from PIL import Image

    from .plots import plot_points, save_grids_side_by_side
    have = {name: f for name, f in folders.items() if (f / "samples.pt").exists()}
    if not have:
        return
    if all((f / "samples.png").exists() for f in have.values()):
        save_grids_side_by_side({name: np.asarray(Image.open(f / "samples.png")) for name, f in have.items()}, path)
    else:
        plot_points({name: torch.load(f / "samples.pt", weights_only=True) for name, f in have.items()}, path)


def _solver_nfes(rows: list[Row]) -> list[tuple[str, int]]:
    """The (solver, NFE) pairs of the rows, in order."""
    return list(dict.fromkeys((r.solver, r.nfe) for r in rows))


def _at(rows: list[Row], cell: tuple[str, int]) -> list[Row]:
    """The rows at (solver, NFE) ``cell``."""
    return [r for r in rows if (r.solver, r.nfe) == cell]


def print_table(console, study: Study, rows: list[Row], folder: Path, interrupted: bool, runs_url: str) -> None:
    """The final table, a verdict per (solver, NFE), the chosen trials' MLflow runs, how to
    resume an interrupted search and where its runs are (``runs_url``)."""
    cells = _solver_nfes(rows)
    where = f", {cells[0][0]} NFE {cells[0][1]}" if len(cells) == 1 else ""
    score = score_label(study.score_name())
    console.print(rich_table(rows, f"{study.name}{where}: {score} on {study.n_eval} held-out evaluation samples",
                             f"each method: its trial of lowest {score} on {study.n_select} selection samples; "
                             f"reference: the baseline of lowest {score} on the selection samples", select=True))
    for cell in cells:
        console.print(verdict(_at(rows, cell)))
    chosen = [f"{r.name}{'' if len(cells) == 1 else f' {r.solver} NFE {r.nfe}'} {r.run_id}" for r in rows
              if r.kind == "method" and r.run_id]
    if chosen:
        console.print("MLflow runs of the chosen trials (for ats evaluate/sample/export --run): " + ", ".join(chosen))
    if interrupted:
        console.print(f"[yellow]stopped before every trial finished[/]: resume with "
                      f"`ats search --resume {folder}`")
    console.print(f"MLflow: {runs_url}")
