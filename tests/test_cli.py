import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from ats.cli import main


def table_rows(output: str) -> dict[tuple[str, int], list[float]]:
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) > 2 and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = [float(c.split(" ± ")[0]) for c in cells[2:]]   # value ± half-width
    return rows


def test_compare_runs_end_to_end():
    result = CliRunner().invoke(main, ["compare", "--dataset", "gmm", "--n", "32", "--preset", "2d",
                                       "--solvers", "uni_pc,heun", "--nfe", "9,41", "--discretizations", "logSNR,edm"])
    assert result.exit_code == 0, result.output
    assert "mean L2 error" in result.output
    rows = table_rows(result.output)
    assert set(rows) == {("uni_pc", 9), ("uni_pc", 41), ("heun", 9), ("heun", 41)}
    assert all(len(v) == 2 and 0 < min(v) and max(v) < 10 for v in rows.values())
    # Far more steps, far smaller error, for every discretization and solver.
    for solver in ("uni_pc", "heun"):
        assert all(b < a / 4 for a, b in zip(rows[(solver, 9)], rows[(solver, 41)]))


def test_heun_skips_even_nfe():
    result = CliRunner().invoke(main, ["compare", "--n", "8", "--preset", "2d", "--solvers", "heun,ddim", "--nfe", "4",
                                       "--discretizations", "logSNR"])
    assert result.exit_code == 0, result.output
    assert set(table_rows(result.output)) == {("ddim", 4)}
    assert "heun: NFE 4 skipped" in result.output


def test_bad_flags_give_one_line_errors():
    runner = CliRunner()
    result = runner.invoke(main, ["compare", "--dataset", "imagenet"])
    assert result.exit_code == 2 and "'imagenet' is not one of" in result.output
    result = runner.invoke(main, ["compare", "--dataset", "cifar10"])
    assert result.exit_code == 2 and "needs --checkpoint DIR" in result.output
    result = runner.invoke(main, ["compare", "--solvers", "dpm"])
    assert result.exit_code == 2 and "dpm not among" in result.output
    result = runner.invoke(main, ["compare", "--nfe", "0"])
    assert result.exit_code == 2 and "give integers from 1 to 1000" in result.output


def test_teacher_command_caches_and_draws_a_grid(tmp_path):
    args = ["teacher", "--dataset", "digits", "--nfe", "5", "--n", "12", "--cache", str(tmp_path / "cache"),
            "--grid", str(tmp_path / "grid.png")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "12 targets (train seeds 0..11)" in result.output
    from PIL import Image
    assert Image.open(tmp_path / "grid.png").size == (4 * (8 * 4 + 1) + 1, 3 * (8 * 4 + 1) + 1)
    shards = sorted((tmp_path / "cache").rglob("block-*.pt"))
    before = [p.stat().st_mtime_ns for p in shards]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert [p.stat().st_mtime_ns for p in shards] == before  # nothing recomputed


def test_train_model_command_writes_loadable_weights(tmp_path):
    out = tmp_path / "unet.pt"
    result = CliRunner().invoke(main, ["train-model", "--dataset", "digits", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from ats.models.digits import load_digits_unet
    assert load_digits_unet(out).config["channels"] == [32, 64, 64]


def test_compare_digits_by_fid(tmp_path):
    result = CliRunner().invoke(main, ["compare", "--dataset", "digits", "--metric", "fid", "--n", "64",
                                       "--solvers", "dpm_solver++", "--nfe", "3,10", "--discretizations",
                                       "logSNR,time_quadratic", "--json", str(tmp_path / "rows.json")])
    assert result.exit_code == 0, result.output
    rows = table_rows(result.output)
    assert rows[("dpm_solver++", 10)][0] < rows[("dpm_solver++", 3)][0]
    import json
    records = json.loads((tmp_path / "rows.json").read_text())
    assert len(records) == 4 and all(r["n"] == 64 and r["fid_low"] <= r["fid"] <= r["fid_high"] for r in records)
    for nfe in (3, 10):   # the row's best is the reference of the other's paired change
        pair = [r for r in records if r["nfe"] == nfe]
        best = min(pair, key=lambda r: r["fid"])
        other = next(r for r in pair if r is not best)
        assert other["reference"] == best["name"] and other["vs_best_baseline_pct"] > 0
        assert other["vs_best_baseline_low"] <= other["vs_best_baseline_pct"] <= other["vs_best_baseline_high"]


def test_fit_writes_the_schedule_and_compares_it(tmp_path):
    out = tmp_path / "run"
    args = ["fit", "--method", "ld3", "--dataset", "gmm", "--preset", "2d", "--solver", "dpm_solver++", "--nfe", "4",
            "--n-train", "16", "--n-valid", "16", "--n-eval", "64", "--option", "epochs=3",
            "--cache", str(tmp_path / "cache"), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    import json
    schedule = json.loads((out / "schedule.json").read_text())
    assert schedule["method"] == "ld3" and len(schedule["timesteps"]) == 5
    assert "ld3" in result.output and "(best baseline)" in result.output and "best method ld3" in result.output
    import torch
    assert torch.load(out / "result.pt", weights_only=True)["steps"] == 4


def test_fit_with_heun_compares_at_the_same_network_calls(tmp_path):
    """Heun at NFE 5 is 3 steps; the fit and the baselines it is compared with are at NFE 5."""
    import json
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", "--method", "ld3", "--dataset", "gmm", "--preset", "2d", "--solver",
                                       "heun", "--nfe", "5", "--n-train", "16", "--n-valid", "16", "--n-eval", "64",
                                       "--option", "epochs=2", "--cache", str(tmp_path / "cache"), "--out", str(out),
                                       "--json", str(tmp_path / "rows.json")])
    assert result.exit_code == 0, result.output
    schedule = json.loads((out / "schedule.json").read_text())
    assert (schedule["nfe"], schedule["steps"], len(schedule["timesteps"])) == (5, 3, 4)
    assert "heun NFE 5" in result.output
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {r["nfe"] for r in rows} == {5} and {r["name"] for r in rows} >= {"ld3", "time_uniform"}


def test_json_to_a_missing_folder_fails_before_any_work(tmp_path):
    for command in (["compare", "--dataset", "gmm"], ["fit", "--method", "dmn", "--dataset", "gmm"]):
        result = CliRunner().invoke(main, [*command, "--json", str(tmp_path / "nowhere" / "rows.json")])
        assert result.exit_code == 2 and "is not a writable folder" in result.output, result.output


def test_fit_bad_option_and_method():
    result = CliRunner().invoke(main, ["fit", "--method", "ld3", "--dataset", "gmm", "--option", "epochs"])
    assert result.exit_code == 2 and "is not KEY=VALUE" in result.output
    result = CliRunner().invoke(main, ["fit", "--method", "ld3", "--dataset", "gmm", "--option", "lr_typo=1"])
    assert result.exit_code == 2 and "lr_typo: unknown key" in result.output and "(method ld3)" in result.output
    result = CliRunner().invoke(main, ["fit", "--method", "ld3", "--dataset", "gmm", "--option", "batch_size=0"])
    assert result.exit_code == 2 and "batch_size: must be >= 1, got 0" in result.output
    result = CliRunner().invoke(main, ["fit", "--method", "ld3", "--dataset", "gmm", "--nfe", "3", "--option", "init=[0,0]"])
    assert result.exit_code == 2 and "init: unknown key" in result.output   # an input of the method, not an option


def fit_args(tmp_path, out, *more: str) -> list[str]:
    return ["fit", "--method", "ld3", "--dataset", "gmm", "--preset", "2d", "--solver", "dpm_solver++", "--nfe", "4",
            "--n-train", "8", "--n-valid", "8", "--n-eval", "16", "--option", "epochs=1",
            "--cache", str(tmp_path / "cache"), "--out", str(out), *more]


def test_fit_refuses_an_existing_result_before_any_work(tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, fit_args(tmp_path, out)).exit_code == 0
    before = (out / "result.pt").read_bytes()
    result = CliRunner().invoke(main, fit_args(tmp_path, out))
    assert result.exit_code == 2 and "Invalid value for --out: " in result.output
    assert f"{out} already holds a result (result.pt, schedule.json); choose another folder or delete {out}" \
        in " ".join(result.output.split())
    assert (out / "result.pt").read_bytes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(main, fit_args(tmp_path, empty)).exit_code == 0   # an empty folder is fine


def test_fit_refuses_an_unwritable_out_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(main, fit_args(tmp_path, blocker / "run"))
    assert result.exit_code == 2 and "is not a writable folder" in result.output and "--out: " in result.output
    result = CliRunner().invoke(main, fit_args(tmp_path, blocker))
    assert result.exit_code == 2 and "is a file, not a folder" in result.output
    assert not (tmp_path / "cache").exists()   # refused before the teacher was computed


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_fit_refuses_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = CliRunner().invoke(main, fit_args(tmp_path, locked / "run"))
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 2 and f"{locked} is not a writable folder" in " ".join(result.output.split())
    assert not (tmp_path / "cache").exists()


def test_sigint_during_the_starting_ld3_fit_saves_ld3s_best_state(tmp_path):
    """A real `ats fit --method oneshot` sent SIGINT while LD3 (its start) runs."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    cmd = [sys.executable, "-m", "ats.cli", "fit", "--method", "oneshot", "--dataset", "gmm", "--preset", "2d",
           "--nfe", "4", "--n-train", "8", "--n-valid", "8", "--option", 'ld3={"epochs": 100000}',
           "--cache", str(cache), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "400"})
    deadline = time.time() + 50
    while time.time() < deadline and len(list(cache.rglob("block-*.pt"))) < 2:   # train and valid targets
        time.sleep(0.05)
    time.sleep(8)   # into LD3's epochs (its setup takes a moment on a loaded machine)
    proc.send_signal(signal.SIGINT)
    output = " ".join(proc.communicate(timeout=60)[0].split())
    assert proc.returncode in (130, -signal.SIGINT), output   # CPython may re-raise SIGINT at exit
    assert (f"interrupted while fitting the starting LD3 schedule of oneshot: LD3's best state saved to "
            f"{out / 'result.pt'}") in output
    from ats.methods import load_result
    saved = load_result(out / "result.pt")
    assert saved.method == "ld3" and saved.info["interrupted"] and (saved.timesteps.diff() < 0).all()


def test_sample_counts_beyond_a_split_are_refused(tmp_path):
    cache = ["--cache", str(tmp_path / "c")]
    for command in (["fit", "--method", "ld3", "--dataset", "gmm", "--n-eval", "10000001", *cache],
                    ["teacher", "--dataset", "gmm", "--n", "10000001", *cache],
                    ["compare", "--dataset", "gmm", "--n", "10000001"]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2 and "10000001 is not in the range" in result.output, result.output
        assert "<=x<=10000000" in result.output
    assert not (tmp_path / "c").exists()
