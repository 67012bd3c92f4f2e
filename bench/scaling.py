"""Trials per minute of one small study with 1 and with 2 concurrent trials, one run.

The same study (studies/gmm.yaml unless --study, LD3 only, ``--trials`` trials, one CPU
per trial) runs twice through ``ats.tune.search``: with ``max_concurrent`` 1, then 2. The
rate counts the trial phase only: trials / (last trial end - first trial start), read from
Tune's per-trial results, so Ray's start-up, the teacher and the baselines (the same in both
runs) are left out. Target: 2 concurrent trials at least 1.6x the rate of 1 on 2 cores.

Run: ``python bench/scaling.py [--trials 8] [--epochs 60]``; writes bench/results/scaling.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console

from ats.atomic import write_atomic
from ats.study import load_study, study_from_dict, study_path

RESULTS = Path(__file__).resolve().parent / "results"


def trial_window(folder: Path) -> tuple[int, float]:
    """(finished trials, seconds from the first trial's start to the last one's end)."""
    starts, ends = [], []
    for result in (folder / "ray" / "trials").glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if not lines or "fid_select" not in lines[-1]:
            continue
        last = lines[-1]
        ends.append(last["timestamp"])
        starts.append(last["timestamp"] - last["time_total_s"])
    return len(ends), max(ends) - min(starts)


def run(study, concurrent: int, root: Path, console: Console) -> dict:
    import ray

    from ats import tune
    spec = study.with_overrides(max_concurrent=concurrent)
    folder = root / f"concurrent-{concurrent}"
    began = time.perf_counter()
    tune.search(spec, folder, tracking_uri=f"sqlite:///{root / 'mlflow.db'}", live=False, console=console)[0]
    wall = time.perf_counter() - began
    ray.shutdown()
    n, seconds = trial_window(folder)
    return {"max_concurrent": concurrent, "trials": n, "trial_phase_s": seconds, "wall_s": wall,
            "trials_per_minute": 60 * n / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", type=Path, default=None)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=60, help="LD3 epochs per trial (sets the trial length).")
    args = p.parse_args()
    console = Console()
    base = load_study(args.study or study_path("gmm"))
    study = base.with_overrides(methods=("ld3",), trials=args.trials, cpus_per_trial=1,
                                solvers=base.solvers[:1], nfes=base.nfes[:1])
    spec = study.to_dict()
    spec["methods"]["ld3"]["options"]["epochs"] = args.epochs
    study = study_from_dict(spec, origin="bench/scaling.py")
    with tempfile.TemporaryDirectory(prefix="ats-scaling-") as tmp:
        rows = [run(study, k, Path(tmp), console) for k in (1, 2)]
    ratio = rows[1]["trials_per_minute"] / rows[0]["trials_per_minute"]
    out = {"study": study.name, "trials": args.trials, "rows": rows, "ratio": ratio, "target": 1.6}
    md = ["| concurrent trials | trials | trial phase (s) | trials / minute |", "|---|---|---|---|"]
    md += [f"| {r['max_concurrent']} | {r['trials']} | {r['trial_phase_s']:.1f} | {r['trials_per_minute']:.2f} |"
           for r in rows]
    md.append(f"\nratio 2 / 1 concurrent: **{ratio:.2f}x** (target >= 1.6x: {'met' if ratio >= 1.6 else 'missed'})\n")
    write_atomic(RESULTS / "scaling.json", lambda t: Path(t).write_text(json.dumps(out, indent=2) + "\n"))
    write_atomic(RESULTS / "scaling.md", lambda t: Path(t).write_text("\n".join(md)))
    console.print("\n".join(md))


if __name__ == "__main__":
    main()
