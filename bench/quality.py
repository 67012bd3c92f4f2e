"""Schedule quality of every method against LD3, on held-out evaluation seeds, one run.

For each dataset, solver and NFE: teacher targets (UniPC, 20 NFE, edm) for training
(``--n-train``), validation (``--n-valid``) and evaluation seeds (disjoint); the fixed
discretizations, DMN, GITS, and the per-sample pipeline as the methods run it: LD3 on the
first 50 training samples (as published; the start every per-sample method shares), the
optimum of each training sample from it (restarts, optional Optuna exploration), and the
one-shot and delta predictors starting exactly at LD3 (schedule and offsets), trained end to
end (``oneshot``, ``delta``) or on the optimum's schedules and then fine-tuned end to end
(``oneshot_reg``, ``delta_reg``). Each predictor is scored as trained, and ``+fallback`` as the
methods return it: LD3 itself unless its validation loss beat LD3's by 0.5 % with a paired
95 % interval below zero. All are evaluated by FID (and mean L2 to the teacher) on the
evaluation seeds; the oracle is fitted on each evaluation sample itself (the first
``--n-oracle``): an upper bound on per-sample schedules, not a method one can deploy. TimeTuner
is measured where its paper measures it (DDIM, NFE 10). Every FID has its 95 % bootstrap
interval and every change against LD3 is paired (the same evaluation seeds;
``ats.intervals``). Also: wall time of the batched oracle against a global fit with the same
iterations and batch, and the one-shot and delta predictors' sampling overhead.

Datasets: ``digits`` and the mixtures ``gmm-2d``, ``gmm-16d``, ``gmm-64d`` (the presets of
``GMM_PRESETS``; ``gmm`` alone means ``gmm-16d``).

Run: ``python bench/quality.py [--datasets digits,gmm-16d] [--nfes 3,5,7,10] ...``. Rows of
earlier runs for other datasets, solvers or NFEs are kept: this run's rows replace only those
with the same dataset, solver and NFE in bench/results/quality.json, and quality.md is
written from the merged data. ``--speed-only`` measures just the wall times (batched oracle,
predictor overhead; digits), ``--speed-only overhead`` the predictor overhead alone. Prints the table.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ats.atomic import write_atomic
from ats.discretize import FIXED, get_timesteps
from ats.compare import sample_batched
from ats.evaluate import L2_SAMPLES, seed_set
from ats.methods.results import sample_result
from ats.intervals import Change, FidEstimate
from ats.methods import METHODS, FitContext, fit_method, parse_method_options
from ats.methods.dmn import fit_dmn
from ats.methods.gits import fit_gits
from ats.methods.ld3 import Student, ld3_start
from ats.methods.oracle import fit_oracle, offsets_of, training_optimum
from ats.methods.predictors import PredictorSampler, auto_width, fit_predictor
from ats.losses import l2_loss
from ats.metrics import frechet_estimate
from ats.models.sources import GMM_PRESETS, load_source
from ats.solvers import sample, steps_for_nfe
from ats.teacher import DEFAULT_CACHE, TeacherConfig, generate_teacher, split_seeds

RESULTS = Path(__file__).resolve().parent / "results"
EXTRAS = ("timetuner_ddim10", "oracle_speed", "predictor_overhead_nfe5", "predictor_overhead_nfe5_width64",
          "delta_overhead_nfe5")


def dataset_source(name: str):
    """``digits`` or ``gmm-<preset>`` (``gmm``: the 16d preset) -> (row label, source)."""
    if name == "gmm":
        name = "gmm-16d"
    if name.startswith("gmm-"):
        preset = name[4:]
        if preset not in GMM_PRESETS:
            raise SystemExit(f"unknown mixture preset {preset!r}; choose one of {', '.join(GMM_PRESETS)}")
        return name, load_source("gmm", preset=preset)
    return name, load_source(name)


def score(metric, out, targets, seeds: str) -> tuple[FidEstimate, dict]:
    """FID with its bootstrap on ``seeds``, and the row: FID, its 95 % interval, n, mean L2 to
    the teacher on the first len(targets) samples."""
    est = frechet_estimate(metric, out, seeds)
    return est, {"fid": est.fid, "fid_low": est.low, "fid_high": est.high, "n": est.n,
                 "l2": l2_loss(out[:len(targets)], targets).mean().item()}


def run_config(source, solver: str, nfe: int, args, cache: Path) -> dict:
    """Every schedule on the same ``--n-eval`` evaluation seeds (paired changes against LD3);
    the oracle, fitted on each sample itself, on the first ``--n-oracle`` of them, against LD3
    on those same samples."""
    cfg = TeacherConfig()
    kw = dict(config=cfg, cache=cache, dtype=source.dtype)
    seeds = split_seeds("eval", args.n_eval)
    x, labels = source.latents(seeds, dtype=source.dtype), source.labels(seeds)
    targets = generate_teacher(source, seeds[:min(args.n_eval, L2_SAMPLES)], **kw).targets
    metric = source.make_metric()
    ns, name = source.noise_schedule, seed_set("eval", args.n_eval)
    rows, seconds, fids = {}, {}, {}
    steps = steps_for_nfe(solver, nfe)
    for kind in FIXED:
        out = sample_batched(source, x, labels, get_timesteps(ns, kind, steps, dtype=source.dtype), solver)
        fids[kind], rows[kind] = score(metric, out, targets, name)
    fits = {}
    t = time.perf_counter()
    fits["dmn"] = fit_dmn(ns, solver, steps)
    seconds["dmn"] = time.perf_counter() - t
    t = time.perf_counter()
    fits["gits"] = fit_gits(source, solver, steps, split_seeds("train", 256))
    seconds["gits"] = time.perf_counter() - t
    # The per-sample pipeline as the methods run it: LD3 on the first 50 training samples (the
    # start, shared), the optimum of the training samples from it (shared), the predictors from
    # LD3's schedule and offsets, trained end to end or on the optimum (then fine-tuned).
    ctx = FitContext(source, solver, steps, None, args.n_train, args.n_valid, cfg, cache)
    ld3_options = {"epochs": args.ld3_epochs}
    t = time.perf_counter()
    fits["ld3"] = ld3_start(ctx, ld3_options, 50)
    seconds["ld3"] = time.perf_counter() - t
    base = torch.tensor(fits["ld3"].info["theta"])
    oracle_options = {"iterations": args.oracle_iterations, "restarts": args.oracle_restarts,
                      "explore_trials": args.explore_trials}
    t = time.perf_counter()
    optimum = training_optimum(ctx, fits["ld3"], oracle_options)
    seconds["optimum_train"] = time.perf_counter() - t
    start_loss, best_loss = (float(torch.tensor(optimum.info[k]).mean()) for k in ("start_loss", "loss"))
    vs_start = {}
    for method, kind, objective in PREDICTORS:
        options = {"ld3": ld3_options, "oracle": oracle_options, "objective": objective, "fallback": False,
                   "epochs": args.predictor_epochs,
                   "finetune_epochs": args.finetune_epochs if objective == "regression" else 0}
        t = time.perf_counter()
        fits[method] = METHODS[kind].fit(ctx, **parse_method_options(kind, options))
        seconds[method] = time.perf_counter() - t
        vs_start[method] = fits[method].info["vs_start"]
    for method, res in fits.items():
        fids[method], rows[method] = score(metric, sample_result(source, res, x, labels)[0], targets, name)
    for method, row in rows.items():
        c = fids[method].change_pct(fids["ld3"])
        row.update(vs_ld3_pct=c.pct, vs_ld3_low=c.low, vs_ld3_high=c.high)
    for method, record in vs_start.items():   # what the fallback decides: the predictor, or LD3 itself
        kept = record["high"] < 0 and record["pct"] <= -MIN_GAIN
        rows[method].update(valid_vs_start=record, kept="predictor" if kept else "start")
        rows[method + "+fallback"] = dict(rows[method] if kept else rows["ld3"], kept=rows[method]["kept"])
    m = min(args.n_oracle, args.n_eval)
    ev = generate_teacher(source, seeds[:m], **kw)
    t = time.perf_counter()
    oracle = fit_oracle(source, ev, solver, steps, init=base, offsets=offsets_of(fits["ld3"]), **oracle_options)
    seconds["oracle"] = time.perf_counter() - t
    out = sample_result(source, oracle, ev.latents, ev.labels)[0]
    oracle_fid, rows["oracle"] = score(metric, out, ev.targets, seed_set("eval", m))
    ld3_here = frechet_estimate(metric, sample_result(source, fits["ld3"], ev.latents, ev.labels)[0],
                                seed_set("eval", m))
    c = oracle_fid.change_pct(ld3_here)
    rows["oracle"].update(vs_ld3_pct=c.pct, vs_ld3_low=c.low, vs_ld3_high=c.high, ld3_fid_same_seeds=ld3_here.fid)
    return {"rows": rows, "fit_seconds": seconds,
            "optimum_train": {"start_l2": start_loss, "l2": best_loss, "n": args.n_train,
                              "change_pct": 100 * (best_loss - start_loss) / start_loss}}


def oracle_speed(source, solver: str, nfe: int, n: int, iterations: int, cache: Path) -> dict:
    """Per-sample [n, N+1] logits against one global [N+1] logit vector, same batch and steps;
    the two fits' iterations alternate, so a busy machine slows both alike."""
    data = generate_teacher(source, split_seeds("train", n), TeacherConfig(), cache, dtype=source.dtype)
    student = Student(source, solver, None)
    unit = data.latents / student.sigma_T
    fits = {}
    for name, shape in (("global", (nfe + 1,)), ("per_sample", (n, nfe + 1))):
        theta = torch.zeros(shape, dtype=source.dtype, requires_grad=True)
        fits[name] = (theta, torch.optim.Adam([theta], lr=1e-2))
    seconds = dict.fromkeys(fits, 0.)
    for _ in range(iterations):
        for name, (theta, opt) in fits.items():
            t = time.perf_counter()
            loss = l2_loss(student(theta, None, unit, data.labels), data.targets).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            seconds[name] += time.perf_counter() - t
    out = {name + "_seconds": v for name, v in seconds.items()}
    out["ratio"] = out["per_sample_seconds"] / out["global_seconds"]
    return out


def predictor_overhead(source, results: list, solver: str, nfe: int, n: int = 256, repeats: int = 20) -> list[dict]:
    """Median wall time (and process CPU time, which other programs on a shared machine do not
    inflate) of sampling n latents with each predictor against plain sampling with a
    global schedule; the calls alternate (plain, each predictor, plain, ...), so a busy machine
    slows all alike."""
    x = source.latents(split_seeds("eval", n), dtype=source.dtype)
    samplers = [PredictorSampler(res.predictor, source, solver, None) for res in results]
    ts = get_timesteps(source.noise_schedule, "logSNR", nfe, dtype=source.dtype)
    fns = [lambda: sample(source.model_fn, source.noise_schedule, x, ts, solver)] + \
          [(lambda s=s: s(x)) for s in samplers]
    wall, cpu = [[] for _ in fns], [[] for _ in fns]
    with torch.no_grad():
        for i in range(repeats + 3):
            for fn, w, c in zip(fns, wall, cpu):
                t, tc = time.perf_counter(), time.process_time()
                fn()
                if i >= 3:  # warm-up
                    w.append(time.perf_counter() - t)
                    c.append(time.process_time() - tc)
    plain, *preds = (statistics.median(v) for v in wall)
    plain_cpu, *preds_cpu = (statistics.median(v) for v in cpu)
    return [{"plain_ms": 1e3 * plain, "predictor_ms": 1e3 * pred, "overhead_pct": 100 * (pred - plain) / plain,
             "plain_cpu_ms": 1e3 * plain_cpu, "predictor_cpu_ms": 1e3 * pred_cpu,
             "overhead_cpu_pct": 100 * (pred_cpu - plain_cpu) / plain_cpu, "threads": torch.get_num_threads(),
             "width": res.predictor.config["width"], "n": n, "repeats": repeats}
            for res, pred, pred_cpu in zip(results, preds, preds_cpu)]


def speed(source, args, cache: Path, oracle: bool = True) -> dict:
    """The wall-time figures (digits): batched oracle against a global fit (``oracle``), the
    one-shot predictor's sampling overhead at NFE 5 with the automatic width and the published
    64, and the delta predictor's with the automatic width."""
    out = {"oracle_speed": oracle_speed(source, "dpm_solver++", 5, 512, 20, cache)} if oracle else {}
    data = [generate_teacher(source, split_seeds(s, 64), TeacherConfig(), cache, dtype=source.dtype)
            for s in ("train", "valid")]
    fits = [fit_predictor(kind, source, *data, "dpm_solver++", 5, epochs=1, width=w)
            for kind, w in (("oneshot", None), ("oneshot", 64), ("delta", None))]
    out["predictor_overhead_nfe5"], out["predictor_overhead_nfe5_width64"], out["delta_overhead_nfe5"] = \
        predictor_overhead(source, fits, "dpm_solver++", 5, repeats=args.repeats)
    return out


PREDICTORS = (("oneshot", "oneshot", "end_to_end"), ("delta", "delta", "end_to_end"),
              ("oneshot_reg", "oneshot", "regression"), ("delta_reg", "delta", "regression"))
MIN_GAIN = 0.5   # % on the validation seeds, as the predictors' fallback decides
COLUMNS = ["time_uniform", "logSNR", "time_quadratic", "edm", "dmn", "gits", "ld3"] + \
    [m + suffix for m, _, _ in PREDICTORS for suffix in ("", "+fallback")] + ["oracle"]


def load_previous(path: Path) -> dict:
    """Earlier results (empty if none); rows and figures without their run's settings get the
    file's top-level ``args``."""
    if not path.exists():
        return {"configs": [], "runs": []}
    old = json.loads(path.read_text())
    args = old.get("args")
    for c in old.get("configs", []):
        c.setdefault("args", args)
        c.setdefault("predictor_width", 64)  # rows written before the automatic width used 64
    for key in EXTRAS:
        if key in old:
            old[key].setdefault("args", args)
    runs = old.get("runs") or ([{"args": args, "seconds": old.get("seconds")}] if args else [])
    return {"configs": old.get("configs", []), "runs": runs, **{k: old[k] for k in EXTRAS if k in old}}


def merge(previous: dict, current: dict) -> dict:
    """``previous`` with ``current``'s rows replacing those of the same dataset, solver and NFE
    (in place; new ones appended) and its figures replacing the earlier ones."""
    key = lambda c: (c["dataset"], c["solver"], c["nfe"])  # noqa: E731
    new = {key(c): c for c in current["configs"]}
    configs = [new.pop(key(c), c) for c in previous["configs"]] + list(new.values())
    merged = {"configs": configs, **{k: previous[k] for k in EXTRAS if k in previous}}
    merged.update({k: current[k] for k in EXTRAS if k in current})
    merged["runs"] = [r for r in previous["runs"] if r.get("id") != current["run"]["id"]] + [current["run"]]
    return merged


def table(results: dict) -> str:
    """One row per (dataset, solver, NFE): FID ± 95 % and, below it, the paired change against
    LD3 with its interval (* where it excludes 0); the oracle on its own smaller seed set."""
    lines = ["| dataset | solver | NFE | n | " + " | ".join(COLUMNS) + " |", "|---|---|---|---|" + "---|" * len(COLUMNS)]
    for c in results["configs"]:
        cells = []
        for m in COLUMNS:
            if m not in c["rows"]:
                cells.append("")
                continue
            r = c["rows"][m]
            change = Change(r["vs_ld3_pct"], r["vs_ld3_low"], r["vs_ld3_high"])
            n = f" (n={r['n']})" if r["n"] != c["rows"]["ld3"]["n"] else ""
            cells.append(f"{r['fid']:.4g} ± {(r['fid_high'] - r['fid_low']) / 2:.2g}{n}<br>"
                         + ("LD3" if m == "ld3" else change.text().replace(" %", "%")))
        lines.append(f"| {c['dataset']} | {c['solver']} | {c['nfe']} | {c['rows']['ld3']['n']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TARGET_PREDICTORS = ("oneshot+fallback", "delta+fallback", "oneshot_reg+fallback", "delta_reg+fallback")


def targets(results: dict) -> str:
    """The per-sample targets per cell: the oracle's paired FID change against LD3 (its own
    seeds), each predictor's as the methods return it (with the fallback; `*` where the interval
    excludes 0), and the share of the oracle's gain it captures; then the averages over the cells."""
    head = ["| dataset | solver | NFE | oracle vs LD3 | " + " | ".join(TARGET_PREDICTORS) + " |",
            "|---|---|---|---|" + "---|" * len(TARGET_PREDICTORS)]
    gains, shares = [], {m: [] for m in TARGET_PREDICTORS}
    fmt = lambda r: Change(r["vs_ld3_pct"], r["vs_ld3_low"], r["vs_ld3_high"]).text().replace(" %", "%")  # noqa: E731
    for c in results["configs"]:
        rows = c["rows"]
        if not all(m in rows for m in TARGET_PREDICTORS + ("oracle",)):
            continue
        oracle = rows["oracle"]["vs_ld3_pct"]
        gains.append(oracle)
        cells = []
        for m in TARGET_PREDICTORS:
            share = rows[m]["vs_ld3_pct"] / oracle if oracle < 0 else float("nan")
            shares[m].append(share)
            cells.append(f"{fmt(rows[m])}, {100 * share + 0.:.0f} % of the oracle's")
        head.append(f"| {c['dataset']} | {c['solver']} | {c['nfe']} | {fmt(rows['oracle'])} (n={rows['oracle']['n']}) | "
                    + " | ".join(cells) + " |")
    if gains:
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        head.append(f"| mean over {len(gains)} cells | | | {mean(gains):+.1f}% | "
                    + " | ".join(f"{100 * mean(shares[m]):.0f} % of the oracle's" for m in TARGET_PREDICTORS) + " |")
    return "\n".join(head) + "\n"


def write_tables(current: dict, began: float, out: Path) -> str:
    """quality.{json,md} in ``out``: the rows on disk (re-read under a lock, so runs side by side
    keep each other's rows) merged with what this run has finished so far, each file written
    to a temporary file, then renamed."""
    current["run"]["seconds"] = time.perf_counter() - began
    out.mkdir(parents=True, exist_ok=True)
    lock = os.open(out, os.O_RDONLY)  # the folder itself: no lock file left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = merge(load_previous(out / "quality.json"), current)
        text = table(results)
        notes = []
        for k in EXTRAS:
            if k in results:
                notes.append(f"- {k}: " + ", ".join(f"{n}={v:.4g}" if isinstance(v, float) else f"{n}={v}"
                                                     for n, v in results[k].items() if n != "args"))
        md = ("# Schedule quality: FID ± 95 % interval, and the paired change against LD3 on the same seeds\n\n"
              "`*`: the change's 95 % interval excludes 0. The oracle is fitted on each of its samples (an upper "
              "bound) and scored on the first n of the evaluation seeds, against LD3 on those same seeds.\n\n" + text
              + "\n## Targets: the oracle's gain over LD3 and the share each predictor captures\n\n"
              "Predictors as the methods return them (LD3 itself where the fallback chose it); shares are "
              "the predictor's paired change divided by the oracle's (on its own, smaller seed set).\n\n"
              + targets(results)) + ("\n" + "\n".join(notes) + "\n" if notes else "")
        for name, body in (("quality.json", json.dumps(results, indent=2) + "\n"), ("quality.md", md)):
            write_atomic(out / name, lambda tmp: tmp.write_text(body))
    finally:
        os.close(lock)  # releases the lock
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="digits", help="digits, gmm-2d, gmm-16d, gmm-64d (gmm: gmm-16d)")
    p.add_argument("--solvers", default="uni_pc,dpm_solver++")
    p.add_argument("--nfes", default="3,5,7,10")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=20000)
    p.add_argument("--n-oracle", type=int, default=1000, help="evaluation samples the oracle is fitted on")
    p.add_argument("--ld3-epochs", type=int, default=150)
    p.add_argument("--predictor-epochs", type=int, default=30)
    p.add_argument("--n-valid", type=int, default=200, help="validation samples (early stopping, the fallback's test)")
    p.add_argument("--finetune-epochs", type=int, default=15, help="end-to-end epochs after the regression")
    p.add_argument("--oracle-iterations", type=int, default=100)
    p.add_argument("--oracle-restarts", type=int, default=1)
    p.add_argument("--explore-trials", type=int, default=0, help="Optuna exploration rounds of the optimum")
    p.add_argument("--speed-only", nargs="?", const="all", choices=["all", "overhead"],
                   help="only the wall-time figures on digits: all (batched oracle, predictor overhead) or "
                        "overhead (the predictor's alone)")
    p.add_argument("--no-extras", action="store_true",
                   help="only the table rows (no TimeTuner or wall-time figures on digits)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per sampler for the predictor overhead")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--results", default=str(RESULTS), help="folder of quality.{json,md} (merged into)")
    args = p.parse_args()
    torch.manual_seed(0)
    began = time.perf_counter()
    out, cache = Path(args.results), Path(args.cache)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_args = {k: v for k, v in vars(args).items() if k not in ("results", "cache")}   # no machine paths
    current = {"configs": [], "run": {"id": f"{time.time():.0f}-{os.getpid()}", "args": run_args}}
    for name in args.datasets.split(","):
        dataset, source = dataset_source(name)
        if args.speed_only:
            if dataset == "digits":
                figures = speed(source, args, cache, oracle=args.speed_only == "all")
                current.update({k: {**v, "args": run_args} for k, v in figures.items()})
                write_tables(current, began, out)
            else:
                print(f"--speed-only measures digits only; {dataset} skipped")
            continue
        for solver in args.solvers.split(","):
            for nfe in map(int, args.nfes.split(",")):
                r = run_config(source, solver, nfe, args, cache)
                r["predictor_width"] = auto_width(source.shape)
                current["configs"].append({"dataset": dataset, "solver": solver, "nfe": nfe, **r, "args": run_args})
                print(dataset, solver, nfe, {k: round(v["fid"], 3) for k, v in r["rows"].items()}, flush=True)
                write_tables(current, began, out)
        if dataset == "digits" and not args.no_extras:
            tt = fit_method("timetuner", source, "ddim", 10, options={"discretization": "time_uniform"})
            x = source.latents(split_seeds("eval", args.n_eval), dtype=source.dtype)
            metric, name = source.make_metric(), seed_set("eval", args.n_eval)
            ts = tt.timesteps.to(source.dtype)
            untuned = frechet_estimate(metric, sample_batched(source, x, None, ts, "ddim"), name)
            tuned = frechet_estimate(metric, sample_batched(source, x, None, ts, "ddim",
                                                            cond_timesteps=tt.cond_timesteps.to(source.dtype)), name)
            c = tuned.change_pct(untuned)
            current["timetuner_ddim10"] = {"untuned_fid": untuned.fid, "tuned_fid": tuned.fid,
                                           "tuned_vs_untuned_pct": c.pct, "low": c.low, "high": c.high,
                                           "n": args.n_eval, "args": run_args}
            current.update({k: {**v, "args": run_args} for k, v in speed(source, args, cache).items()})
            write_tables(current, began, out)
    text = write_tables(current, began, out)
    print(text)
    for key in EXTRAS:
        if key in current:
            print(key, {k: v for k, v in current[key].items() if k != "args"})
    print(f"({current['run']['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
