"""Peak memory and time of one LD3 gradient step through the sampler, with and without checkpointing.

The step is what every iteration of ``fit_ld3`` does: LD3's student (``ats.methods.ld3.Student``:
logits theta, conditioning offsets xi and the latents, all requiring gradients) through N UniPC
steps, the L2 loss to a target, and the backward pass. The targets are random (memory and time
do not depend on them). Cases: each model, NFE 5 and 10, checkpointing off and on
(``NetworkCalls(checkpoint=...)``, the ``checkpoint`` method option), optionally other precisions.

Models: the shipped digits U-Net (0.45M parameters, 1x8x8, batch 64 on the CPU) and a diffusers
UNet2DModel in google/ddpm-cifar10-32's configuration (``speed.DDPM_CIFAR10_32``, 35.7M
parameters, 3x32x32, random weights, seed 0, built in code, nothing downloaded; batch 4 on the
CPU). Their weights are frozen (requires_grad False), as a fit needs them.

What is measured, each case in a fresh process (one untimed warm-up step, then ``repeats``
timed steps; medians):
- peak memory of the step above what was allocated before it. CPU: one step after the warm-up,
  measured alone: the resident set's high-water mark (Linux VmHWM, reset through
  /proc/self/clear_refs) minus the resident set before the step (VmRSS). The process runs with
  glibc's mmap threshold pinned at 64 KiB from its start (MALLOC_MMAP_THRESHOLD_) and the heap
  is trimmed before the step (malloc_trim), so that freed tensors go back to the system and the
  step cannot hide its peak in memory the allocator kept from the step before (nor inflate it
  with a heap laid out by other allocation sizes); it counts everything the step touches
  (tensors, allocator slack, library workspaces). That step is not timed: mapping every tensor
  afresh slows it; the threshold is raised to 32 MiB (glibc's own upper limit) for the timed
  steps. CUDA: torch.cuda.max_memory_allocated during each timed step minus memory_allocated
  before it (tensors; the caching allocator's reserve is not counted).
- kept for backward: the bytes of the distinct tensor storages that autograd keeps for the
  backward pass, the networks' weights left out (they are in memory anyway), counted with
  saved_tensors_hooks on the warm-up step: exact, and the same on any device. With
  checkpointing, what each network call keeps internally is the checkpoint's (recomputed in
  backward) and not counted.
- wall and process CPU time of the step (torch.cuda.synchronize on the GPU).
- the gradient check: the largest difference of theta's gradient between checkpointing off and on.

Precision (in this process, digits only, 256 evaluation seeds, no gradients): how far running the
network under autocast (bf16; on CUDA also fp16) moves UniPC's samples at NFE 5 and 10 on the
logSNR and time_uniform schedules: the mean |x_low - x_fp32| over the mean |x_fp32|, and the mean
L2 distance of each to a 100-step fp32 teacher (logSNR, UniPC).

Run: ``python bench/memory.py [--device cuda]`` from the repository root (about 4 minutes on an
idle CPU, one torch thread); writes bench/results/memory.{json,md} (memory_cuda.{json,md} on
the GPU). ``--quick``: a smoke run with tiny sizes
that writes nothing unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ats.atomic import write_atomic
from ats.discretize import get_timesteps
from ats.losses import get_loss
from ats.methods.ld3 import Student
from ats.models.base import ModelSource
from ats.models.sources import load_source
from ats.params import logits_from_timesteps
from ats.solvers import PRECISIONS, NetworkCalls, sample
from ats.teacher import split_seeds

RESULTS = Path(__file__).resolve().parent / "results"
SOLVER = "uni_pc"
MB = 2 ** 20


@dataclass(frozen=True)
class Case:
    model: str          # "digits" or "cifar10_unet"
    batch: int
    nfe: int
    checkpoint: bool
    precision: str
    repeats: int
    device: str
    threads: int


@dataclass(frozen=True)
class Sizes:
    batch: int
    repeats: int


SIZES = {"cpu": {"digits": Sizes(64, 3), "cifar10_unet": Sizes(4, 3)},
         "cuda": {"digits": Sizes(256, 5), "cifar10_unet": Sizes(32, 5)}}
QUICK = {"digits": Sizes(4, 1), "cifar10_unet": Sizes(1, 1)}


def build(model: str, device: str) -> ModelSource:
    """The model of a case on ``device``, its networks frozen."""
    if model == "digits":
        source = load_source("digits").to(device)
    else:
        from speed import cifar10_sized_unet
        source = cifar10_sized_unet(device)[0]
    for net in source.networks:
        net.requires_grad_(False)
    return source


def proc_status(key: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}; the CPU memory figures need Linux")


MMAP_THRESHOLD = 64 * 1024   # the child's MALLOC_MMAP_THRESHOLD_ while its peak is measured


def libc() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        raise RuntimeError("the CPU memory figures need glibc (libc.so.6) and Linux") from None


def reset_cpu_peak() -> None:
    """Return free heap memory to the system and set the resident set's high-water mark to the
    current resident set (glibc, Linux >= 4.0)."""
    libc().malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def kept_for_backward(fn: Callable[[], torch.Tensor], weights: set[int]) -> tuple[torch.Tensor, int]:
    """fn() and the bytes of the distinct storages autograd keeps for its backward pass, other
    than ``weights`` (storage pointers of the networks' parameters: kept anyway)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            storages[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def run_case(case: Case) -> dict:
    """One case, in this process: the warm-up step (kept for backward), then the timed steps."""
    torch.set_num_threads(case.threads)
    cuda = case.device == "cuda"
    source = build(case.model, case.device)
    ns = source.noise_schedule
    x = source.latents(split_seeds("eval", case.batch), dtype=source.dtype, device=case.device)
    target = 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype).to(x.device)
    student = Student(source, SOLVER, None, calls=NetworkCalls(case.checkpoint, case.precision))
    theta0 = logits_from_timesteps(get_timesteps(ns, "logSNR", case.nfe, dtype=x.dtype), ns).to(case.device)
    loss_fn = get_loss("l2")

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        theta = theta0.clone().requires_grad_(True)
        xi = torch.zeros_like(theta, requires_grad=True)
        unit = (x / student.sigma_T).requires_grad_(True)
        return loss_fn(student(theta, xi, unit, None), target).mean(), theta

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    weights = {t.untyped_storage().data_ptr() for net in source.networks
               for t in (*net.parameters(), *net.buffers())}
    (loss, _), kept = kept_for_backward(forward, weights)
    loss.backward()
    del loss
    peaks, walls, cpus = [], [], []
    if not cuda:   # one step, alone, for the peak (see the module doc)
        gc.collect()
        reset_cpu_peak()
        before = proc_status("VmRSS")
        loss, theta = forward()
        loss.backward()
        peaks.append(proc_status("VmHWM") - before)
        del loss, theta
        libc().mallopt(-3, 32 * 2 ** 20)   # M_MMAP_THRESHOLD: glibc's upper limit, for the timed steps
    for _ in range(case.repeats):
        gc.collect()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        wall, cpu = time.perf_counter(), time.process_time()
        loss, theta = forward()
        loss.backward()
        sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated() - before)
        grad = theta.grad.double().cpu().tolist()
        del loss, theta
    return {**asdict(case), "parameters": sum(p.numel() for n in source.networks for p in n.parameters()),
            "peak_bytes": peaks, "kept_bytes": kept, "wall_s": walls, "cpu_s": cpus,
            "peak_mb": statistics.median(peaks) / MB, "kept_mb": kept / MB, "wall_median_s": statistics.median(walls),
            "cpu_median_s": statistics.median(cpus), "theta_grad": grad}


def in_subprocess(case: Case) -> dict:
    """``run_case`` in a fresh Python process (glibc's mmap threshold pinned on the CPU)."""
    env = dict(os.environ)
    if case.device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(asdict(case))], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def precision_effect(device: str, precisions: list[str], n: int, nfes: list[int]) -> list[dict]:
    """How far each low precision moves the digits samples, per schedule and NFE (module doc)."""
    source = build("digits", device)
    ns = source.noise_schedule
    x = source.latents(split_seeds("eval", n), dtype=source.dtype, device=device)
    l2 = get_loss("l2")
    rows = []
    with torch.no_grad():
        teacher = sample(source.model_fn, ns, x, get_timesteps(ns, "logSNR", 100, dtype=x.dtype), SOLVER)
        for nfe in nfes:
            for kind in ("logSNR", "time_uniform"):
                ts = get_timesteps(ns, kind, nfe, dtype=x.dtype)
                ref = sample(source.model_fn, ns, x, ts, SOLVER)
                for precision in precisions:
                    low = sample(source.model_fn, ns, x, ts, SOLVER, precision=precision)
                    rows.append({"nfe": nfe, "schedule": kind, "precision": precision, "samples": n,
                                 "relative_change": ((low - ref).abs().mean() / ref.abs().mean()).item(),
                                 "l2_to_teacher_fp32": l2(ref, teacher).mean().item(),
                                 "l2_to_teacher_low": l2(low, teacher).mean().item()})
    return rows


def side_by_side(off: dict, on: dict) -> dict:
    """One row: the case without and with checkpointing, their ratios and the gradient check."""
    diff = max(abs(a - b) for a, b in zip(off["theta_grad"], on["theta_grad"]))
    scale = max(abs(a) for a in off["theta_grad"])
    return {"model": off["model"], "parameters": off["parameters"], "batch": off["batch"], "nfe": off["nfe"],
            "precision": off["precision"], "repeats": off["repeats"],
            "peak_mb_off": off["peak_mb"], "peak_mb_on": on["peak_mb"], "peak_ratio": off["peak_mb"] / on["peak_mb"],
            "kept_mb_off": off["kept_mb"], "kept_mb_on": on["kept_mb"], "kept_ratio": off["kept_mb"] / on["kept_mb"],
            "wall_s_off": off["wall_median_s"], "wall_s_on": on["wall_median_s"],
            "wall_ratio": on["wall_median_s"] / off["wall_median_s"],
            "cpu_s_off": off["cpu_median_s"], "cpu_s_on": on["cpu_median_s"],
            "cpu_ratio": on["cpu_median_s"] / off["cpu_median_s"],
            "grad_max_abs_diff": diff, "grad_max_abs": scale}


def to_markdown(results: dict) -> str:
    setup = results["setup"]
    where = setup.get("gpu", "CPU") if setup["device"] == "cuda" else f"CPU, {setup['threads']} torch threads"
    peak = ("torch.cuda.max_memory_allocated during the step minus memory_allocated before it"
            if setup["device"] == "cuda" else
            "resident set high-water mark during one step after the warm-up minus the resident set before it "
            "(Linux VmHWM - VmRSS; glibc mmap threshold pinned at 64 KiB from the start, heap trimmed first)")
    lines = ["# Memory: one LD3 gradient step through the sampler, checkpointing off and on", "",
             f"{SOLVER}, LD3's student (theta, xi and the latents require gradients), L2 loss, forward and backward; "
             f"{where}; each case in a fresh process, one warm-up step, medians of the timed steps. "
             f"Peak: {peak}. Kept: bytes autograd keeps for the backward pass (distinct storages, the weights "
             "left out). "
             "Ratios: off / on for memory, on / off for time. Grad diff: the largest difference of theta's gradient "
             "between off and on (largest |gradient| in brackets).", "",
             f"Setup: {json.dumps(setup)}", "",
             "| model | batch | NFE | precision | peak MB off | peak MB on | peak off/on | kept MB off | kept MB on "
             "| kept off/on | wall s off | wall s on | wall on/off | CPU s on/off | grad diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} ({r['parameters'] / 1e6:.2f}M) | {r['batch']} | {r['nfe']} | {r['precision']} | "
                     f"{r['peak_mb_off']:.1f} | {r['peak_mb_on']:.1f} | **{r['peak_ratio']:.2f}x** | "
                     f"{r['kept_mb_off']:.1f} | {r['kept_mb_on']:.2f} | {r['kept_ratio']:.0f}x | "
                     f"{r['wall_s_off']:.2f} | {r['wall_s_on']:.2f} | {r['wall_ratio']:.2f} | {r['cpu_ratio']:.2f} | "
                     f"{r['grad_max_abs_diff']:.1e} ({r['grad_max_abs']:.1e}) |")
    if results["precision"]:
        n = results["precision"][0]["samples"]
        lines += ["", f"## Precision: digits, {SOLVER}, {n} evaluation seeds, the network under autocast", "",
                  "Relative change: mean |x_low - x_fp32| / mean |x_fp32|. L2: mean distance to a 100-step fp32 "
                  "teacher (logSNR).", "",
                  "| NFE | schedule | precision | relative change | L2 fp32 | L2 low precision |",
                  "|---|---|---|---|---|---|"]
        for r in results["precision"]:
            lines.append(f"| {r['nfe']} | {r['schedule']} | {r['precision']} | {100 * r['relative_change']:.2f} % | "
                         f"{r['l2_to_teacher_fp32']:.4f} | {r['l2_to_teacher_low']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", default="digits,cifar10_unet", help="comma-separated: digits, cifar10_unet")
    p.add_argument("--nfes", default="5,10", help="comma-separated NFEs")
    p.add_argument("--precisions", default=None,
                   help="comma-separated of fp32, bf16, fp16 (default fp32 on the CPU, fp32,bf16 on CUDA)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine two threads that wait for each other "
                        "can make a step many times slower)")
    p.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes (writes only with --out)")
    p.add_argument("--out", type=Path, default=None, help="folder of memory.{json,md} (default bench/results)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)   # internal: run one case, print its JSON
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)   # numpy copy= notice from diffusers
    if args.case is not None:
        print(json.dumps(run_case(Case(**json.loads(args.case)))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine; run without it for the CPU")
    models = args.models.split(",")
    nfes = [2] if args.quick else [int(n) for n in args.nfes.split(",")]
    precisions = (args.precisions or ("fp32,bf16" if args.device == "cuda" else "fp32")).split(",")
    bad = [m for m in models if m not in SIZES["cpu"]] + [q for q in precisions if q not in PRECISIONS]
    if bad:
        raise SystemExit(f"unknown model or precision {', '.join(bad)}")
    try:
        for name in precisions:
            NetworkCalls(precision=name).check(args.device)   # fp16 on the CPU: refused here, not in a child
    except ValueError as e:
        raise SystemExit(f"--precisions: {e}") from None
    began = time.perf_counter()
    setup = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
             "cpus": os.cpu_count(), "threads": args.threads, "device": args.device, "quick": args.quick,
             "solver": SOLVER, "load_average_1min_start": os.getloadavg()[0]}
    if args.device == "cuda":
        setup["gpu"] = torch.cuda.get_device_name()
    cases, rows = [], []
    for model in models:
        size = QUICK[model] if args.quick else SIZES[args.device][model]
        for nfe in nfes:
            for precision in precisions:
                pair = [in_subprocess(Case(model, size.batch, nfe, checkpoint, precision, size.repeats, args.device,
                                           args.threads)) for checkpoint in (False, True)]
                cases += pair
                rows.append(side_by_side(*pair))
                print(f"{model} NFE {nfe} {precision}: peak {pair[0]['peak_mb']:.1f} -> {pair[1]['peak_mb']:.1f} MB, "
                      f"{pair[0]['wall_median_s']:.2f} -> {pair[1]['wall_median_s']:.2f} s", flush=True)
    torch.set_num_threads(args.threads)
    low = ["bf16"] + (["fp16"] if args.device == "cuda" else [])
    if args.device == "cuda" and not torch.cuda.is_bf16_supported():
        low = ["fp16"]
    effect = precision_effect(args.device, low, 16 if args.quick else 256, nfes)
    setup |= {"load_average_1min_end": os.getloadavg()[0], "seconds": time.perf_counter() - began}
    results = {"setup": setup, "rows": rows, "cases": cases, "precision": effect}
    md = to_markdown(results)
    print(md, end="")
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        body = json.dumps(results, indent=2) + "\n"
        stem = "memory" if args.device == "cpu" else f"memory_{args.device}"
        write_atomic(out / f"{stem}.json", lambda tmp: tmp.write_text(body))
        write_atomic(out / f"{stem}.md", lambda tmp: tmp.write_text(md))


if __name__ == "__main__":
    main()
