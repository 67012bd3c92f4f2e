"""FID of every fixed discretization on the embedded digits model, one run.

Solvers uni_pc (order 3), dpm_solver++ (2M), ipndm (order 4) and ddim at NFE 3, 5, 7, 10,
for time_uniform, logSNR, time_quadratic, edm; plus the model's own quality (a 200-NFE
UniPC solve, the teacher regime) and the metric's floor (real digits against real
digits: two halves of the data set). Samples come from evaluation seeds, unconditional
(the null label). FID is on the shipped digits classifier's features (ats.metrics).

Run: ``python bench/digits_fid.py [--n 2000]``. Writes bench/results/digits_fid.{json,md},
a sample grid bench/results/digits_samples.png, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ats.atomic import write_atomic
from ats.baselines import evaluate_table
from ats.discretize import KINDS, get_timesteps
from ats.metrics import digits_metric, frechet_distance, frechet_metric, QuantizedFeatures, to_uint8
from ats.models.digits import load_digits_classifier, load_digits_data
from ats.models.sources import digits_source
from ats.plots import save_image_grid
from ats.solvers import sample
from ats.teacher import split_seeds

RESULTS = Path(__file__).resolve().parent / "results"
SOLVERS = ("uni_pc", "dpm_solver++", "ipndm", "ddim")
NFES = (3, 5, 7, 10)
DISCRETIZATIONS = KINDS[:4]


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="generated samples per configuration")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    source = digits_source()
    seeds = split_seeds("eval", args.n)
    x = source.latents(seeds, dtype=torch.float32)
    metric = digits_metric()

    with torch.no_grad():
        teacher = sample(source.model_fn, source.noise_schedule, x,
                         get_timesteps(source.noise_schedule, "logSNR", 200), "uni_pc")
    teacher_fid = frechet_distance(metric, teacher)
    save_image_grid(teacher[:100], RESULTS / "digits_samples.png", nrow=10, scale=4)
    images, _ = load_digits_data()
    classifier = load_digits_classifier()
    halves = frechet_metric(QuantizedFeatures(classifier.features, classifier.num_features))
    halves.update(to_uint8(images[::2]), real=True)
    floor = frechet_distance(halves, images[1::2])

    rows = [r._asdict() for r in evaluate_table(source, x, None, metric, SOLVERS, NFES, DISCRETIZATIONS)]
    seconds = time.perf_counter() - start
    lines = [f"Digits model, FID on the digits classifier's features, {args.n} evaluation samples "
             f"(seeds {seeds.start}..{seeds.stop - 1}), unconditional. Teacher regime (UniPC-3, 200 NFE, "
             f"logSNR): FID {teacher_fid:.3f}; real vs real (two halves of the 1797 digits): {floor:.3f}.",
             "", "| solver | NFE | " + " | ".join(DISCRETIZATIONS) + " |", "|---|---|" + "---|" * len(DISCRETIZATIONS)]
    for solver in SOLVERS:
        for n in NFES:
            vals = {r["discretization"]: r["value"] for r in rows if r["solver"] == solver and r["nfe"] == n}
            best = min(vals.values())
            lines.append(f"| {solver} | {n} | " + " | ".join(
                f"**{vals[k]:.3f}**" if vals[k] == best else f"{vals[k]:.3f}" for k in DISCRETIZATIONS) + " |")
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / "digits_fid.json", json.dumps(
        {"n": args.n, "teacher_fid_uni_pc_200": teacher_fid, "real_vs_real": floor, "rows": rows,
         "seconds": seconds, "torch": torch.__version__}, indent=2) + "\n")
    write_text(RESULTS / "digits_fid.md", "# Fixed discretizations on the digits model\n\n" + table)
    print(table, end="")
    print(f"({seconds:.0f} s)")


if __name__ == "__main__":
    main()
