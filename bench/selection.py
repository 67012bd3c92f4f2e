"""How reliably does the selection FID pick the best trial? Run on a finished study folder.

Every trial of every cell and every baseline is sampled once on a large pool of fresh
evaluation seeds (past any seed a study uses) and its features kept. The pool's FID is the
truth; the best trial of a cell is the one of lowest pool FID, and a choice is *reliable*
when the chosen trial is the best or its paired change against the best, on the whole pool,
is not significant (the 95 % interval contains 0). For each selection size S, ``--draws``
disjoint subsets of S seeds of the pool each choose a trial per cell (and a reference
baseline) by their own FID; the table gives how often that choice was reliable, and what
the study's own choice (on its ``n_select`` selection seeds) was.

    python bench/selection.py runs/digits-YYYYMMDD-HHMMSS --pool 20000 --sizes 1000,2000,5000

Writes bench/results/selection.{json,md} (the figures of the last run, with its arguments).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ats.atomic import write_atomic  # noqa: E402
from ats.evaluate import seed_set  # noqa: E402
from ats.methods.results import sample_result  # noqa: E402
from ats.intervals import FidEstimate, frechet_from_features, real_statistics  # noqa: E402
from ats.metrics import fake_features, frechet_estimate  # noqa: E402
from ats.methods.results import load_result  # noqa: E402
from ats.study import load_study  # noqa: E402
from ats.teacher import split_seeds  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POOL_START = 5_000_000   # evaluation seeds no study reaches


def candidates(folder: Path) -> dict[str, dict[str, Path]]:
    """Cell ("method solver nfe", or "baselines solver nfe") -> {name: result folder}."""
    out: dict[str, dict[str, Path]] = {}
    for trial in sorted((folder / "ray" / "trials").glob("*/result.json")):
        lines = [json.loads(x) for x in trial.read_text().splitlines() if x.strip()]
        ckpts = sorted(trial.parent.glob("checkpoint_*"))
        if not lines or "fid_select" not in lines[-1] or not ckpts:
            continue
        c = lines[-1]["config"]
        out.setdefault(f"{c['method']} {c['solver']} {c['nfe']}", {})[lines[-1]["trial_id"]] = ckpts[-1]
    for base in sorted((folder / "baselines").iterdir()):
        name, solver, nfe = base.name.rsplit("-", 2)
        out.setdefault(f"baselines {solver} {nfe[3:]}", {})[name] = base
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study_folder", type=Path)
    p.add_argument("--pool", type=int, default=20000, help="fresh evaluation seeds per candidate")
    p.add_argument("--sizes", default="1000,2000,5000", help="selection sizes to test")
    p.add_argument("--draws", type=int, default=0, help="subsets per size (default: pool // size, disjoint)")
    args = p.parse_args()
    torch.set_num_threads(2)
    study = load_study(args.study_folder / "study.yaml")
    source = study.source()
    metric = source.make_metric()
    mu, cov = real_statistics(metric)
    seeds = split_seeds("eval", args.pool, POOL_START)
    x, labels = source.latents(seeds, dtype=source.dtype), source.labels(seeds)
    cells = candidates(args.study_folder)
    feats: dict[str, dict[str, torch.Tensor]] = {}
    pool: dict[str, dict[str, FidEstimate]] = {}
    start = time.time()
    for cell, members in cells.items():
        for name, path in members.items():
            result = load_result(path / "result.pt")
            if result.per_sample is not None and result.predictor is None:
                continue   # oracle schedules have no samples on fresh seeds
            out = sample_result(source, result, x, labels)[0]
            feats.setdefault(cell, {})[name] = fake_features(metric, out)
            pool.setdefault(cell, {})[name] = frechet_estimate(metric, out, seed_set("eval", args.pool, POOL_START))
            print(f"{cell:>28} {name:>16}: pool FID {pool[cell][name].text()}  ({time.time() - start:.0f} s)",
                  flush=True)
    rows = []
    for cell, members in pool.items():
        best = min(members, key=lambda k: members[k].fid)
        tied = {k for k, e in members.items() if k == best or e.change_pct(members[best]).low <= 0}
        study_pick = _study_pick(args.study_folder, cell, cells[cell])
        row = {"cell": cell, "candidates": len(members), "best": best, "best_fid": members[best].text(),
               "tied_with_best": sorted(tied), "study_pick": study_pick,
               "study_pick_reliable": None if study_pick is None else study_pick in tied, "by_size": {}}
        for size in [int(s) for s in args.sizes.split(",")]:
            draws = args.draws or args.pool // size
            rng = np.random.default_rng(size)
            hits = 0
            for d in range(draws):
                idx = (torch.arange(d * size, (d + 1) * size) if not args.draws
                       else torch.from_numpy(rng.choice(args.pool, size, replace=False)))
                fid = {k: frechet_from_features(f[idx], mu, cov) for k, f in feats[cell].items()}
                hits += min(fid, key=fid.get) in tied
            row["by_size"][size] = {"draws": draws, "reliable": hits / draws}
        rows.append(row)
        print(cell, row["by_size"], "study pick:", study_pick, row["study_pick_reliable"], flush=True)
    record = {"study": study.name, "dataset": study.dataset, "n_select": study.n_select, "pool": args.pool,
              "sizes": args.sizes, "seconds": round(time.time() - start), "cells": rows}
    write_atomic(RESULTS / "selection.json", lambda t: Path(t).write_text(json.dumps(record, indent=2) + "\n"))
    write_atomic(RESULTS / "selection.md", lambda t: Path(t).write_text(_markdown(record)))


def _study_pick(folder: Path, cell: str, members: dict[str, Path]) -> str | None:
    """The study's own choice: lowest fid_select among the cell's members."""
    scores = {}
    for name, path in members.items():
        m = path / "metrics.json"
        if m.exists():
            scores[name] = json.loads(m.read_text()).get("fid_select", float("inf"))
    return min(scores, key=scores.get) if scores else None


def _markdown(r: dict) -> str:
    sizes = list(r["cells"][0]["by_size"]) if r["cells"] else []
    lines = [f"Selection reliability, {r['study']} ({r['dataset']}): pool of {r['pool']} fresh evaluation seeds "
             f"per candidate; a choice is reliable when it is the best by the pool FID or not significantly worse "
             f"(paired 95 %). The study chose on {r['n_select']} selection seeds.", "",
             "| cell | candidates | best (pool FID) | tied with best | " +
             " | ".join(f"reliable at S={s}" for s in sizes) + " | study's pick |",
             "|---|---|---|---|" + "---|" * len(sizes) + "---|"]
    for c in r["cells"]:
        pick = "" if c["study_pick"] is None else f"{c['study_pick']} ({'reliable' if c['study_pick_reliable'] else 'not'})"
        lines.append(f"| {c['cell']} | {c['candidates']} | {c['best']} ({c['best_fid']}) | "
                     f"{len(c['tied_with_best'])} | " + " | ".join(
                         f"{100 * c['by_size'][s]['reliable']:.0f} % of {c['by_size'][s]['draws']}" for s in sizes)
                     + f" | {pick} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
