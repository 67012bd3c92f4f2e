"""`ats evaluate` and `ats sample` on the runs of a real `ats search` (a tiny 2-d Gaussian mixture
study: LD3, the one-shot predictor and the oracle, local sqlite MLflow store) and on schedule
files, through the click application; PNGs read back with PIL, metrics with MLflow's client."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from ats.compare import evaluate_table
from ats.models.sources import load_source
from ats.teacher import split_seeds
from ats.cli import main
from test_search import ats, tiny_study

N_EVAL = 64   # the study's evaluation seeds; `ats evaluate` starts after them
N_ORACLE = 24   # the oracle is scored on the first 24 selection and evaluation seeds only


@pytest.fixture(scope="module")
def search(tmp_path_factory) -> dict:
    """One finished search: run ids by method (and the parent's), the tracking URI, the cache."""
    root = tmp_path_factory.mktemp("search")
    lr = {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}
    upstream = {"ld3": {"epochs": 2}, "oracle": {"iterations": 5, "restarts": 0}}   # fitted once, shared
    methods = {"ld3": {"options": {"epochs": 3}, "space": lr},
               "oneshot": {"options": {"epochs": 2, "fallback": False, "ld3": {"epochs": 2}}, "space": lr},
               "delta": {"options": {"objective": "regression", "epochs": 2, "finetune_epochs": 1, **upstream},
                         "space": lr},
               "oracle": {"options": {"ld3": upstream["ld3"], **upstream["oracle"]}, "n_scored": N_ORACLE}}
    tiny_study(root / "tiny.yaml", trials=1, methods=methods, data={"n_train": 32, "n_valid": 16, "n_select": 48,
                                                                     "n_eval": N_EVAL})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    done = ats(["search", "--study", "tiny.yaml", "--no-live", "--tracking-uri", uri], root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    ids = {r.data.tags.get("method", "parent"): r.info.run_id for r in runs}
    return {"ids": ids, "uri": uri, "cache": str(root / ".ats-cache" / "teacher"), "client": client, "root": root}


def invoke(args: list[str]):
    return CliRunner().invoke(main, args)


def run_args(search: dict, command: str, method: str, *more: str) -> list[str]:
    return [command, "--run", search["ids"][method], "--tracking-uri", search["uri"], "--cache", search["cache"],
            *more]


def evaluate(args: list[str], path: Path):
    """`ats evaluate ... --json path`: the click result and the JSON rows by name."""
    done = invoke([*args, "--json", str(path)])
    rows = {r["name"]: r for r in json.loads(path.read_text())} if done.exit_code == 0 else {}
    return done, rows


def test_evaluate_a_run_on_fresh_seeds_logs_metrics(search, tmp_path):
    done, rows = evaluate(run_args(search, "evaluate", "ld3", "--n", "64"), tmp_path / "rows.json")
    assert done.exit_code == 0, done.output
    assert set(rows) == {"time_uniform", "logSNR", "ld3"}
    assert f"evaluation samples ({N_EVAL}..{2 * N_EVAL - 1} of the eval split)" in done.output
    assert "(best baseline)" in done.output and "best method ld3" in done.output
    metrics = search["client"].get_run(search["ids"]["ld3"]).data.metrics
    assert metrics["evaluate.start"] == N_EVAL and metrics["evaluate.n"] == 64
    ld3 = rows["ld3"]
    assert ld3["fid"] == pytest.approx(metrics["evaluate.fid"], rel=1e-9) and ld3["n"] == 64
    assert ld3["fid_low"] == pytest.approx(metrics["evaluate.fid_low"]) and ld3["fid_low"] <= ld3["fid"]
    best = min(metrics["evaluate.fid.time_uniform"], metrics["evaluate.fid.logSNR"])
    assert ld3["reference"] == min(("time_uniform", "logSNR"), key=lambda k: rows[k]["fid"])
    assert metrics["evaluate.vs_best_baseline_pct"] == pytest.approx(100 * (metrics["evaluate.fid"] - best) / best)
    assert ld3["vs_best_baseline_pct"] == pytest.approx(metrics["evaluate.vs_best_baseline_pct"])
    assert ld3["vs_best_baseline_low"] <= ld3["vs_best_baseline_pct"] <= ld3["vs_best_baseline_high"]
    # The baselines' FIDs are those of the fresh seeds (another code path), not of the study's own.
    source = load_source("gmm", dim=2, components=8)
    fresh = split_seeds("eval", 64, N_EVAL)
    (tu,) = evaluate_table(source, source.latents(fresh, dtype=source.dtype), None, source.make_metric(),
                           ["dpm_solver++"], [4], ["time_uniform"])
    assert tu.value == pytest.approx(metrics["evaluate.fid.time_uniform"], rel=1e-6)
    study_eval = search["client"].get_run(search["ids"]["time_uniform"]).data.metrics["fid_eval"]
    assert not math.isclose(study_eval, tu.value, rel_tol=1e-6)


def test_the_per_sample_methods_of_a_cell_share_one_ld3_start(search):
    """ld3 start fitted once for oneshot, delta and the oracle (trials in parallel); the delta
    predictor trained on the optimum of the training seeds says whether it beat LD3."""
    shared = Path(search["cache"]) / "shared"
    assert len(list(shared.glob("ld3_start-*.pt"))) == 1 and list(shared.glob("optimum-*.pt"))
    client = search["client"]
    run = client.get_run(search["ids"]["delta"])
    assert {"fid_select", "valid_vs_start_pct", "kept_predictor"} <= set(run.data.metrics)
    assert "result/schedule.png" in {a.path for a in client.list_artifacts(run.info.run_id, "result")}


def test_the_oracle_scored_on_the_first_seeds_pairs_with_every_schedule_there(search):
    """n_scored: the oracle's row is on the first N_ORACLE evaluation seeds, and its changes
    against LD3 and the best baseline use their estimates on those same seeds (their result
    folders keep them beside the full ones); the verdict names a method scored on all seeds."""
    [summary] = search["root"].glob("runs/*/summary/summary.json")
    rows = {r["name"]: r for r in json.loads(summary.read_text())}
    oracle, ld3 = rows["oracle"], rows["ld3"]
    assert (oracle["n"], oracle["seeds"]) == (N_ORACLE, f"eval:0+{N_ORACLE}")
    assert (ld3["n"], ld3["seeds"]) == (N_EVAL, f"eval:0+{N_EVAL}")
    assert oracle["vs_ld3_pct"] is not None and oracle["vs_best_baseline_pct"] is not None
    [ld3_folder] = (p.parent for p in search["root"].glob("runs/**/fid.json")
                    if json.loads((p.parent / "metrics.json").read_text()).get("fid_eval") == ld3["fid"])
    fids = json.loads((ld3_folder / "fid.json").read_text())
    assert {"select", "eval", f"select:0+{N_ORACLE}", f"eval:0+{N_ORACLE}"} <= set(fids)
    ld3_there = fids[f"eval:0+{N_ORACLE}"]["fid"]
    assert oracle["vs_ld3_pct"] == pytest.approx(100 * (oracle["fid"] - ld3_there) / ld3_there)
    text = (summary.parent / "summary.md").read_text()
    assert f"oracle (first {N_ORACLE} seeds)" in text and "best method oracle" not in text
    run = search["client"].get_run(search["ids"]["oracle"])
    assert run.data.metrics["n_eval"] == N_ORACLE and "vs_ld3_pct" in run.data.metrics


def test_evaluate_a_predictor_and_refuse_the_oracle(search, tmp_path):
    done, rows = evaluate(run_args(search, "evaluate", "oneshot", "--n", "32", "--baselines", "time_uniform,dmn"),
                          tmp_path / "rows.json")
    assert done.exit_code == 0, done.output
    assert set(rows) == {"time_uniform", "dmn", "oneshot"}
    assert "evaluate.fid.dmn" in search["client"].get_run(search["ids"]["oneshot"]).data.metrics
    done = invoke(run_args(search, "evaluate", "oracle"))
    assert done.exit_code == 2 and "fitted on each of their own samples" in done.output


def test_sample_a_run_side_by_side_and_on_the_oracle_seeds(search, tmp_path):
    done = invoke(run_args(search, "sample", "ld3", "--n", "32", "--seed", "5", "--out", str(tmp_path / "one.png")))
    assert done.exit_code == 0, done.output
    done = invoke(run_args(search, "sample", "ld3", "--n", "32", "--baseline", "logSNR", "--baseline", "gits",
                           "--out", str(tmp_path / "three.png")))
    assert done.exit_code == 0 and "ld3, logSNR, gits" in done.output, done.output
    one, three = Image.open(tmp_path / "one.png"), Image.open(tmp_path / "three.png")
    assert one.format == three.format == "PNG" and one.size[1] == three.size[1]
    assert three.size[0] == pytest.approx(3 * one.size[0], rel=0.05)   # one scatter panel per schedule
    done = invoke(run_args(search, "sample", "oracle", "--n", "8", "--out", str(tmp_path / "oracle.png")))
    assert done.exit_code == 0 and f"seeds {split_seeds('eval', 1)[0]}.." in done.output, done.output
    done = invoke(run_args(search, "sample", "oracle", "--n", "8", "--seed", "3", "--out", str(tmp_path / "x.png")))
    assert done.exit_code == 2 and "leave out --seed" in done.output
    done = invoke(run_args(search, "sample", "oracle", "--n", "8", "--label", "1", "--out", str(tmp_path / "x.png")))
    assert done.exit_code == 2 and "leave out --label" in done.output
    done = invoke(run_args(search, "sample", "oneshot", "--label", "1", "--out", str(tmp_path / "x.png")))
    assert done.exit_code == 2 and "--label needs a class-conditional model" in done.output
    assert not (tmp_path / "x.png").exists()


def test_schedule_files_match_the_run(search, tmp_path):
    """The run's schedule.json through --schedule scores what --run scored on the same seeds;
    its predictor's result.pt refuses a model of another shape."""
    client, ids = search["client"], search["ids"]
    schedule = client.download_artifacts(ids["ld3"], "result/schedule.json", str(tmp_path))
    done, rows = evaluate(["evaluate", "--schedule", schedule, "--dataset", "gmm", "--preset", "2d", "--n", "64",
                           "--start", str(N_EVAL), "--baselines", "logSNR", "--cache", search["cache"]],
                          tmp_path / "rows.json")
    assert done.exit_code == 0, done.output
    assert rows["ld3"]["fid"] == pytest.approx(client.get_run(ids["ld3"]).data.metrics["evaluate.fid"], rel=1e-9)
    predictor = client.download_artifacts(ids["oneshot"], "result/result.pt", str(tmp_path / "p"))
    done = invoke(["sample", "--schedule", predictor, "--dataset", "gmm", "--preset", "16d",
                   "--out", str(tmp_path / "x.png")])
    assert done.exit_code == 2 and "inputs of shape (2,)" in done.output, done.output


def test_digits_schedule_from_ats_fit(tmp_path):
    cache = str(tmp_path / "cache")
    done = invoke(["fit", "--method", "dmn", "--dataset", "digits", "--solver", "dpm_solver++", "--nfe", "5",
                   "--n-eval", "8", "--cache", cache, "--out", str(tmp_path / "fit")])
    assert done.exit_code == 0, done.output
    schedule = str(tmp_path / "fit" / "schedule.json")
    assert json.loads(Path(schedule).read_text())["method"] == "dmn"
    done = invoke(["sample", "--schedule", schedule, "--dataset", "digits", "--n", "16", "--baseline", "edm",
                   "--out", str(tmp_path / "digits.png"), "--cache", cache])
    assert done.exit_code == 0, done.output
    grid = 4 * (8 * 4 + 1) + 1          # 4 x 4 digits of 8 x 8 pixels, scaled 4 x, 1-pixel gaps
    assert Image.open(tmp_path / "digits.png").size == (2 * grid + 8, grid + 14)
    done = invoke(["sample", "--schedule", schedule, "--dataset", "digits", "--guidance-scale", "2", "--label", "7",
                   "--n", "4", "--out", str(tmp_path / "seven.png")])
    assert done.exit_code == 0 and "digits-cfg2" in done.output, done.output
    assert Image.open(tmp_path / "seven.png").size == (2 * (8 * 4 + 1) + 1,) * 2
    done = invoke(["sample", "--schedule", schedule, "--dataset", "digits", "--label", "7"])
    assert done.exit_code == 2 and "digits is unconditional" in done.output
    done, rows = evaluate(["evaluate", "--schedule", schedule, "--dataset", "digits", "--n", "16",
                           "--baselines", "edm", "--cache", cache], tmp_path / "rows.json")
    assert done.exit_code == 0 and set(rows) == {"edm", "dmn"}, done.output


def test_clear_errors(search, tmp_path):
    done = invoke(["evaluate", "--run", "0123456789abcdef", "--tracking-uri", search["uri"]])
    assert done.exit_code == 1 and "no run 0123456789abcdef" in done.output
    done = invoke(run_args(search, "evaluate", "parent"))
    assert done.exit_code == 1 and "not a trial or baseline" in done.output
    done = invoke(["sample", "--out", str(tmp_path / "x.png")])
    assert done.exit_code == 2 and "give one of --run RUN_ID or --schedule FILE" in done.output
    done = invoke(run_args(search, "sample", "ld3", "--dataset", "gmm"))
    assert done.exit_code == 2 and "--dataset go with --schedule" in done.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "x", "solver": "ddim", "order": None, "nfe": 2, "timesteps": [5.0, 2.0, 1.0]}))
    done = invoke(["sample", "--schedule", str(bad), "--dataset", "gmm"])
    assert done.exit_code == 2 and "timesteps" in done.output
