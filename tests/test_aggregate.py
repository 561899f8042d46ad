"""Tests for dhm.summary.aggregate on synthetic sweeps written with dhm.evaluation.results (no
training)."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from dhm.core.config import run_config, to_yaml
from dhm.summary import metrics as M
from dhm.summary.aggregate import (
    IncompleteSweepError,
    aggregate,
    bound_sigma,
    format_eps,
    read_table,
)
from tests.helpers.sweeps import EPS, GRID, NUM_DIMS, ROLE, make_arrays, write_plan, write_run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def sweep(tmp_path):
    arrays = {r[0]: write_run(tmp_path, *r[:4], seed=i, shards=r[4]) for i, r in enumerate(GRID)}
    write_plan(tmp_path, GRID)
    return tmp_path, arrays


def _fpr95(score_in, score_out):
    y = np.r_[np.ones(len(score_in)), np.zeros(len(score_out))]
    fpr, tpr, _ = roc_curve(y, np.r_[score_in, score_out], drop_intermediate=False)
    return fpr[tpr >= 0.95].min()


def test_metrics_match_independent_computation(sweep):
    root, arrays = sweep
    report = aggregate(root, plots=False)
    assert report.problems == []
    df = pd.read_csv(root / "summary" / "results.csv").set_index("run_id")
    assert list(df.columns[:8]) == [
        "status", "model", "alpha", "beta", "dataset", "bound_sigma", "code", "accuracy",
    ]  # fmt: skip
    # Shards without a code attribute (written before snapshots, or in this process): "".
    assert [r["code"] for r in report.rows] == [""] * 4 and df["code"].isna().all()
    assert (df["status"] == "ok").all()
    a = arrays["dhm0001"]
    ident, ood = a["digits"], a["digits_ood"]
    row = df.loc["dhm0001"]
    logits, labels = ident["logits"].astype(np.float64), ident["labels"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert row["accuracy"] == pytest.approx(np.mean(p.argmax(1) == labels), abs=1e-15)
    assert row["nll"] == pytest.approx(-np.mean(np.log(p[np.arange(len(labels)), labels])))
    assert row["brier"] == pytest.approx(np.mean(((p - np.eye(10)[labels]) ** 2).sum(1)))
    rel = M.reliability(logits, labels, 15)
    assert (row["ece"], row["mce"]) == pytest.approx((rel.ece, rel.mce))
    # One softmax pass for all of them in aggregate: the same values as dhm.summary.metrics, bit
    # for bit.
    x, y = ident["logits"], ident["labels"]
    assert (row["accuracy"], row["nll"], row["brier"], row["ece"], row["mce"]) == (
        M.accuracy(x, y),
        M.nll(x, y),
        M.brier_score(x, y),
        rel.ece,
        rel.mce,
    )
    q = np.exp(ood["logits"] - ood["logits"].max(1, keepdims=True))
    scores = {
        "msp": (p.max(1), (q / q.sum(1, keepdims=True)).max(1)),
        "elbo": (-ident["neg_elbo"], -ood["neg_elbo"]),
        "iwae_k4": (-ident["neg_iwae_k4"], -ood["neg_iwae_k4"]),
    }
    for score, (s_in, s_out) in scores.items():
        y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
        s = np.r_[s_in, s_out]
        assert row[f"auroc_digits_ood_{score}"] == pytest.approx(roc_auc_score(y, s), rel=1e-12)
        assert row[f"aupr_in_digits_ood_{score}"] == pytest.approx(average_precision_score(y, s))
        aupr_out = average_precision_score(1 - y, -s)  # OOD positive, higher score = more OOD
        assert row[f"aupr_out_digits_ood_{score}"] == pytest.approx(aupr_out)
        assert row[f"fpr95_digits_ood_{score}"] == pytest.approx(_fpr95(s_in, s_out))
    for set_name, suffix in (("digits", ""), ("digits_ood", "_digits_ood")):
        mean = np.mean(a[set_name]["neg_elbo"], dtype=np.float64)
        assert row[f"neg_elbo_nats{suffix}"] == pytest.approx(mean, rel=1e-12)
        bpd = mean / (NUM_DIMS * math.log(2)) + math.log2(255)  # dequantized on the 1/255 grid
        assert row[f"bits_per_dim{suffix}"] == pytest.approx(bpd, rel=1e-12)
        iwae = np.mean(a[set_name]["neg_iwae_k4"], dtype=np.float64)
        iwae_bpd = iwae / (NUM_DIMS * math.log(2)) + math.log2(255)
        assert row[f"iwae_bits_per_dim{suffix}"] == pytest.approx(iwae_bpd, rel=1e-12)
        png = np.mean(a[set_name]["complexity_bits"], dtype=np.float64) / NUM_DIMS
        assert row[f"png_bits_per_dim{suffix}"] == pytest.approx(png, rel=1e-12)
    # Shards without bound_sigma or sigma_source (written before 2026-12-07) read as trained.
    assert row["bound_sigma"] == "trained" and "trained_bits_per_dim" not in df.columns
    for e, pred in zip(EPS, ident["fgsm/pred"], strict=True):
        assert row[f"fgsm_acc_eps{format_eps(e)}"] == np.mean(pred == labels)
    assert [c for c in df.columns if c.startswith("fgsm") and "_ci_" not in c] == [
        "fgsm_acc_eps0",
        "fgsm_acc_eps0.01",
        "fgsm_acc_eps0.0314",
    ]


def test_missing_capabilities_are_empty_cells(sweep):
    root, _ = sweep
    aggregate(root, plots=False)
    df = pd.read_csv(root / "summary" / "results.csv").set_index("run_id")
    vae, resnet = df.loc["vae00000"], df.loc["resnet00"]
    for col in ("accuracy", "nll", "ece", "fgsm_acc_eps0.01", "auroc_digits_ood_msp"):
        assert pd.isna(vae[col]), col
    assert not pd.isna(vae["auroc_digits_ood_elbo"]) and not pd.isna(vae["bits_per_dim"])
    for col in (
        "neg_elbo_nats",
        "bits_per_dim",
        "auroc_digits_ood_elbo",
        "fpr95_digits_ood_iwae_k4",
    ):
        assert pd.isna(resnet[col]), col
    assert not pd.isna(resnet["accuracy"]) and not pd.isna(resnet["auroc_digits_ood_msp"])
    assert (df["status"] == "ok").all() and df["problem"].isna().all()


def test_shard_split_invariance(tmp_path):
    arrays = make_arrays(7, "dhm")
    texts = []
    for shards in (1, 3):
        root = tmp_path / f"s{shards}"
        write_run(root, "run00001", "dhm", 1.0, 0.1, seed=0, shards=shards, sets=arrays)
        write_plan(root, [("run00001", "dhm", 1.0, 0.1)])
        aggregate(root, plots=False)
        texts.append((root / "summary" / "results.csv").read_text())
    assert texts[0] == texts[1]
    with (
        h5py.File(tmp_path / "s1/summary/results.h5") as f1,
        h5py.File(tmp_path / "s3/summary/results.h5") as f3,
    ):
        for key in ("fgsm/accuracy", "reliability/counts", "elbo_hist/counts/digits_ood"):
            np.testing.assert_array_equal(f1[f"runs/{key}"], f3[f"runs/{key}"])


def test_corrupt_and_missing_runs(sweep):
    root, _ = sweep
    bad = sorted((root / "runs" / "dhm0001" / "eval").glob("digits__*.h5"))[1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    (root / "runs" / "untrained" / "logs").mkdir(parents=True)
    cfg = run_config(**{"run_dir": str(root / "runs" / "untrained"), "model.beta": 1.0})
    (root / "runs" / "untrained" / "config.yaml").write_text(to_yaml(cfg))
    write_plan(root, [*GRID, ("nofolder", "dhm", 1.0, 1.0), ("untrained", "dhm", 1.0, 1.0)])
    with pytest.raises(IncompleteSweepError) as info:
        aggregate(root, plots=False)
    message = str(info.value)
    assert f"dhm0001: eval/{bad.name}: unreadable shard" in message
    assert "nofolder: planned run has no folder" in message
    assert "untrained: no eval shards (not evaluated or training failed)" in message
    df = pd.read_csv(root / "summary" / "results.csv").set_index("run_id")  # written anyway
    assert df.loc["dhm0001", "status"] == "corrupt"
    assert bad.name in df.loc["dhm0001", "problem"]
    assert (df.loc[["nofolder", "untrained"], "status"] == "missing").all()
    assert df.loc["untrained", "problem"] == "no eval shards (not evaluated or training failed)"
    assert df.loc["nofolder", "beta"] == 1.0 and df.loc["nofolder", "model"] == "dhm"
    assert df.loc["untrained", "dataset"] == "digits"  # from its config.yaml
    ok = df.loc[["dhm0010", "resnet00", "vae00000"]]
    assert (ok["status"] == "ok").all() and ok["bits_per_dim_digits_ood"].notna().sum() == 2

    report = aggregate(root, plots=False, allow_partial=True)
    assert {rid for rid, _ in report.problems} == {"dhm0001", "nofolder", "untrained"}
    assert len(report.rows) == 6
    assert "## Problems" in (root / "summary" / "results.md").read_text()


def test_gap_is_missing_and_bad_attribute_is_corrupt(sweep):
    root, _ = sweep
    gap = sorted((root / "runs" / "dhm0001" / "eval").glob("digits__*.h5"))[1]
    gap.unlink()  # the middle third of digits has no shard
    bad = sorted((root / "runs" / "dhm0010" / "eval").glob("digits_ood__*.h5"))[0]
    with h5py.File(bad, "r+") as f:
        del f.attrs["stop"]
    report = aggregate(root, plots=False, allow_partial=True)
    rows = {r["run_id"]: r for r in report.rows}
    assert rows["dhm0001"]["status"] == "missing"
    assert (
        "eval/digits__*.h5: set digits: images [40, 80) have no shard" in rows["dhm0001"]["problem"]
    )
    assert rows["dhm0010"]["status"] == "corrupt"
    assert (
        rows["dhm0010"]["problem"] == f"eval/{bad.name}: attribute stop is missing, not an integer"
    )
    assert rows["resnet00"]["status"] == "ok" and rows["vae00000"]["status"] == "ok"


def test_non_finite_and_missing_set(tmp_path):
    sets = make_arrays(3, "dhm")
    sets["digits_ood"]["neg_elbo"][5] = np.nan
    write_run(tmp_path, "nanrun00", "dhm", 1.0, 0.1, seed=0, sets=sets)
    write_run(
        tmp_path,
        "noood000",
        "dhm",
        1.0,
        1.0,
        seed=1,
        sets={"digits": make_arrays(1, "dhm")["digits"]},
    )
    report = aggregate(tmp_path, plots=False, allow_partial=True)  # no plan: every folder
    rows = {r["run_id"]: r for r in report.rows}
    assert rows["nanrun00"]["status"] == "corrupt"
    assert "digits_ood/neg_elbo: non-finite" in rows["nanrun00"]["problem"]
    assert rows["nanrun00"]["accuracy"] is not None  # the rest of the run is still measured
    assert rows["noood000"]["status"] == "missing"
    assert "no eval shards for set digits_ood" in rows["noood000"]["problem"]


def test_no_plan_uses_stored_configs(sweep):
    root, _ = sweep
    (root / "plan.json").unlink()
    report = aggregate(root, plots=False)
    cols = list(report.rows[0])
    assert cols[:9] == [
        "run_id",
        "status",
        "model",
        "alpha",
        "beta",
        "vae_split_layer",
        "importance_num",
        "kl_coeff",
        "dataset",
    ]
    row = {r["run_id"]: r for r in report.rows}["dhm0010"]
    assert (row["model"], row["beta"], row["kl_coeff"], row["dataset"]) == (
        "dhm",
        0.1,
        0.1,
        "digits",
    )


def test_outputs_readable(sweep):
    root, _ = sweep
    aggregate(root, max_plot_runs=12)
    summary = root / "summary"
    csv_df = pd.read_csv(summary / "results.csv")
    with h5py.File(summary / "results.h5", "r") as f:
        table = f["table"]
        plain = pd.DataFrame(
            {k: table[k].asstr()[()] if table[k].dtype.kind == "O" else table[k][()] for k in table}
        )
        g = f["runs"]  # per-run curves stacked over runs, row i = results.csv row i
        assert list(g["run_id"].asstr()[()]) == [r[0] for r in GRID] == list(csv_df["run_id"])
        dhm, resnet, vae = 1, 2, 3
        np.testing.assert_array_equal(g["fgsm/eps"][()], EPS.astype(np.float64))
        acc = g["fgsm/accuracy"][()]
        assert acc.shape == (4, 3) and np.isnan(acc[vae]).all() and not np.isnan(acc[dhm]).any()
        fgsm_cols = [c for c in csv_df.columns if c.startswith("fgsm_acc") and "_ci_" not in c]
        np.testing.assert_array_equal(acc[dhm], csv_df[fgsm_cols].iloc[dhm])
        np.testing.assert_array_equal(g["reliability/bin_edges"][()], np.linspace(0, 1, 16))
        counts = g["reliability/counts"][()]
        assert counts.shape == (4, 15) and list(counts.sum(1)) == [120, 120, 120, 0]
        assert g["reliability/accuracy"].shape == g["reliability/confidence"].shape == (4, 15)
        assert np.isnan(g["reliability/confidence"][vae]).all()
        edges = g["elbo_hist/edges"][()]
        assert edges.shape == (4, 51) and np.isnan(edges[resnet]).all()
        assert np.all(np.diff(edges[[0, 1, 3]], axis=1) > 0)
        assert sorted(g["elbo_hist/counts"]) == ["digits", "digits_ood"]
        for name, n in (("digits", 120), ("digits_ood", 90)):
            assert list(g[f"elbo_hist/counts/{name}"][()].sum(1)) == [n, n, 0, n]
    df = read_table(summary / "results.h5")
    assert list(df.columns) == list(csv_df.columns)
    pd.testing.assert_series_equal(plain["accuracy"], csv_df["accuracy"], check_names=False)
    np.testing.assert_allclose(df["auroc_digits_ood_elbo"], csv_df["auroc_digits_ood_elbo"])
    assert list(df["run_id"]) == list(csv_df["run_id"])
    assert (summary / "results.md").read_text().startswith("# Sweep summary (4 runs, 4 ok)")
    pngs = sorted(p.name for p in (summary / "plots").iterdir())
    for name in (
        "fgsm_accuracy.png",
        "reliability_dhm0001.png",
        "elbo_hist_vae00000.png",
        "heatmap_accuracy.png",
        "heatmap_ece.png",
        "heatmap_fgsm_acc_eps0.0314.png",
        "heatmap_ece_ts.png",
        "heatmap_pgd_acc_eps0.0314.png",
        "heatmap_auroc_digits_ood_msp.png",
        "heatmap_auroc_digits_ood_elbo.png",
        "heatmap_auroc_digits_ood_complexity.png",
    ):
        assert name in pngs, name
    for name in pngs:
        assert (summary / "plots" / name).read_bytes()[:8] == PNG, name
    assert not [p for p in summary.rglob("*.tmp")]


def test_plot_count_capped(tmp_path):
    runs = [
        (f"r{i:07d}", "dhm", a, b)
        for i, (a, b) in enumerate(
            (a, b) for a in (0.1, 1.0, 10.0) for b in np.logspace(-4, 0, 10).round(6).tolist()
        )
    ]
    for i, r in enumerate(runs):
        arrays = make_arrays(i, "dhm", n_id=40, n_ood=30)
        write_run(tmp_path, *r, seed=i, sets=arrays)
    write_plan(tmp_path, runs)
    stale = tmp_path / "summary" / "plots" / "reliability_oldrun00.png"  # an earlier sweep's
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG)
    aggregate(tmp_path, max_plot_runs=3)
    plots = sorted(p.name for p in stale.parent.glob("*.png"))
    assert len([p for p in plots if p.startswith("reliability_")]) == 3
    assert len([p for p in plots if p.startswith("elbo_hist_")]) == 3
    # fgsm, per-run figures, 8 headline heatmaps (accuracy, ece, ece_ts, fgsm, pgd, 3 aurocs);
    # the stale one is gone
    assert len(plots) == 1 + 3 + 3 + 8
    assert not stale.exists()


def test_format_eps():
    assert format_eps(0.0) == "0"
    assert format_eps(np.float32(0.01)) == "0.01"
    assert format_eps(8 / 255) == "0.0314"
    assert format_eps(np.float32(0.03)) == "0.03"
    assert format_eps(1.0) == "1"


def test_temperature_scaling_matches_an_independent_optimiser(sweep):
    from scipy.optimize import minimize_scalar

    root, arrays = sweep
    aggregate(root, plots=False, report=False)
    df = pd.read_csv(root / "summary" / "results.csv").set_index("run_id")
    val = arrays["dhm0001"]["digits-val"]
    res = minimize_scalar(
        lambda lt: M.nll(val["logits"] / np.exp(lt), val["labels"]),
        bounds=(-5, 5),
        method="bounded",
        options={"xatol": 1e-10},
    )
    t = float(np.exp(res.x))
    row = df.loc["dhm0001"]
    assert row["temperature"] == pytest.approx(t, rel=1e-6) and t > 1  # overconfident logits
    test = arrays["dhm0001"]["digits"]
    assert row["nll_ts"] == pytest.approx(M.nll(test["logits"] / t, test["labels"]), rel=1e-6)
    ece_ts = M.expected_calibration_error(test["logits"] / t, test["labels"])
    assert row["ece_ts"] == pytest.approx(ece_ts, abs=1e-6) and row["ece_ts"] < row["ece"]
    assert pd.isna(df.loc["vae00000", "temperature"])


def test_complexity_score_effective_sample_size_and_gap(sweep):
    root, arrays = sweep
    aggregate(root, plots=False, report=False)
    row = pd.read_csv(root / "summary" / "results.csv").set_index("run_id").loc["vae00000"]
    a = arrays["vae00000"]

    def score(s):  # Serra et al. 2020: PNG bits - model bits (higher = more in-distribution)
        model_bits = s["neg_elbo"].astype(np.float64) / math.log(2) + NUM_DIMS * math.log2(255)
        return s["complexity_bits"] - model_bits

    y = np.r_[np.ones(120), np.zeros(90)]
    want = roc_auc_score(y, np.r_[score(a["digits"]), score(a["digits_ood"])])
    assert row["auroc_digits_ood_complexity"] == pytest.approx(want, rel=1e-12)
    assert row["iwae_ess"] == pytest.approx(a["digits"]["iwae_ess"].mean(dtype=np.float64))
    gap = (a["digits_ood"]["neg_elbo"].astype(np.float64) - a["digits_ood"]["neg_iwae_k4"]).mean()
    assert row["elbo_iwae_gap_digits_ood"] == pytest.approx(gap)


def _seed_sweep(tmp_path, n_seeds=3):
    runs = [
        (f"s{seed}b{b}", "dhm", 1.0, beta)
        for b, beta in enumerate((0.1, 1.0))
        for seed in range(n_seeds)
    ]
    for i, r in enumerate(runs):
        write_run(tmp_path, *r, seed=i)
    keys = ("model.beta", "train.seed")
    plan = {
        "sweep": "seeds",
        "swept_keys": list(keys),
        "runs": [
            {"run_id": r[0], "overrides": {"model.beta": r[3], "train.seed": int(r[0][1])}}
            for r in runs
        ],
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    return runs


def test_seed_cells_give_mean_std_and_n_as_numpy_does(tmp_path):
    runs = _seed_sweep(tmp_path)
    report = aggregate(tmp_path, plots=False, report=False)
    df = pd.read_csv(tmp_path / "summary" / "results.csv").set_index("run_id")
    cells = pd.read_csv(tmp_path / "summary" / "cells.csv")
    assert list(cells["n"]) == [3, 3] and list(cells["beta"]) == [0.1, 1.0]
    assert "seed" not in cells.columns and len(report.cells) == 2
    for beta, cell in zip((0.1, 1.0), cells.itertuples(), strict=True):
        ids = [r[0] for r in runs if r[3] == beta]
        assert cell.runs == " ".join(ids)
        for metric in ("accuracy", "ece", "auroc_digits_ood_elbo", "bits_per_dim"):
            values = df.loc[ids, metric].to_numpy()
            assert getattr(cell, f"{metric}_mean") == pytest.approx(np.mean(values), rel=1e-12)
            assert getattr(cell, f"{metric}_std") == pytest.approx(np.std(values, ddof=1), rel=1e-9)
    # Runs with other seeds get the spread over seeds, not bootstrap intervals.
    assert "accuracy_ci_lo" not in df.columns
    assert "Seed cells (mean ± std over seeds)" in (tmp_path / "summary/results.md").read_text()
    with h5py.File(tmp_path / "summary" / "results.h5") as f:
        assert list(f["cells/n"][()]) == [3, 3]


def test_bootstrap_intervals_cover_the_full_set_value_and_match_a_resampling_loop(sweep):
    root, arrays = sweep
    aggregate(root, plots=False, report=False)
    df = pd.read_csv(root / "summary" / "results.csv").set_index("run_id")
    for rid in ("dhm0001", "dhm0010", "resnet00"):
        row = df.loc[rid]
        for metric in (
            "accuracy",
            "ece",
            "fgsm_acc_eps0.0314",
            "pgd_acc_eps0.0314",
            "auroc_digits_ood_msp",
        ):
            assert row[f"{metric}_ci_lo"] <= row[metric] <= row[f"{metric}_ci_hi"], (rid, metric)
            assert row[f"{metric}_ci_hi"] - row[f"{metric}_ci_lo"] > 0
    # Against an independent percentile bootstrap that resamples the images in a loop.
    a = arrays["dhm0001"]
    test, ood = a["digits"], a["digits_ood"]
    rng = np.random.default_rng(1)
    acc, auc = [], []
    s_in = -M.log_softmax(test["logits"]).max(1) * -1
    s_out = -M.log_softmax(ood["logits"]).max(1) * -1
    for _ in range(2000):
        i = rng.integers(0, len(s_in), len(s_in))
        j = rng.integers(0, len(s_out), len(s_out))
        acc.append(M.accuracy(test["logits"][i], test["labels"][i]))
        auc.append(M.ood_metrics(s_in[i], s_out[j]).auroc)
    row = df.loc["dhm0001"]
    # Monte Carlo error of a 2.5% quantile with B = 1000-2000: about 0.2 sd of the statistic.
    for metric, values in (("accuracy", acc), ("auroc_digits_ood_msp", auc)):
        lo, hi = np.quantile(values, [0.025, 0.975])
        sd = np.std(values)
        assert abs(row[f"{metric}_ci_lo"] - lo) < 0.35 * sd, metric
        assert abs(row[f"{metric}_ci_hi"] - hi) < 0.35 * sd, metric


def test_headline_names_every_ood_set_and_nats_per_dim_for_activations(tmp_path):
    sets = make_arrays(0, "dhm")
    sets["svhn"] = {k: v.copy() for k, v in sets["digits_ood"].items()}
    ROLE["svhn"] = "ood"
    write_run(tmp_path, "run00000", "dhm", 1.0, 0.1, seed=0, sets=sets)
    for path in (tmp_path / "runs/run00000/eval").glob("*.h5"):
        with h5py.File(path, "r+") as f:
            f.attrs["likelihood_space"] = "activations"
    report = aggregate(tmp_path, plots=False, report=False)
    cols = list(report.rows[0])
    for ood in ("digits_ood", "svhn"):
        for score in ("msp", "elbo", "complexity"):
            assert f"auroc_{ood}_{score}" in cols
    assert "nats_per_dim" in cols and "bits_per_dim" not in cols
    assert report.rows[0]["nats_per_dim"] == pytest.approx(
        report.rows[0]["neg_elbo_nats"] / NUM_DIMS
    )
    md = (tmp_path / "summary" / "results.md").read_text()
    assert "auroc_svhn_msp" in md and "auroc_digits_ood_msp" in md


def test_a_summary_is_done_only_when_complete_and_newer_than_every_shard(sweep):
    import os
    import time

    from dhm.summary.aggregate import MANIFEST, SummaryKeptError, summary_complete

    root, _ = sweep
    assert summary_complete(root) == (False, "no summary")
    aggregate(root, plots=True)
    assert summary_complete(root) == (True, "summary complete")
    manifest = json.loads((root / "summary" / MANIFEST).read_text())
    assert "report.html" in manifest["files"] and manifest["ok"] == 4
    assert "report_data.json" in manifest["files"]
    # A killed aggregation: a plot is gone (and with it the manifest's promise).
    (root / "summary" / "plots" / "fgsm_accuracy.png").unlink()
    assert summary_complete(root)[0] is False
    aggregate(root, plots=True)
    assert summary_complete(root)[0] is True
    # A shard written after the summary makes it stale.
    shard = next((root / "runs" / "dhm0001" / "eval").glob("*.h5"))
    later = time.time() + 5
    os.utime(shard, (later, later))
    assert summary_complete(root) == (False, "summary older than the newest evaluation shard")
    # A summary with fewer complete runs never replaces a good one, unless asked.
    before = (root / "summary" / "results.csv").read_text()
    for path in (root / "runs" / "dhm0001" / "eval").glob("*.h5"):
        path.unlink()
    with pytest.raises(SummaryKeptError, match="has 4 complete runs, this aggregation 3"):
        aggregate(root, plots=False, allow_partial=True)
    assert (root / "summary" / "results.csv").read_text() == before
    aggregate(root, plots=False, allow_partial=True, replace_fewer=True)
    assert "missing" in (root / "summary" / "results.csv").read_text()


def test_the_summary_says_which_sigma_each_runs_bounds_use():

    assert bound_sigma({"bound_sigma": "fitted", "sigma_source": "fitted on 8000 ..."}) == "fitted"
    # Shards from before 2026-12-07: only sigma_source; a learned sigma was used as trained.
    assert bound_sigma({"sigma_source": "learned"}) == "trained"
    assert bound_sigma({"sigma_source": "fitted on 8000 validation images"}) == "fitted"
    assert bound_sigma({"sigma_source": "fitted at evaluation on 10 validation images"}) == (
        "fitted"
    )
    assert bound_sigma({"sigma_source": "fixed at 0.1 (no validation split)"}) == "fixed"
    assert bound_sigma({}) == "trained"


def test_bounds_under_different_sigmas_in_one_run_are_named_not_compared(sweep):
    # ID bounds under the trained sigma and OOD ones under a fitted sigma (a run evaluated
    # partly before 2026-12-07 and partly after) do not compare: the run is not ok, and says so.

    root, _ = sweep
    eval_dir = root / "runs" / "dhm0001" / "eval"
    for path in eval_dir.glob("*.h5"):
        with h5py.File(path, "r+") as f:
            f.attrs["bound_sigma"] = "fitted" if path.name.startswith("digits_ood") else "trained"
    aggregate(root, plots=False, allow_partial=True)
    df = pd.read_csv(root / "summary" / "results.csv").set_index("run_id")
    assert df.loc["dhm0001", "status"] == "corrupt"
    assert (
        "bounds under different sigmas (digits trained, digits_ood fitted)"
        in (df.loc["dhm0001", "problem"])
    )
    assert (df.drop(index="dhm0001")["status"] == "ok").all()


def test_a_swept_dataset_puts_model_after_it_and_neither_is_a_metric(tmp_path):
    # With data.name swept and model.name not, the head is ..., dataset, model: seed cells and
    # the report must take both as settings, not model as a metric (it crashed the cells).
    for i, (rid, beta) in enumerate((("dhm0001", 0.01), ("dhm0010", 0.1))):
        write_run(tmp_path, rid, "dhm", 1.0, beta, seed=i)
    write_plan(
        tmp_path,
        [("dhm0001", "digits", 1.0, 0.01), ("dhm0010", "digits", 1.0, 0.1)],
        keys=("data.name", "model.alpha", "model.beta"),
    )
    report = aggregate(tmp_path, plots=False)
    head = list(report.rows[0])[:7]
    assert head == ["run_id", "status", "dataset", "alpha", "beta", "model", "bound_sigma"]
    assert all("model_mean" not in cell for cell in report.cells)
    data = json.loads((tmp_path / "summary" / "report_data.json").read_text())
    assert data["shown"] == ["dataset", "alpha", "beta", "model"]


SNAP_A, SNAP_B = "c0de0000000a", "c0de0000000b"


def _set_code(root, run_id, code, sets=None):
    """Give a run's shards (of ``sets``, default all) the ``code`` attribute evaluate writes."""
    for path in (root / "runs" / run_id / "eval").glob("*.h5"):
        if sets is None or path.name.split("__")[0] in sets:
            with h5py.File(path, "r+") as f:
                f.attrs["code"] = code


def test_runs_name_their_code_snapshots_and_cells_that_mix_them_are_flagged(tmp_path):
    # Cell beta=0.1: one run under snapshot A, one whose ID set was evaluated again under B,
    # one with shards from before shards named their code (""): mixed. Cell beta=1: all B.
    _seed_sweep(tmp_path)
    _set_code(tmp_path, "s0b0", SNAP_A)
    _set_code(tmp_path, "s1b0", SNAP_A)
    _set_code(tmp_path, "s1b0", SNAP_B, sets={"digits"})
    for rid in ("s0b1", "s1b1", "s2b1"):
        _set_code(tmp_path, rid, SNAP_B)
    report = aggregate(tmp_path, plots=False, report=False, tensorboard=False)
    assert report.problems == []  # several snapshots are legal: nothing is refused
    df = pd.read_csv(tmp_path / "summary" / "results.csv", keep_default_na=False)
    cols = list(df.columns)
    assert cols.index("code") == cols.index("bound_sigma") + 1
    assert dict(zip(df["run_id"], df["code"], strict=True)) == {
        "s0b0": SNAP_A,
        "s1b0": f"{SNAP_A}+{SNAP_B}",
        "s2b0": "",
        "s0b1": SNAP_B,
        "s1b1": SNAP_B,
        "s2b1": SNAP_B,
    }
    cells = pd.read_csv(tmp_path / "summary" / "cells.csv", keep_default_na=False)
    assert list(cells["mixed_code"]) == [True, False]
    assert list(cells["code"]) == [f"+{SNAP_A}+{SNAP_B}", SNAP_B]  # "" sorts first
    assert "code_mean" not in cells.columns and "mixed_code_mean" not in cells.columns
    with h5py.File(tmp_path / "summary" / "results.h5") as f:
        assert list(f["table/code"].asstr()[()])[:3] == [SNAP_A, f"{SNAP_A}+{SNAP_B}", ""]
        assert list(f["cells/mixed_code"].asstr()[()]) == ["True", "False"]
    md = (tmp_path / "summary" / "results.md").read_text()
    runs_table, cells_table = md.split("## Seed cells")
    assert f"| {SNAP_A}+{SNAP_B}† |" in runs_table and f"| {SNAP_B} |" in runs_table
    assert "the run's shards were written by different code snapshots" in runs_table
    assert f"| none+{SNAP_A}+{SNAP_B}† |" in cells_table and f"| {SNAP_B} |" in cells_table
    assert "† the cell's runs ran different code snapshots" in cells_table
    note = f"- beta=0.1: `{SNAP_A}`: s0b0; `{SNAP_A}+{SNAP_B}`: s1b0; `none`: s2b0"
    assert note in cells_table and "none: no snapshot" in cells_table
    assert "beta=1:" not in cells_table  # the cell of one snapshot has no footnote line


def test_equal_code_snapshots_are_not_mixed_and_unsnapshotted_sweeps_say_nothing(tmp_path):
    _seed_sweep(tmp_path)
    report = aggregate(tmp_path, plots=False, report=False, tensorboard=False)
    assert [c["mixed_code"] for c in report.cells] == [False, False]
    assert [c["code"] for c in report.cells] == ["", ""]  # old shards: no code attribute
    md = (tmp_path / "summary" / "results.md").read_text()
    assert "| code |" not in md and "†" not in md  # every run unsnapshotted: no column
    for rid in ("s0b0", "s1b0", "s2b0", "s0b1", "s1b1", "s2b1"):
        _set_code(tmp_path, rid, SNAP_A)
    report = aggregate(tmp_path, plots=False, report=False, tensorboard=False)
    assert [c["mixed_code"] for c in report.cells] == [False, False]
    assert {r["code"] for r in report.rows} == {SNAP_A}
    md = (tmp_path / "summary" / "results.md").read_text()
    assert f"| {SNAP_A} |" in md and "†" not in md and "different code snapshots" not in md
