"""FID of every fixed discretization on the embedded digits model, one run.

Solvers uni_pc (order 3), dpm_solver++ (2M), ipndm (order 4) and ddim at NFE 3, 5, 7, 10,
for time_uniform, logSNR, time_quadratic, edm; plus the model's own quality (a 200-NFE
UniPC solve, the teacher regime) and the metric's floor (real digits against real
digits: two halves of the data set). Samples come from evaluation seeds, unconditional
(the null label). FID is on the shipped digits classifier's features (ats.metrics).

Every FID comes with its 95 % bootstrap interval; all schedules share the seeds, so within a
row the change against the row's best is paired, and every discretization whose paired change
is not significant is bold with it (a tie, not a ranking).

Run: ``python bench/digits_fid.py [--n 20000]``. Writes bench/results/digits_fid.{json,md},
a sample grid bench/results/digits_samples.png, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ats.atomic import write_atomic
from ats.compare import evaluate_table, sample_batched
from ats.discretize import FIXED, get_timesteps
from ats.evaluate import seed_set
from ats.metrics import frechet_distance, frechet_estimate, frechet_metric, QuantizedFeatures, to_uint8
from ats.models.digits import digits_metric
from ats.models.digits import load_digits_classifier, load_digits_data
from ats.models.digits import digits_source
from ats.plots import save_image_grid
from ats.teacher import split_seeds

RESULTS = Path(__file__).resolve().parent / "results"
SOLVERS = ("uni_pc", "dpm_solver++", "ipndm", "ddim")
NFES = (3, 5, 7, 10)
DISCRETIZATIONS = FIXED


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="generated samples per configuration")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    source = digits_source()
    seeds = split_seeds("eval", args.n)
    x = source.latents(seeds, dtype=torch.float32)
    metric = digits_metric()

    teacher = sample_batched(source, x, None, get_timesteps(source.noise_schedule, "logSNR", 200), "uni_pc")
    teacher_fid = frechet_estimate(metric, teacher, seed_set("eval", args.n))
    save_image_grid(teacher[:100], RESULTS / "digits_samples.png", nrow=10, scale=4)
    images, _ = load_digits_data()
    classifier = load_digits_classifier()
    halves = frechet_metric(QuantizedFeatures(classifier.features, classifier.num_features))
    halves.update(to_uint8(images[::2]), real=True)
    floor = frechet_distance(halves, images[1::2])

    rows = list(evaluate_table(source, x, None, metric, SOLVERS, NFES, DISCRETIZATIONS, seed_set("eval", args.n)))
    seconds = time.perf_counter() - start
    lines = [f"Digits model, FID ± 95 % interval on the digits classifier's features, {args.n} evaluation samples "
             f"(seeds {seeds.start}..{seeds.stop - 1}), unconditional. Teacher regime (UniPC-3, 200 NFE, "
             f"logSNR): FID {teacher_fid.text()}; real vs real (two halves of the 1797 digits): {floor:.3f}. "
             "Bold: the row's best and every discretization not significantly worse (paired 95 %).",
             "", "| solver | NFE | " + " | ".join(DISCRETIZATIONS) + " |", "|---|---|" + "---|" * len(DISCRETIZATIONS)]
    records = []
    for solver in SOLVERS:
        for n in NFES:
            cells = {r.discretization: r for r in rows if r.solver == solver and r.nfe == n}
            best = min(cells.values(), key=lambda r: r.fid.fid)
            tied = {k for k, r in cells.items() if r is best or r.fid.change_pct(best.fid).low <= 0}
            lines.append(f"| {solver} | {n} | " + " | ".join(
                f"**{cells[k].fid.text()}**" if k in tied else cells[k].fid.text() for k in DISCRETIZATIONS) + " |")
            records += [{"solver": solver, "nfe": n, "discretization": k, "fid": r.fid.fid, "fid_low": r.fid.low,
                         "fid_high": r.fid.high, "tied_with_best": k in tied} for k, r in cells.items()]
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / "digits_fid.json", json.dumps(
        {"n": args.n, "teacher_fid_uni_pc_200": teacher_fid.fid, "teacher_fid_low": teacher_fid.low,
         "teacher_fid_high": teacher_fid.high, "real_vs_real": floor, "rows": records,
         "seconds": seconds, "torch": torch.__version__}, indent=2) + "\n")
    write_text(RESULTS / "digits_fid.md", "# Fixed discretizations on the digits model\n\n" + table)
    print(table, end="")
    print(f"({seconds:.0f} s)")


if __name__ == "__main__":
    main()
