"""Schedule quality of every method against LD3, on held-out evaluation seeds, one run.

For each dataset, solver and NFE: teacher targets (UniPC, 20 NFE, edm) for training
(``--n-train``), validation and evaluation seeds (disjoint); the fixed discretizations,
DMN, GITS, LD3 (50 training samples, as published), the one-shot and delta predictors
(trained end to end on ``--n-train`` samples, starting from LD3's schedule), all evaluated
by FID (and mean L2 to the teacher) on the evaluation seeds. The oracle is fitted on each
evaluation sample itself: an upper bound on per-sample schedules, not a method one can
deploy. TimeTuner is measured where its paper measures it (DDIM, NFE 10). Also: wall time
of the batched oracle against a global fit with the same iterations and batch, and the
one-shot predictor's sampling overhead.

Run: ``python bench/quality.py [--datasets digits,gmm] [--nfes 3,5,7,10] ...``. Writes
bench/results/quality.{json,md} and prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ats.atomic import write_atomic
from ats.discretize import KINDS, get_timesteps
from ats.evaluate import result_samples
from ats.methods import first_n, fit_method
from ats.methods.dmn import fit_dmn
from ats.methods.gits import fit_gits
from ats.methods.ld3 import Student, fit_ld3
from ats.methods.oracle import fit_oracle
from ats.methods.predictors import PredictorSampler, fit_predictor
from ats.metrics import frechet_distance, l2_loss
from ats.models.sources import GMM_PRESETS, load_source
from ats.solvers import sample
from ats.teacher import TeacherConfig, generate_teacher, split_seeds

RESULTS = Path(__file__).resolve().parent / "results"


def score(source, metric, out, targets) -> dict:
    return {"fid": frechet_distance(metric, out), "l2": l2_loss(out, targets).mean().item()}


def run_config(source, solver: str, nfe: int, args, cache: Path) -> dict:
    cfg = TeacherConfig()
    kw = dict(config=cfg, cache=cache, dtype=source.dtype)
    train = generate_teacher(source, split_seeds("train", args.n_train), **kw)
    valid = generate_teacher(source, split_seeds("valid", 64), **kw)
    ev = generate_teacher(source, split_seeds("eval", args.n_eval), **kw)
    metric = source.make_metric()
    model_fn, ns = source.model_fn_for(ev.labels), source.noise_schedule
    rows, seconds = {}, {}
    with torch.no_grad():
        for kind in KINDS[:4]:
            out = sample(model_fn, ns, ev.latents, get_timesteps(ns, kind, nfe, dtype=source.dtype), solver)
            rows[kind] = score(source, metric, out, ev.targets)
    fits = {}
    t = time.perf_counter()
    fits["dmn"] = fit_dmn(ns, solver, nfe)
    seconds["dmn"] = time.perf_counter() - t
    t = time.perf_counter()
    fits["gits"] = fit_gits(source, solver, nfe, split_seeds("train", 256))
    seconds["gits"] = time.perf_counter() - t
    t = time.perf_counter()
    fits["ld3"] = fit_ld3(source, first_n(train, 50), valid, solver, nfe, epochs=args.ld3_epochs)
    seconds["ld3"] = time.perf_counter() - t
    base = torch.tensor(fits["ld3"].info["theta"])
    for kind in ("oneshot", "delta"):
        t = time.perf_counter()
        fits[kind] = fit_predictor(kind, source, train, valid, solver, nfe, base=base, epochs=args.predictor_epochs)
        seconds[kind] = time.perf_counter() - t
    for name, res in fits.items():
        rows[name] = score(source, metric, result_samples(source, res, ev.latents, ev.labels), ev.targets)
    t = time.perf_counter()
    oracle = fit_oracle(source, ev, solver, nfe, init=base, iterations=args.oracle_iterations, restarts=1)
    seconds["oracle"] = time.perf_counter() - t
    with torch.no_grad():
        out = sample(model_fn, ns, ev.latents, oracle.per_sample.to(source.dtype), solver)
    rows["oracle"] = score(source, metric, out, ev.targets)
    ld3 = rows["ld3"]["fid"]
    for r in rows.values():
        r["vs_ld3_pct"] = 100 * (r["fid"] - ld3) / ld3
    return {"rows": rows, "fit_seconds": seconds}


def oracle_speed(source, solver: str, nfe: int, n: int, iterations: int, cache: Path) -> dict:
    """Per-sample [n, N+1] logits against one global [N+1] logit vector, same batch and steps."""
    data = generate_teacher(source, split_seeds("train", n), TeacherConfig(), cache, dtype=source.dtype)
    student = Student(source, solver, None)
    unit = data.latents / student.sigma_T
    out = {}
    for name, shape in (("global", (nfe + 1,)), ("per_sample", (n, nfe + 1))):
        theta = torch.zeros(shape, dtype=source.dtype, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=1e-2)
        t = time.perf_counter()
        for _ in range(iterations):
            loss = l2_loss(student(theta, None, unit, data.labels), data.targets).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[name + "_seconds"] = time.perf_counter() - t
    out["ratio"] = out["per_sample_seconds"] / out["global_seconds"]
    return out


def predictor_overhead(source, res, solver: str, nfe: int, n: int = 256, repeats: int = 20) -> dict:
    x = source.latents(split_seeds("eval", n), dtype=source.dtype)
    sampler = PredictorSampler(res.predictor, source, solver, None)
    ts = get_timesteps(source.noise_schedule, "logSNR", nfe, dtype=source.dtype)

    def median(fn):
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    with torch.no_grad():
        plain = median(lambda: sample(source.model_fn, source.noise_schedule, x, ts, solver))
        pred = median(lambda: sampler(x))
    return {"plain_ms": 1e3 * plain, "predictor_ms": 1e3 * pred, "overhead_pct": 100 * (pred - plain) / plain}


METHODS = ["time_uniform", "logSNR", "time_quadratic", "edm", "dmn", "gits", "ld3", "oneshot", "delta", "oracle"]


def write_tables(results: dict, began: float) -> str:
    """bench/results/quality.{json,md} from what is finished so far (temporary file, rename)."""
    results["seconds"] = time.perf_counter() - began
    lines = ["| dataset | solver | NFE | " + " | ".join(METHODS) + " |", "|---|---|---|" + "---|" * len(METHODS)]
    for c in results["configs"]:
        cells = [f"{c['rows'][m]['fid']:.3f} ({c['rows'][m]['vs_ld3_pct']:+.0f}%)" for m in METHODS]
        lines.append(f"| {c['dataset']} | {c['solver']} | {c['nfe']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name, text in (("quality.json", json.dumps(results, indent=2) + "\n"),
                       ("quality.md", "# Schedule quality (FID, % vs LD3)\n\n" + table)):
        write_atomic(RESULTS / name, lambda tmp: tmp.write_text(text))
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="digits")
    p.add_argument("--solvers", default="uni_pc,dpm_solver++")
    p.add_argument("--nfes", default="3,5,7,10")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--ld3-epochs", type=int, default=150)
    p.add_argument("--predictor-epochs", type=int, default=30)
    p.add_argument("--oracle-iterations", type=int, default=100)
    p.add_argument("--cache", default=".ats-cache/teacher")
    args = p.parse_args()
    torch.manual_seed(0)
    began = time.perf_counter()
    results = {"args": vars(args), "configs": []}
    lines = []
    for dataset in args.datasets.split(","):
        source = load_source(dataset, **(GMM_PRESETS["16d"] if dataset == "gmm" else {}))
        for solver in args.solvers.split(","):
            for nfe in map(int, args.nfes.split(",")):
                r = run_config(source, solver, nfe, args, Path(args.cache))
                results["configs"].append({"dataset": dataset, "solver": solver, "nfe": nfe, **r})
                print(dataset, solver, nfe, {k: round(v["fid"], 3) for k, v in r["rows"].items()}, flush=True)
                write_tables(results, began)
        if dataset == "digits":
            tt = fit_method("timetuner", source, "ddim", 10, options={"discretization": "time_uniform"})
            ev = generate_teacher(source, split_seeds("eval", args.n_eval), TeacherConfig(), args.cache, dtype=source.dtype)
            metric = source.make_metric()
            with torch.no_grad():
                untuned = sample(source.model_fn, source.noise_schedule, ev.latents, tt.timesteps.to(source.dtype), "ddim")
                tuned = sample(source.model_fn, source.noise_schedule, ev.latents, tt.timesteps.to(source.dtype), "ddim",
                               cond_timesteps=tt.cond_timesteps.to(source.dtype))
            results["timetuner_ddim10"] = {"untuned_fid": frechet_distance(metric, untuned),
                                           "tuned_fid": frechet_distance(metric, tuned)}
            results["oracle_speed"] = oracle_speed(source, "dpm_solver++", 5, 512, 20, Path(args.cache))
            res = fit_predictor("oneshot", source, *(generate_teacher(source, split_seeds(s, 64), TeacherConfig(),
                                args.cache, dtype=source.dtype) for s in ("train", "valid")), "dpm_solver++", 5, epochs=1)
            results["predictor_overhead_nfe5"] = predictor_overhead(source, res, "dpm_solver++", 5)
            write_tables(results, began)
    table = write_tables(results, began)
    print(table)
    for key in ("timetuner_ddim10", "oracle_speed", "predictor_overhead_nfe5"):
        if key in results:
            print(key, results[key])
    print(f"({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
