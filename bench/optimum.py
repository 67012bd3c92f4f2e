"""What each part of the per-sample optimum's hybrid search is worth: loss reached and wall time.

On the training samples of each dataset (``--n`` of them, teacher UniPC 20 NFE edm), from LD3's
global schedule and offsets (50 samples, as the methods start), ``fit_oracle`` runs as:
- ``gradient``: Adam on each sample's logits from the global start only;
- ``gradient_long``: the same with as many iterations as the next row spends (equal time);
- ``+restarts``: plus ``--restarts`` rounds from the start plus noise;
- ``+tpe`` / ``+cmaes``: plus ``--explore`` rounds of one Optuna study per sample (TPE or
  CMA-ES, batched ask/tell: one solver call per round), whose best candidates a gradient round
  refines.
Every row reports the mean per-sample L2 to the teacher, its paired change against the global
start and against ``gradient`` (normal 95 % intervals over samples), and the fit's wall time
(median of ``--repeats`` runs). Also the batched optimum's cost against one global fit of the
same batch and iterations (``oracle_speed``: the target is at most 1.5x).

Run: ``python bench/optimum.py [--datasets gmm-16d,digits] [--n 256]``; writes
bench/results/optimum.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ats.atomic import write_atomic
from ats.intervals import paired_mean_change
from ats.methods import FitContext
from ats.methods.ld3 import ld3_start
from ats.methods.oracle import fit_oracle, offsets_of
from ats.solvers import steps_for_nfe
from ats.teacher import DEFAULT_CACHE, TeacherConfig
from quality import dataset_source, oracle_speed

RESULTS = Path(__file__).resolve().parent / "results"


def variants(args) -> dict[str, dict]:
    it, r = args.iterations, args.restarts
    return {"gradient": dict(iterations=it, restarts=0),
            "gradient_long": dict(iterations=it * (r + 1), restarts=0),
            "+restarts": dict(iterations=it, restarts=r),
            "+tpe": dict(iterations=it, restarts=r, explore_trials=args.explore, explore_sampler="tpe"),
            "+cmaes": dict(iterations=it, restarts=r, explore_trials=args.explore, explore_sampler="cmaes")}


def run_cell(source, solver: str, nfe: int, args) -> dict:
    steps = steps_for_nfe(solver, nfe)
    ctx = FitContext(source, solver, steps, None, args.n, 200, TeacherConfig(), args.cache)
    start = ld3_start(ctx, {"epochs": args.ld3_epochs}, 50)
    init = torch.tensor(start.info["theta"])
    rows, losses = {}, {}
    for name, options in variants(args).items():
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            res = fit_oracle(source, ctx.train, solver, steps, init=init, offsets=offsets_of(start), **options)
            times.append(time.perf_counter() - t)
        losses[name] = np.asarray(res.info["loss"])
        start_loss = np.asarray(res.info["start_loss"])
        vs_start = paired_mean_change(losses[name], start_loss)
        rows[name] = {"l2": float(losses[name].mean()), "start_l2": float(start_loss.mean()),
                      "vs_start": asdict(vs_start), "seconds": statistics.median(times), "options": options}
        print(solver, nfe, name, f"{rows[name]['l2']:.4g}", vs_start.text(), f"{rows[name]['seconds']:.1f} s",
              flush=True)
    for name, row in rows.items():
        row["vs_gradient"] = asdict(paired_mean_change(losses[name], losses["gradient"]))
    return rows


def table(results: dict) -> str:
    lines = ["| dataset | solver | NFE | n | variant | L2 to teacher | vs global start | vs gradient | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in results["cells"]:
        for name, r in c["rows"].items():
            fmt = lambda d: f"{d['pct']:+.1f}% [{d['low']:+.1f}, {d['high']:+.1f}]"  # noqa: E731
            lines.append(f"| {c['dataset']} | {c['solver']} | {c['nfe']} | {c['n']} | {name} | {r['l2']:.4g} | "
                         f"{fmt(r['vs_start'])} | {fmt(r['vs_gradient'])} | {r['seconds']:.1f} |")
    if "speed" in results:
        s = results["speed"]
        lines.append(f"\nBatched optimum of {s['n']} samples against one global fit, same batch and {s['iterations']} "
                     f"iterations ({s['dataset']}, {s['solver']} NFE {s['nfe']}): {s['per_sample_seconds']:.1f} s "
                     f"against {s['global_seconds']:.1f} s, ratio {s['ratio']:.2f} (target at most 1.5).")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="gmm-16d,digits")
    p.add_argument("--solvers", default="uni_pc")
    p.add_argument("--nfes", default="5")
    p.add_argument("--n", type=int, default=256, help="training samples the optimum is fitted on")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--explore", type=int, default=32, help="Optuna rounds (one batched solver call each)")
    p.add_argument("--ld3-epochs", type=int, default=150)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--speed-n", type=int, default=512, help="batch of the cost figure (0: skip it)")
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    torch.manual_seed(0)
    results = {"args": {k: v for k, v in vars(args).items() if k not in ("cache", "results")}, "cells": []}
    out = Path(args.results)

    def write() -> None:
        write_atomic(out / "optimum.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
        write_atomic(out / "optimum.md", lambda tmp: tmp.write_text(
            "# The per-sample optimum's hybrid search: what each part buys\n\n"
            f"Threads: {torch.get_num_threads()}. Run: `python bench/optimum.py` "
            f"({' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in results['args'].items())}).\n\n"
            + table(results)))

    for name in args.datasets.split(","):
        dataset, source = dataset_source(name)
        for solver in args.solvers.split(","):
            for nfe in map(int, args.nfes.split(",")):
                rows = run_cell(source, solver, nfe, args)
                results["cells"].append({"dataset": dataset, "solver": solver, "nfe": nfe, "n": args.n, "rows": rows})
                write()
        if dataset == "digits" and args.speed_n:
            results["speed"] = {"dataset": dataset, "solver": "dpm_solver++", "nfe": 5, "n": args.speed_n,
                                "iterations": 20,
                                **oracle_speed(source, "dpm_solver++", 5, args.speed_n, 20, Path(args.cache))}
            write()
    print(table(results))


if __name__ == "__main__":
    main()
