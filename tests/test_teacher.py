"""The teacher cache: content-addressed, atomic, resumable, reproducible from seeds."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ats.discretize import get_timesteps
from ats.models.gmm import gmm_source
from ats.solvers import sample
from ats.teacher import SPLIT_OFFSETS, TeacherConfig, generate_teacher, split_seeds, teacher_dir

ROOT = Path(__file__).resolve().parents[1]


def counting_source(**kwargs):
    """The gmm source with a count of network calls (to see what the cache saves)."""
    source = gmm_source(dim=4, components=3, **kwargs)
    inner, calls = source.model_fn_for, []

    def model_fn_for(labels):
        fn = inner(labels)
        return lambda x, t: calls.append(x.shape[0]) or fn(x, t)
    source.model_fn_for = model_fn_for
    return source, calls


def test_targets_match_the_teacher_solver_from_each_seed(tmp_path):
    source, _ = counting_source()
    config = TeacherConfig(solver="uni_pc", nfe=8, discretization="edm")
    seeds = split_seeds("valid", 30, start=5)
    data = generate_teacher(source, seeds, config, tmp_path, dtype=torch.float64, block_size=16)
    assert data.seeds.tolist() == list(seeds) and data.labels is None
    # Sample 17 regenerated alone from its own seed.
    i = 17
    x = source.latents([seeds[i]], dtype=torch.float64)
    torch.testing.assert_close(data.latents[i:i + 1], x)
    ts = get_timesteps(source.noise_schedule, "edm", 8)
    torch.testing.assert_close(data.targets[i:i + 1], sample(source.model_fn, source.noise_schedule, x, ts, "uni_pc"))


def test_second_call_computes_nothing_and_rerun_resumes(tmp_path):
    source, calls = counting_source()
    config = TeacherConfig(nfe=5)
    seeds = split_seeds("train", 40)
    first = generate_teacher(source, seeds, config, tmp_path, block_size=16)
    assert sum(calls) == 48 * 5  # three blocks of 16, five calls each
    calls.clear()
    again = generate_teacher(source, seeds, config, tmp_path, block_size=16)
    assert calls == [] and torch.equal(first.targets, again.targets)
    # A smaller request is served from the same blocks; a lost block is recomputed alone.
    subset = generate_teacher(source, split_seeds("train", 10, start=3), config, tmp_path, block_size=16)
    assert calls == [] and torch.equal(subset.targets, first.targets[3:13])
    shards = sorted(teacher_dir(source, config, tmp_path).glob("block-*.pt"))
    assert len(shards) == 3
    shards[1].unlink()
    resumed = generate_teacher(source, seeds, config, tmp_path, block_size=16)
    assert sum(calls) == 16 * 5 and torch.equal(resumed.targets, first.targets)


def test_cache_of_another_model_or_version_is_refused(tmp_path):
    source, _ = counting_source()
    config = TeacherConfig(nfe=5)
    root = teacher_dir(source, config, tmp_path)
    manifest = root / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format": 1', '"format": 0'))
    with pytest.raises(ValueError, match="written by another model or ats version.*delete"):
        generate_teacher(source, split_seeds("train", 4), config, tmp_path)
    other, _ = counting_source(seed=1)
    assert teacher_dir(other, config, tmp_path) != root


def shard_files(source, config, cache) -> list[Path]:
    return sorted(teacher_dir(source, config, cache).glob("block-*.pt"), key=lambda p: int(p.name.split("-")[1]))


@pytest.mark.parametrize("damage, reason", [
    (lambda shard, _: shard.write_bytes(b"not a torch file"), "it is unreadable"),
    (lambda shard, _: shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2]), "it is unreadable"),
    (lambda shard, other: shard.write_bytes(other.read_bytes()), "it holds other seeds than 4..7"),
    (lambda shard, _: torch.save({"seeds": torch.arange(4, 8)}, shard), "it does not hold seeds, latents"),
])
def test_bad_shard_is_recomputed_with_a_warning(tmp_path, caplog, damage, reason):
    source, calls = counting_source()
    config = TeacherConfig(nfe=5)
    seeds = split_seeds("train", 12)
    first = generate_teacher(source, seeds, config, tmp_path, block_size=4)
    shards = shard_files(source, config, tmp_path)
    damage(shards[1], shards[0])
    calls.clear()
    with caplog.at_level("WARNING", logger="ats.teacher"):
        again = generate_teacher(source, seeds, config, tmp_path, block_size=4)
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"teacher shard {shards[1]} is not used: {reason}")
    assert message.endswith("; recomputing that block") and "\n" not in message
    assert sum(calls) == 4 * 5   # that block alone
    assert torch.equal(again.seeds, first.seeds) and torch.equal(again.targets, first.targets)
    assert torch.load(shards[1], weights_only=True)["seeds"].tolist() == [4, 5, 6, 7]   # rewritten whole
    calls.clear()
    generate_teacher(source, seeds, config, tmp_path, block_size=4)
    assert calls == []


def test_shard_of_another_shape_is_recomputed(tmp_path, caplog):
    source, _ = counting_source()
    config = TeacherConfig(nfe=5)
    generate_teacher(source, split_seeds("train", 4), config, tmp_path, block_size=4)
    shard = shard_files(source, config, tmp_path)[0]
    data = torch.load(shard, weights_only=True)
    torch.save({**data, "targets": data["targets"][:, :2]}, shard)
    with caplog.at_level("WARNING", logger="ats.teacher"):
        generate_teacher(source, split_seeds("train", 4), config, tmp_path, block_size=4)
    assert "its targets have shape (4, 2), not (4, 4); recomputing that block" in caplog.text


def test_splits_are_disjoint_and_bad_requests_fail():
    ranges = [set(split_seeds(s, 1000)) for s in SPLIT_OFFSETS]
    assert all(not (a & b) for i, a in enumerate(ranges) for b in ranges[i + 1:])
    with pytest.raises(ValueError, match="unknown split 'test'"):
        split_seeds("test", 5)
    with pytest.raises(ValueError, match="cannot spend exactly 4"):
        TeacherConfig(solver="heun", nfe=4).timesteps(gmm_source(dim=2))


def test_nan_model_output_is_reported_and_nothing_written(tmp_path):
    source, _ = counting_source()
    source.model_fn_for = lambda labels: (lambda x, t: x * float("nan"))
    with pytest.raises(ValueError, match="NaN or inf for seeds"):
        generate_teacher(source, split_seeds("train", 4), TeacherConfig(nfe=3), tmp_path)
    assert not list(tmp_path.rglob("block-*"))


def test_killed_run_leaves_whole_shards_and_resumes(tmp_path):
    """SIGKILL a real `ats teacher` run mid-way; the rerun finishes with the same targets."""
    cmd = [sys.executable, str(ROOT / "cli.py"), "teacher", "--dataset", "gmm", "--preset", "64d",
           "--nfe", "100", "--n", "1500", "--cache", str(tmp_path / "a")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "a").rglob("block-*.pt"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list((tmp_path / "a").rglob("block-*.pt"))
    assert 3 <= len(done) < 15, "the run was not killed mid-way"
    for shard in done:
        torch.load(shard, weights_only=True)  # every shard on disk is whole
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    fresh = cmd[:-1] + [str(tmp_path / "b")]
    subprocess.run(fresh, check=True, capture_output=True, cwd=ROOT)
    source = gmm_source(dim=64, components=16)
    config = TeacherConfig(nfe=100)
    a = generate_teacher(source, split_seeds("train", 1500), config, tmp_path / "a", dtype=torch.float64)
    b = generate_teacher(source, split_seeds("train", 1500), config, tmp_path / "b", dtype=torch.float64)
    assert torch.equal(a.targets, b.targets)
