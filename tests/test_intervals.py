"""FID intervals (ats.intervals) and the tables built on them (ats.report), on exact samples
of a Gaussian mixture: the bootstrap is checked against fresh sample sets, not against itself."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ats.intervals import FidEstimate, bootstrap_counts
from ats.metrics import frechet_estimate
from ats.models.gmm import gmm_metric
from ats.models.gmm import GaussianMixture
from ats.report import Row, compare, verdict, write_json


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(8, 4, seed=3)


@pytest.fixture(scope="module")
def metric(gmm):
    return gmm_metric(gmm, n_reference=20000)


def draws(gmm, n, seed, shift=0.0):
    return gmm.sample(n, generator=torch.Generator().manual_seed(seed)) + shift


def test_point_estimate_is_torchmetrics_fid_and_the_unit_weights_replicate_equals_it(gmm, metric):
    x = draws(gmm, 700, 1, 0.1)
    est = frechet_estimate(metric, x, "s")
    metric.reset()
    metric.update(x, real=False)
    assert est.fid == pytest.approx(float(metric.compute()), rel=1e-9)
    from ats.intervals import bootstrap_fids, frechet_from_features, real_statistics
    mu, cov = real_statistics(metric)
    assert frechet_from_features(x, mu, cov) == pytest.approx(est.fid, rel=1e-6)
    reps = bootstrap_fids(x.double(), mu, cov)
    assert np.allclose(reps.numpy(), est.replicates)   # the replicates are a function of (features, n)
    assert abs(float(reps.mean()) - est.fid) < 4 * est.sd


def test_bootstrap_spread_matches_fresh_sample_sets(gmm, metric):
    """The sd of the replicates of one set is the sd of FID over 40 disjoint fresh sets."""
    fresh = [frechet_estimate(metric, draws(gmm, 400, 100 + k, 0.15), replicates=0).fid for k in range(40)]
    boot = [frechet_estimate(metric, draws(gmm, 400, 500 + k, 0.15)).sd for k in range(5)]
    ratio = np.median(boot) / np.std(fresh, ddof=1)
    assert 0.7 < ratio < 1.4, ratio
    one = frechet_estimate(metric, draws(gmm, 400, 7, 0.15))
    inside = np.mean([one.low - 2 * one.sd <= f <= one.high + 2 * one.sd for f in fresh])
    assert inside > 0.9


def test_paired_change_cancels_shared_noise_and_flags_a_real_difference(gmm, metric):
    x = draws(gmm, 800, 3)
    a = frechet_estimate(metric, x + 0.2, "eval:0+800")
    same = frechet_estimate(metric, x + 0.2, "eval:0+800").change_pct(a)
    assert same.pct == 0 and same.low == 0 and same.high == 0 and not same.significant
    b = frechet_estimate(metric, x + 0.1, "eval:0+800")
    change = b.change_pct(a)
    assert change.pct < 0 and change.significant and change.low <= change.pct <= change.high
    # paired: far narrower than the two intervals taken apart
    unpaired = 100 * (a.high - a.low + b.high - b.low) / 2 / a.fid
    assert change.high - change.low < unpaired
    with pytest.raises(ValueError, match="same seeds"):
        b.change_pct(frechet_estimate(metric, x[:400], "eval:0+400"))


def test_bootstrap_indices_depend_only_on_n():
    assert torch.equal(bootstrap_counts(50), bootstrap_counts(50))
    assert (bootstrap_counts(50).sum(1) == 50).all()


def test_estimate_round_trips_through_json(gmm, metric):
    est = frechet_estimate(metric, draws(gmm, 300, 4, 0.1), "select:0+300")
    back = FidEstimate.from_dict(json.loads(json.dumps(est.to_dict())))
    assert back.fid == est.fid and back.seeds == est.seeds and np.array_equal(back.replicates, est.replicates)


def test_table_rows_verdict_and_json(gmm, metric, tmp_path):
    x = draws(gmm, 600, 5)
    rows = [Row("time_uniform", "uni_pc", 5, frechet_estimate(metric, x + 0.3, "e"), "baseline"),
            Row("logSNR", "uni_pc", 5, frechet_estimate(metric, x + 0.2, "e"), "baseline"),
            Row("ld3", "uni_pc", 5, frechet_estimate(metric, x + 0.1, "e")),
            Row("oneshot", "uni_pc", 5, frechet_estimate(metric, x + 0.19, "e"))]
    ref = compare(rows)
    assert ref.name == "logSNR" and rows[2].vs_baseline.significant and rows[2].vs_baseline.pct < 0
    assert rows[3].vs_ld3.pct > 0 and not math.isfinite(rows[2].vs_ld3.pct)
    line = verdict(rows)
    assert "best method ld3" in line and "against logSNR" in line and "significantly better" in line
    data = json.loads(write_json(rows, tmp_path / "rows.json").read_text())
    for key in ("name", "solver", "nfe", "fid", "fid_low", "fid_high", "n"):
        assert all(key in r for r in data)
    ld3 = data[2]
    assert ld3["vs_best_baseline_low"] <= ld3["vs_best_baseline_pct"] <= ld3["vs_best_baseline_high"] < 0
    assert "vs_best_baseline_pct" not in data[1]   # the reference itself


def test_verdict_says_when_no_method_is_better(gmm, metric):
    """Two schedules with the same distribution (fresh draws): no significant change."""
    rows = [Row("edm", "uni_pc", 5, frechet_estimate(metric, draws(gmm, 600, 6) + 0.1, "e"), "baseline"),
            Row("ld3", "uni_pc", 5, frechet_estimate(metric, draws(gmm, 600, 8) + 0.1, "e"))]
    compare(rows)
    assert "not significantly different from the best baseline" in verdict(rows)


def test_a_diverged_row_has_no_change_whatever_the_bootstrap_size(gmm, metric):
    ok = frechet_estimate(metric, draws(gmm, 300, 9, 0.1), "e", replicates=50)
    assert math.isnan(FidEstimate.diverged(300, "e").change_pct(ok).pct)
    assert math.isnan(ok.change_pct(FidEstimate.diverged(300, "e")).pct)


def test_a_row_on_the_first_seeds_pairs_with_the_others_estimates_there(gmm, metric):
    """An oracle-like row scored on the first 300 of 600 seeds: its changes use the other rows'
    estimates on those 300 seeds (their prefixes, from the same samples), it is labelled with
    its seed count, and the verdict leaves it out; a reference not scored there gives no change."""
    x = draws(gmm, 600, 5)
    samples = {"edm": x + 0.3, "ld3": x + 0.1}
    rows = [Row(name, "uni_pc", 5, frechet_estimate(metric, out, "eval:0+600"), kind,
                others={"eval:0+300": frechet_estimate(metric, out[:300], "eval:0+300")})
            for (name, out), kind in zip(samples.items(), ("baseline", "method"))]
    oracle = Row("oracle", "uni_pc", 5, frechet_estimate(metric, x[:300] + 0.01, "eval:0+300"))
    compare(rows + [oracle])
    ld3_there = rows[1].others["eval:0+300"]
    assert oracle.vs_ld3.pct == pytest.approx(100 * (oracle.fid.fid - ld3_there.fid) / ld3_there.fid)
    assert oracle.vs_baseline.pct < 0 and oracle.vs_baseline.significant
    assert oracle.label == "oracle (first 300 seeds)" and rows[1].label == "ld3"
    assert "best method ld3" in verdict(rows + [oracle])
    lone = Row("oracle", "uni_pc", 5, frechet_estimate(metric, x[:200], "eval:0+200"))
    compare(rows + [lone])
    assert math.isnan(lone.vs_ld3.pct) and math.isnan(lone.vs_baseline.pct)


def test_prefix_scores_equal_the_score_of_the_first_samples(gmm, metric):
    """score_samples' prefixes: the same estimate as scoring the first k samples alone."""
    from ats.evaluate import score_samples
    from ats.models.gmm import gmm_source
    source = gmm_source(dim=8, components=4, seed=3)
    out = draws(gmm, 400, 11, 0.05)
    full, _, prefixes = score_samples(source, metric, out, out, "eval:0+400", {"eval:0+150": 150})
    alone, _, _ = score_samples(source, metric, out[:150], out[:150], "eval:0+150")
    assert full.n == 400 and set(prefixes) == {"eval:0+150"}
    assert prefixes["eval:0+150"].fid == pytest.approx(alone.fid, rel=1e-9)
    assert np.allclose(prefixes["eval:0+150"].replicates, alone.replicates)
