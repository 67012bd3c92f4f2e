"""Wall time of the batched oracle, of sampling with a predictor, and of ats against diffusers.

(a) Oracle: ats's batched per-sample fit (``fit_oracle``: one [B, N+1] logit tensor, one solver
    call per iteration) against a Python loop that fits each sample alone (what the published
    per-sample code does), on 64 training samples with their teacher targets (UniPC 20 NFE edm,
    cached), DPM-Solver++ at NFE 5, the same Adam, learning rate and iterations each way and no
    restarts. Wall time of each, the ratio, and the mean of each sample's best loss.
(b) Predictor overhead: sampling 256 latents with a one-shot and with a delta predictor against
    plain sampling (logSNR schedule), DPM-Solver++ at NFE 3, 5 and 10. The predictors are
    untrained, at the automatic width: their zero-initialised heads return the logSNR schedule,
    so the three give the same samples (checked), and a trained predictor costs the same.
(c) ``ats.solvers.sample`` against a diffusers ``DPMSolverMultistepScheduler`` loop at NFE 10,
    batch 256: the same network and integer timesteps (ats time t = (k + 1) / 1000, the last step
    to k = 0, see tests/test_diffusers_agreement.py), ``lower_order_final`` off in diffusers (ats
    lowers no order at 10 steps). The bare network's forward calls at the same timesteps give the
    physical limit: its throughput divided by the NFE, in images per second.

On the shipped digits U-Net, CPU, one torch thread (``--threads``). ``--device cuda`` adds the
same on the GPU with a randomly initialised diffusers UNet2DModel in the google/ddpm-cifar10-32
configuration (35.7M parameters, built here, nothing downloaded), and says so and skips it when
CUDA is absent. Timed calls alternate between the sides of each comparison (bench/timing.py);
the tables give medians.

Run: ``python bench/speed.py [--device cuda]`` from the repository root; writes
bench/results/speed.{json,md} and prints the tables. ``--quick``: a smoke run with tiny sizes
that writes nothing unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import DPMSolverMultistepScheduler
from torch import Tensor

from ats.atomic import write_atomic
from ats.discretize import get_timesteps
from ats.methods.oracle import fit_oracle
from ats.methods.predictors import DeltaPredictor, OneShotPredictor, PredictorSampler, auto_width
from ats.models import model_wrapper
from ats.models.base import ModelSource
from ats.models.sources import load_source
from ats.noise import NoiseScheduleVP
from ats.solvers import sample
from ats.teacher import DEFAULT_CACHE, TeacherConfig, TeacherData, generate_teacher, split_seeds
from timing import alternate

RESULTS = Path(__file__).resolve().parent / "results"
SOLVER, ORACLE_NFE, ORACLE_LR = "dpm_solver++", 5, 0.05
# Both models' training schedule: DDPM's linear betas 1e-4..0.02 over 1000 steps.
DDPM_BETAS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
# google/ddpm-cifar10-32's config.json, as UNet2DModel arguments (35,746,307 parameters).
DDPM_CIFAR10_32 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None,
    act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional")
Network = Callable[[Tensor, Tensor], Tensor]   # (x, integer timestep k) -> eps
Sync = Callable[[], None] | None               # torch.cuda.synchronize on the GPU


@dataclass(frozen=True)
class Settings:
    oracle_samples: int = 64
    oracle_iterations: int = 40
    oracle_repeats: int = 3       # alternating runs of each oracle fit
    batch: int = 256              # latents sampled in (b) and (c)
    repeats: int = 40             # alternating timed calls in (b) and (c)
    warmup: int = 3
    nfes: tuple[int, ...] = (3, 5, 10)
    diffusers_nfe: int = 10


DIGITS = Settings()
UNET = Settings(oracle_iterations=10)    # a loop of 64 fits of the big U-Net takes minutes per run
QUICK = Settings(oracle_samples=4, oracle_iterations=2, oracle_repeats=1, batch=8, repeats=2, warmup=1)


def one_sample(data: TeacherData, i: int) -> TeacherData:
    return TeacherData(*(None if v is None else v[i:i + 1] for v in data))


def oracle_vs_loop(source: ModelSource, data: TeacherData, s: Settings, sync: Sync) -> dict:
    """(a): the batched fit and the loop of single-sample fits, alternating."""
    fit = dict(solver=SOLVER, steps=ORACLE_NFE, iterations=s.oracle_iterations, lr=ORACLE_LR, restarts=0)
    t = alternate({"batched": lambda: fit_oracle(source, data, **fit),
                   "loop": lambda: [fit_oracle(source, one_sample(data, i), **fit) for i in range(len(data.seeds))]},
                  s.oracle_repeats, sync=sync)
    batched, loop = t["batched"].last, t["loop"].last
    return {"samples": len(data.seeds), "solver": SOLVER, "nfe": ORACLE_NFE, "iterations": s.oracle_iterations,
            "optimizer": "adam", "lr": ORACLE_LR, "repeats": s.oracle_repeats,
            "batched_s": t["batched"].wall_s, "loop_s": t["loop"].wall_s,
            "batched_cpu_s": t["batched"].cpu_s, "loop_cpu_s": t["loop"].cpu_s,
            "ratio_loop_over_batched": t["loop"].wall_s / t["batched"].wall_s,
            "start_loss": statistics.fmean(batched.info["start_loss"]),
            "batched_loss": statistics.fmean(batched.info["loss"]),
            "loop_loss": statistics.fmean(r.info["loss"][0] for r in loop)}


def predictor_overhead(source: ModelSource, x: Tensor, nfe: int, s: Settings, sync: Sync) -> dict:
    """(b) at one NFE: plain, one-shot and delta sampling, alternating."""
    ns = source.noise_schedule
    ts = get_timesteps(ns, "logSNR", nfe, dtype=x.dtype, device=x.device)
    oneshot = PredictorSampler(OneShotPredictor(source.shape, nfe, torch.zeros(nfe + 1)).to(x.device).eval(),
                               source, SOLVER, None)
    delta = PredictorSampler(DeltaPredictor(source.shape, nfe).to(x.device).eval(), source, SOLVER, None)
    with torch.no_grad():
        t = alternate({"plain": lambda: sample(source.model_fn, ns, x, ts, SOLVER),
                       "oneshot": lambda: oneshot(x)[0], "delta": lambda: delta(x)[0]}, s.repeats, s.warmup, sync)
    plain = t["plain"]
    row = {"nfe": nfe, "plain_ms": 1e3 * plain.wall_s, "plain_cpu_ms": 1e3 * plain.cpu_s}
    for name in ("oneshot", "delta"):
        row |= {f"{name}_ms": 1e3 * t[name].wall_s, f"{name}_cpu_ms": 1e3 * t[name].cpu_s,
                f"{name}_overhead_pct": 100 * (t[name].wall_s / plain.wall_s - 1),
                f"{name}_overhead_cpu_pct": 100 * (t[name].cpu_s / plain.cpu_s - 1),
                f"{name}_max_abs_diff": (t[name].last - plain.last).abs().max().item()}
    return row


def ats_vs_diffusers(source: ModelSource, network: Network, x: Tensor, s: Settings, sync: Sync) -> dict:
    """(c): ats, the diffusers loop and the bare network calls, alternating."""
    nfe = s.diffusers_nfe
    scheduler = DPMSolverMultistepScheduler(**DDPM_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                            final_sigmas_type="sigma_min", lower_order_final=False)
    scheduler.set_timesteps(nfe, device=x.device)
    ks = scheduler.timesteps
    times = (torch.cat([ks.cpu(), torch.zeros(1, dtype=ks.dtype)]).to(torch.float64) + 1) / 1000

    def run_diffusers() -> Tensor:
        scheduler.set_timesteps(nfe, device=x.device)
        y = x
        for k in scheduler.timesteps:
            y = scheduler.step(network(y, k), k, y).prev_sample
        return y

    def run_network() -> None:
        for k in ks:
            network(x, k)

    with torch.no_grad():
        t = alternate({"diffusers": run_diffusers, "ats": lambda: sample(source.model_fn, source.noise_schedule, x,
                                                                          times, SOLVER),
                       "network": run_network}, s.repeats, s.warmup, sync)
    d, a, net = t["diffusers"], t["ats"], t["network"]
    b = x.shape[0]
    return {"nfe": nfe, "batch": b, "timesteps": ks.tolist(), "diffusers_ms": 1e3 * d.wall_s, "ats_ms": 1e3 * a.wall_s,
            "network_ms": 1e3 * net.wall_s, "ratio_ats_over_diffusers": a.wall_s / d.wall_s,
            "diffusers_overhead_ms_per_step": 1e3 * (d.wall_s - net.wall_s) / nfe,
            "ats_overhead_ms_per_step": 1e3 * (a.wall_s - net.wall_s) / nfe,
            "ats_images_per_s": b / a.wall_s, "diffusers_images_per_s": b / d.wall_s,
            "limit_images_per_s": b / net.wall_s, "ats_over_limit": net.wall_s / a.wall_s,
            "max_rel_diff": ((a.last - d.last).abs().max() / d.last.abs().max()).item()}


def section(source: ModelSource, network: Network, s: Settings, device: str, cache: Path) -> dict:
    """(a), (b) and (c) on one model."""
    sync: Sync = torch.cuda.synchronize if device == "cuda" else None
    data = generate_teacher(source, split_seeds("train", s.oracle_samples), TeacherConfig(), cache,
                            dtype=source.dtype, device=device).to(device)
    x = source.latents(split_seeds("eval", s.batch), dtype=source.dtype, device=device)
    params = sum(p.numel() for net in source.networks for p in net.parameters())
    out = {"model": source.name, "parameters": params, "device": device, "settings": asdict(s),
           "predictor_width": auto_width(source.shape)}
    out["oracle"] = oracle_vs_loop(source, data, s, sync)
    out["predictor_overhead"] = [predictor_overhead(source, x, nfe, s, sync) for nfe in s.nfes]
    out["diffusers"] = ats_vs_diffusers(source, network, x, s, sync)
    return out


def digits() -> tuple[ModelSource, Network]:
    source = load_source("digits")
    net = source.networks[0]
    return source, lambda x, k: net(x, k)


def cifar10_sized_unet(device: str) -> tuple[ModelSource, Network]:
    """A UNet2DModel with google/ddpm-cifar10-32's configuration and random weights (seed 0)."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(**DDPM_CIFAR10_32).to(device).eval().requires_grad_(False)
    ns = NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))

    def network(x: Tensor, k: Tensor) -> Tensor:
        return unet(x, k).sample

    def no_fid():
        raise ValueError("the cifar10-sized U-Net has random weights: no FID")

    source = ModelSource("ddpm-cifar10-32-config-random-weights", lambda labels: model_wrapper(network, ns), ns,
                         (3, 32, 32), "ddpm-cifar10-32 config, random weights, seed 0", no_fid, networks=(unet,))
    return source, network


def to_markdown(results: dict) -> str:
    lines = ["# Speed: batched oracle, predictor overhead, ats against diffusers (medians of alternating calls)",
             "", f"Setup: {json.dumps(results['setup'])}"]
    for key, sec in results["models"].items():
        if "skipped" in sec:
            lines += ["", f"## {key}", "", sec["skipped"]]
            continue
        s, o, c = sec["settings"], sec["oracle"], sec["diffusers"]
        diff = max(r[f"{name}_max_abs_diff"] for r in sec["predictor_overhead"] for name in ("oneshot", "delta"))
        lines += ["", f"## {sec['model']} ({sec['parameters'] / 1e6:.2f}M parameters), {sec['device']}", "",
                  f"(a) Oracle: {o['samples']} training samples, {o['solver']} NFE {o['nfe']}, {o['iterations']} "
                  f"Adam iterations (lr {o['lr']}) each way, median of {o['repeats']} alternating runs; mean loss "
                  f"of the start (logSNR) schedule {o['start_loss']:.4f}.", "",
                  "| fit | wall s | CPU s | mean best loss |", "|---|---|---|---|",
                  f"| batched, one [{o['samples']}, {o['nfe'] + 1}] tensor | {o['batched_s']:.2f} | "
                  f"{o['batched_cpu_s']:.2f} | {o['batched_loss']:.4f} |",
                  f"| loop over {o['samples']} samples | {o['loop_s']:.2f} | {o['loop_cpu_s']:.2f} | "
                  f"{o['loop_loss']:.4f} |", "",
                  f"Loop / batched: **{o['ratio_loop_over_batched']:.2f}x**.", "",
                  f"(b) Predictor overhead: {s['batch']} samples, {SOLVER}, untrained predictors of width "
                  f"{sec['predictor_width']}, median of {s['repeats']} alternating calls; in brackets the same in "
                  "process CPU time. Both predictors return the logSNR schedule, so their samples are plain "
                  f"sampling's (largest difference {diff:.1e}).", "",
                  "| NFE | plain ms | one-shot ms | one-shot overhead | delta ms | delta overhead |",
                  "|---|---|---|---|---|---|"]
        for r in sec["predictor_overhead"]:
            lines.append(f"| {r['nfe']} | {r['plain_ms']:.1f} | {r['oneshot_ms']:.1f} | "
                         f"{r['oneshot_overhead_pct']:+.1f} % ({r['oneshot_overhead_cpu_pct']:+.1f} %) | "
                         f"{r['delta_ms']:.1f} | {r['delta_overhead_pct']:+.1f} % "
                         f"({r['delta_overhead_cpu_pct']:+.1f} %) |")
        lines += ["", f"(c) ats against diffusers: DPMSolverMultistepScheduler loop, {SOLVER} (2M), NFE {c['nfe']}, "
                  f"batch {c['batch']}, timesteps {c['timesteps']} + [0], median of {s['repeats']} alternating calls; "
                  "the limit is the bare network's forward throughput divided by the NFE.", "",
                  "| diffusers ms | ats ms | ats / diffusers | network ms | diffusers img/s | ats img/s | "
                  "limit img/s | ats / limit | max diff / max abs |", "|---|---|---|---|---|---|---|---|---|",
                  f"| {c['diffusers_ms']:.1f} | {c['ats_ms']:.1f} | **{c['ratio_ats_over_diffusers']:.3f}** | "
                  f"{c['network_ms']:.1f} | {c['diffusers_images_per_s']:.4g} | {c['ats_images_per_s']:.4g} | "
                  f"{c['limit_images_per_s']:.4g} | {c['ats_over_limit']:.3f} | {c['max_rel_diff']:.1e} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: also the cifar10-sized U-Net on the GPU (the digits figures stay on the CPU)")
    p.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes (writes only with --out)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--cache", type=Path, default=Path(DEFAULT_CACHE), help="digits teacher cache")
    p.add_argument("--out", type=Path, default=None, help="folder of speed.{json,md} (default bench/results)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # numpy copy= notice from diffusers
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    setup = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
             "cpus": os.cpu_count(), "threads": args.threads, "quick": args.quick,
             "load_average_1min_start": os.getloadavg()[0]}
    models = {"digits": section(*digits(), QUICK if args.quick else DIGITS, "cpu", args.cache)}
    if args.device == "cuda":
        if torch.cuda.is_available():
            setup["gpu"] = torch.cuda.get_device_name()
            with tempfile.TemporaryDirectory() as cache:   # random weights: a teacher nobody reuses
                models["cifar10_unet"] = section(*cifar10_sized_unet("cuda"), QUICK if args.quick else UNET, "cuda",
                                                 Path(cache))
        else:
            msg = "CUDA is not available on this machine: the cifar10-sized U-Net part was skipped."
            print(msg)
            models["cifar10_unet"] = {"skipped": msg}
    setup |= {"load_average_1min_end": os.getloadavg()[0], "seconds": time.perf_counter() - began}
    results = {"setup": setup, "models": models}
    md = to_markdown(results)
    print(md, end="")
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        body = json.dumps(results, indent=2) + "\n"
        write_atomic(out / "speed.json", lambda tmp: tmp.write_text(body))
        write_atomic(out / "speed.md", lambda tmp: tmp.write_text(md))


if __name__ == "__main__":
    main()
