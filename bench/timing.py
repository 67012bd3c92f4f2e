"""Alternating timing for the benchmarks: the sides of a comparison take turns (a, b, a, b,
...), so a machine that gets busier or quieter during the run slows all of them alike; each
side's median wall time and median process CPU time (which other programs do not inflate)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Timing:
    wall_s: float   # median wall time of one call
    cpu_s: float    # median process CPU time of one call
    last: Any       # what the last call returned (to check that the sides agree)


def alternate(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 0,
              sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Call every function of ``fns`` in turn, ``warmup`` untimed rounds then ``repeats`` timed
    ones; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock is read, so work
    queued on an accelerator is counted where it was queued."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if sync is not None:
                sync()
            t, tc = time.perf_counter(), time.process_time()
            last[name] = fn()
            if sync is not None:
                sync()
            if i >= warmup:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - tc)
    return {name: Timing(statistics.median(wall[name]), statistics.median(cpu[name]), last[name]) for name in fns}
