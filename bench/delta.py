"""Why the delta predictor trailed LD3, measured one change at a time.

For each dataset, solver and NFE: LD3 (50 training samples, with its conditioning offsets; the
start every per-sample method shares), then the delta predictor as it was and with each fix
added in turn, each untrained (what it starts from) and trained (``--epochs``):
- ``logSNR start``: the old predictor: its prior walks the logSNR schedule, no offsets, end to end;
- ``LD3 start``: its prior walks LD3's schedule (the fractions of LD3's lambdas), no offsets;
- ``+ offsets``: LD3's conditioning offsets carried to each time it picks (the start is LD3 exactly);
- ``regression``: trained on the optimum's schedules of the training samples (teacher forcing);
- ``regression + fine-tune``: then ``--finetune-epochs`` end to end (its own rollouts).
The one-shot predictor (LD3 start with offsets, end to end) is the reference row. Every row is
the mean L2 to the teacher on ``--n-eval`` held-out evaluation seeds with the paired change
against LD3 (normal 95 % interval over samples), the quantity both predictors are trained on.

Run: ``python bench/delta.py [--datasets gmm-16d,digits] [--nfes 3,5]``; writes
bench/results/delta.{json,md}.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ats.atomic import write_atomic
from ats.intervals import paired_mean_change
from ats.losses import l2_loss
from ats.methods import FitContext
from ats.methods.ld3 import ld3_start
from ats.methods.oracle import offsets_of, training_optimum
from ats.methods.predictors import fit_predictor
from ats.methods.results import sample_result
from ats.solvers import steps_for_nfe
from ats.teacher import DEFAULT_CACHE, TeacherConfig, generate_teacher, split_seeds
from quality import dataset_source

RESULTS = Path(__file__).resolve().parent / "results"


def variants(start, optimum) -> dict[str, tuple[str, dict]]:
    """name -> (predictor kind, fit_predictor options)."""
    base, xi = torch.tensor(start.info["theta"]), offsets_of(start)
    reg = dict(base=base, base_xi=xi, objective="regression", oracle_train=optimum.per_sample)
    return {"delta, logSNR start": ("delta", {}),
            "delta, LD3 start": ("delta", dict(base=base)),
            "delta, + offsets": ("delta", dict(base=base, base_xi=xi)),
            "delta, regression": ("delta", reg),
            "delta, regression + fine-tune": ("delta", dict(reg, finetune=True)),
            "oneshot, LD3 start + offsets": ("oneshot", dict(base=base, base_xi=xi))}


def run_cell(source, solver: str, nfe: int, args) -> dict:
    steps = steps_for_nfe(solver, nfe)
    ctx = FitContext(source, solver, steps, None, args.n_train, args.n_valid, TeacherConfig(), args.cache)
    start = ld3_start(ctx, {"epochs": args.ld3_epochs}, 50)
    optimum = training_optimum(ctx, start, {"iterations": args.oracle_iterations, "restarts": 1,
                                            "explore_trials": args.explore_trials})
    ev = generate_teacher(source, split_seeds("eval", args.n_eval), TeacherConfig(), args.cache, dtype=source.dtype)
    l2 = lambda res: l2_loss(sample_result(source, res, ev.latents, ev.labels)[0], ev.targets).numpy()  # noqa: E731
    ld3 = l2(start)
    rows = {"ld3": {"untrained": float(ld3.mean()), "trained": float(ld3.mean())}}
    for name, (kind, options) in variants(start, optimum).items():
        options = dict(options)
        finetune = options.pop("finetune", False)
        row = {}
        for when, epochs in (("untrained", 0), ("trained", args.epochs)):
            res = fit_predictor(kind, source, ctx.train, ctx.valid, solver, steps, epochs=epochs,
                                finetune_epochs=args.finetune_epochs if finetune and epochs else 0, **options)
            loss = l2(res)
            row[when] = float(loss.mean())
            row[when + "_vs_ld3"] = asdict(paired_mean_change(loss, ld3))
        rows[name] = row
        print(solver, nfe, name, f"{row['untrained']:.4g} -> {row['trained']:.4g}",
              f"{row['trained_vs_ld3']['pct']:+.1f} %", flush=True)
    return rows


def table(results: dict) -> str:
    fmt = lambda d: f"{d['pct']:+.1f}% [{d['low']:+.1f}, {d['high']:+.1f}]"  # noqa: E731
    lines = ["| dataset | solver | NFE | variant | untrained L2 | vs LD3 | trained L2 | vs LD3 |",
             "|---|---|---|---|---|---|---|---|"]
    for c in results["cells"]:
        for name, r in c["rows"].items():
            if name == "ld3":
                lines.append(f"| {c['dataset']} | {c['solver']} | {c['nfe']} | LD3 | {r['untrained']:.4g} | | | |")
                continue
            lines.append(f"| {c['dataset']} | {c['solver']} | {c['nfe']} | {name} | {r['untrained']:.4g} | "
                         f"{fmt(r['untrained_vs_ld3'])} | {r['trained']:.4g} | {fmt(r['trained_vs_ld3'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="gmm-16d,digits")
    p.add_argument("--solvers", default="uni_pc,dpm_solver++")
    p.add_argument("--nfes", default="5")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-valid", type=int, default=200)
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=15)
    p.add_argument("--ld3-epochs", type=int, default=150)
    p.add_argument("--oracle-iterations", type=int, default=100)
    p.add_argument("--explore-trials", type=int, default=32)
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    torch.manual_seed(0)
    results = {"args": {k: v for k, v in vars(args).items() if k not in ("cache", "results")}, "cells": []}
    out = Path(args.results)
    for name in args.datasets.split(","):
        dataset, source = dataset_source(name)
        for solver in args.solvers.split(","):
            for nfe in map(int, args.nfes.split(",")):
                results["cells"].append({"dataset": dataset, "solver": solver, "nfe": nfe,
                                         "rows": run_cell(source, solver, nfe, args)})
                write_atomic(out / "delta.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
                write_atomic(out / "delta.md", lambda tmp: tmp.write_text(
                    "# The delta predictor, one change at a time: mean L2 to the teacher on held-out seeds\n\n"
                    f"Run: `python bench/delta.py` ({' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in results['args'].items())}).\n\n"
                    + table(results)))
    print(table(results))


if __name__ == "__main__":
    main()
