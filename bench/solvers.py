"""Per-step overhead of ``ats.solvers.sample`` vs the equivalent diffusers scheduler loop.

Same cheap network (a 3-layer MLP on 64-D vectors, batch 256, float32, one CPU thread),
same integer timesteps (ats gets t = (k + 1) / 1000, see tests/test_diffusers_agreement.py)
for DDIM, DPM-Solver++(2M) and UniPC-bh2 (order 3) at NFE 5, 10 and 20. Each
configuration is timed over repeated runs after a warm-up and the median reported, as
well as the median of the bare network calls alone, so overhead per step =
(total - network) / NFE. The last column checks that both computed the same thing
(float32, so agreement is only to ~1e-5 relative). The last two columns time ats with
one schedule per sample ([B, N+1], each grid point jittered) against the shared schedule. ``lower_order_final`` is off on both sides so that both run the
same orders at every NFE (their step-count thresholds differ).

Run: ``python bench/solvers.py`` from the repository root. Writes
bench/results/solvers.json and bench/results/solvers.md and prints the table.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ats.atomic import write_atomic  # noqa: E402
from ats.models import model_wrapper  # noqa: E402
from ats.noise import NoiseScheduleVP  # noqa: E402
from ats.solvers import sample  # noqa: E402

DIM, BATCH, HIDDEN = 64, 256, 128
NFES = (5, 10, 20)
REPEATS, WARMUP = 40, 5
RESULTS = Path(__file__).resolve().parent / "results"


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(DIM + 1, HIDDEN), torch.nn.SiLU(),
                                       torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.SiLU(),
                                       torch.nn.Linear(HIDDEN, DIM))

    def forward(self, x: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
        k = torch.as_tensor(k, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        return self.net(torch.cat([x, k[:, None] / 1000], dim=1))


def make_scheduler(solver: str):
    if solver == "ddim":
        return DDIMScheduler(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                             clip_sample=False)
    common = dict(final_sigmas_type="sigma_min", timestep_spacing="trailing", lower_order_final=False)
    if solver == "dpm_solver++":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
    return UniPCMultistepScheduler(solver_type="bh2", solver_order=3, **common)


def integer_grid(scheduler, solver: str, nfe: int) -> list[int]:
    """The scheduler's timesteps plus the final target (k = 0: alphas_cumprod[0])."""
    scheduler.set_timesteps(nfe)
    ks = scheduler.timesteps.tolist()
    if solver == "ddim":
        assert all(a - b == 1000 // nfe for a, b in zip(ks, ks[1:])), ks
    return ks + [0]


def median_time(fn: Callable[[], object]) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_one(model: MLP, x: torch.Tensor, solver: str, nfe: int) -> dict:
    scheduler = make_scheduler(solver)
    ks = integer_grid(scheduler, solver, nfe)
    ns = NoiseScheduleVP("discrete", alphas_cumprod=scheduler.alphas_cumprod.to(torch.float64))
    model_fn = model_wrapper(model, ns, model_type="noise")
    times = (torch.tensor(ks, dtype=torch.float64) + 1) / 1000
    kwargs = dict(order=None if solver == "ddim" else (2 if solver == "dpm_solver++" else 3),
                  lower_order_final=False, variant="bh2")

    def run_diffusers() -> torch.Tensor:
        scheduler.set_timesteps(nfe)
        y = x
        for k in scheduler.timesteps:
            y = scheduler.step(model(y, k), k, y).prev_sample
        return y

    def run_ats() -> torch.Tensor:
        return sample(model_fn, ns, x, times, solver, **kwargs)

    # One schedule per sample: the same grid jittered inside each interval, [B, N+1].
    gaps = times[:-1] - times[1:]
    jitter = 0.2 * (torch.rand(x.shape[0], nfe - 1, dtype=times.dtype) - 0.5) * gaps[1:]
    per_sample = times.repeat(x.shape[0], 1)
    per_sample[:, 1:-1] += jitter

    def run_ats_per_sample() -> torch.Tensor:
        return sample(model_fn, ns, x, per_sample, solver, **kwargs)

    def run_network() -> None:
        for k in ks[:-1]:
            model(x, k)

    t_diff, t_ats, t_net = median_time(run_diffusers), median_time(run_ats), median_time(run_network)
    t_per_sample = median_time(run_ats_per_sample)
    ref = run_diffusers()
    return {
        "solver": solver, "nfe": nfe, "diffusers_ms": 1e3 * t_diff, "ats_ms": 1e3 * t_ats,
        "network_ms": 1e3 * t_net, "ratio_ats_over_diffusers": t_ats / t_diff,
        "ats_per_sample_ms": 1e3 * t_per_sample, "ratio_per_sample_over_global": t_per_sample / t_ats,
        "diffusers_overhead_ms_per_step": 1e3 * (t_diff - t_net) / nfe,
        "ats_overhead_ms_per_step": 1e3 * (t_ats - t_net) / nfe,
        "max_rel_diff": ((run_ats() - ref).abs().max() / ref.abs().max()).item(),
    }


def to_markdown(rows: list[dict]) -> str:
    head = ("| solver | NFE | diffusers ms | ats ms | ats/diffusers | network ms | "
            "diffusers overhead ms/step | ats overhead ms/step | max diff / max abs | "
            "ats per-sample ms | per-sample / global |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['nfe']} | {r['diffusers_ms']:.2f} | {r['ats_ms']:.2f} | "
                     f"{r['ratio_ats_over_diffusers']:.2f} | {r['network_ms']:.2f} | "
                     f"{r['diffusers_overhead_ms_per_step']:.3f} | {r['ats_overhead_ms_per_step']:.3f} | "
                     f"{r['max_rel_diff']:.1e} | {r['ats_per_sample_ms']:.2f} | "
                     f"{r['ratio_per_sample_over_global']:.2f} |")
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def main() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # numpy copy= notice from diffusers
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(BATCH, DIM)
    with torch.no_grad():
        rows = [bench_one(model, x, solver, nfe)
                for solver in ("ddim", "dpm_solver++", "uni_pc") for nfe in NFES]
    setup = {"dim": DIM, "batch": BATCH, "hidden": HIDDEN, "dtype": "float32", "threads": 1,
             "repeats": REPEATS, "warmup": WARMUP, "torch": torch.__version__,
             "python": platform.python_version(), "machine": platform.machine(),
             "dpm_solver++": "order 2 (2M), midpoint", "uni_pc": "bh2, order 3",
             "lower_order_final": False}
    table = to_markdown(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / "solvers.json", json.dumps({"setup": setup, "results": rows}, indent=2) + "\n")
    write_text(RESULTS / "solvers.md", "# ats vs diffusers: solver overhead (median wall time per "
                 "sampling run, CPU)\n\n" + f"Setup: {json.dumps(setup)}\n\n" + table)
    print(table, end="")


if __name__ == "__main__":
    main()
