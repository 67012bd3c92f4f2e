"""Teacher targets: x_T from each sample's own seed and the teacher solver's output x0*.

Cache layout: ``<cache>/<key>/manifest.json`` and ``block-<b>.pt`` shards, where the key
hashes everything that decides a target (model identity, solver, order, NFE,
discretization, dtype, format version) and block b holds seeds [b * S, (b + 1) * S).
Shards are written to a temporary file and renamed, so a run killed at any moment leaves
only whole shards; a rerun computes only the missing blocks, and an identical call none.
A shard that cannot be read, or holds other seeds or shapes than its block's (copied from
elsewhere), is recomputed with a warning, never used.
Seed ranges of the splits are disjoint, so training, validation and evaluation never share
a sample.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .atomic import write_atomic
from .discretize import get_timesteps
from .models.base import ModelSource
from .solvers import near_nfes, sample, solver_spec, steps_for_nfe

FORMAT_VERSION = 1
DEFAULT_CACHE = ".ats-cache/teacher"   # where teacher targets are cached unless told otherwise
SPLIT_OFFSETS = {"train": 0, "valid": 10_000_000, "eval": 20_000_000, "select": 30_000_000}
SPLIT_SIZE = 10_000_000
SHARD_KEYS = ("seeds", "latents", "targets", "labels")
log = logging.getLogger(__name__)


def split_seeds(split: str, n: int, start: int = 0) -> range:
    """Seeds of samples start..start+n-1 of a split; splits never overlap."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_OFFSETS)}")
    if n < 1 or start < 0 or start + n > SPLIT_SIZE:
        raise ValueError(f"need 1 <= n and 0 <= start, start + n <= {SPLIT_SIZE}; got n={n}, start={start}")
    return range(SPLIT_OFFSETS[split] + start, SPLIT_OFFSETS[split] + start + n)


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher solver: defaults are LD3's (UniPC, 20 NFE, EDM discretization)."""
    solver: str = "uni_pc"
    nfe: int = 20
    discretization: str = "edm"
    order: int | None = None

    def timesteps(self, source: ModelSource) -> Tensor:
        spec, _ = solver_spec(self.solver, self.order)
        steps = steps_for_nfe(self.solver, self.nfe)
        if steps is None:
            raise ValueError(f"solver {self.solver} cannot spend exactly {self.nfe} network calls; it can spend "
                             f"{near_nfes(self.solver, self.nfe)}")
        return get_timesteps(source.noise_schedule, self.discretization, steps)


class TeacherData(NamedTuple):
    seeds: Tensor          # [n]
    latents: Tensor        # x_T, [n, ...]
    targets: Tensor        # x0*, [n, ...]
    labels: Tensor | None  # [n] for conditional models

    def to(self, device: torch.device | str | None) -> "TeacherData":
        return TeacherData(*(None if v is None else v.to(device) for v in self))

    def first(self, n: int) -> "TeacherData":
        """The first ``n`` samples."""
        return TeacherData(*(None if v is None else v[:n] for v in self))


def cache_key(source: ModelSource, config: TeacherConfig, dtype: torch.dtype) -> dict:
    return {"format": FORMAT_VERSION, "model": source.identity, "name": source.name,
            "teacher": asdict(config), "dtype": str(dtype)}


def teacher_dir(source: ModelSource, config: TeacherConfig, cache: str | Path,
                dtype: torch.dtype = torch.float32) -> Path:
    """The cache directory of this (model, teacher); created with its manifest, or checked
    against it when it exists."""
    key = cache_key(source, config, dtype)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache) / digest
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"teacher cache manifest {manifest} is unreadable; delete {root} to rebuild it") from None
        if found != key:
            raise ValueError(f"teacher cache {root} was written by another model or ats version "
                             f"({found.get('name')}, format {found.get('format')}); delete {root} to rebuild it")
    else:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"teacher cache {cache}: cannot create {root} ({e.strerror}); choose another --cache "
                             "folder") from None
        write_atomic(manifest, lambda tmp: tmp.write_text(json.dumps(key, indent=2, sort_keys=True)))
    return root


def _compute_block(source: ModelSource, timesteps: Tensor, config: TeacherConfig, seeds: range,
                   dtype: torch.dtype, device: torch.device | str | None) -> dict:
    latents = source.latents(seeds, dtype=dtype)
    labels = source.labels(seeds)
    model_fn = source.model_fn_for(None if labels is None else labels.to(device))
    with torch.no_grad():
        targets = sample(model_fn, source.noise_schedule, latents.to(device), timesteps.to(device),
                         config.solver, order=config.order).cpu()
    if not torch.isfinite(targets).all():
        bad = [s for s, ok in zip(seeds, torch.isfinite(targets).flatten(1).all(1)) if not ok]
        raise ValueError(f"the teacher produced NaN or inf for seeds {bad[:5]}: the model output is not "
                         f"finite there; check the model and the teacher settings ({config})")
    return {"seeds": torch.tensor(list(seeds)), "latents": latents, "targets": targets, "labels": labels}


def _shard_problem(data: object, seeds: range, shape: tuple[int, ...]) -> str | None:
    """What is wrong with a loaded shard of block ``seeds``, or None when it is that block's."""
    if not isinstance(data, dict) or set(data) != set(SHARD_KEYS):
        return f"it does not hold {', '.join(SHARD_KEYS)}"
    stored = data["seeds"]
    if not torch.is_tensor(stored) or stored.tolist() != list(seeds):
        return f"it holds other seeds than {seeds.start}..{seeds.stop - 1} (copied from another block or cache?)"
    for key in ("latents", "targets"):
        value = data[key]
        if not torch.is_tensor(value) or tuple(value.shape) != (len(seeds), *shape):
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            return f"its {key} have shape {got}, not {(len(seeds), *shape)}"
    if not torch.isfinite(data["targets"]).all():
        return "its targets hold NaN or inf"
    return None


def _read_shard(path: Path, seeds: range, shape: tuple[int, ...]) -> dict | None:
    """The shard at ``path`` if it is whole and holds block ``seeds``; None (with a warning
    for a bad one) when it must be computed."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        problem = f"it is unreadable ({type(e).__name__})"
    else:
        problem = _shard_problem(data, seeds, shape)
    if problem is None:
        return data
    log.warning(f"teacher shard {path} is not used: {problem}; recomputing that block")
    return None


def generate_teacher(source: ModelSource, seeds: range, config: TeacherConfig = TeacherConfig(),
                     cache: str | Path = DEFAULT_CACHE, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None, block_size: int = 100,
                     progress: Callable[[int], None] | None = None) -> TeacherData:
    """Teacher data for ``seeds`` (a range), computing only the blocks not yet on disk.
    ``progress(k)`` is told of every k samples covered (cached or computed)."""
    if not isinstance(seeds, range) or seeds.step != 1 or len(seeds) == 0:
        raise ValueError("seeds must be a non-empty range of consecutive integers (see split_seeds)")
    root = teacher_dir(source, config, cache, dtype)
    timesteps = config.timesteps(source)
    parts = []
    for block in range(seeds.start // block_size, (seeds.stop - 1) // block_size + 1):
        path = root / f"block-{block}-of-{block_size}.pt"
        block_seeds = range(block * block_size, (block + 1) * block_size)
        data = _read_shard(path, block_seeds, source.shape)
        if data is None:
            data = _compute_block(source, timesteps, config, block_seeds, dtype, device)
            write_atomic(path, lambda tmp: torch.save(data, tmp))
        lo, hi = max(seeds.start, block_seeds.start), min(seeds.stop, block_seeds.stop)
        sl = slice(lo - block_seeds.start, hi - block_seeds.start)
        parts.append({k: (v[sl] if v is not None else None) for k, v in data.items()})
        if progress is not None:
            progress(hi - lo)
    labels = None if parts[0]["labels"] is None else torch.cat([p["labels"] for p in parts])
    return TeacherData(torch.cat([p["seeds"] for p in parts]), torch.cat([p["latents"] for p in parts]),
                       torch.cat([p["targets"] for p in parts]), labels)
