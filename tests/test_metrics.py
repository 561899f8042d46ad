"""Tests for dhm.summary.metrics: torch / sklearn references, hand cases, and the full-set
convention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binomtest, sem, t
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from dhm.summary import metrics as M
from dhm.summary import tables as T


def _random_logits(seed: int, n: int = 500, c: int = 10, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    return rng.normal(scale=scale, size=(n, c)), rng.integers(0, c, size=n)


def _logits_for_confidence(conf: float, c: int = 2) -> np.ndarray:
    """Logits whose softmax puts ``conf`` on class 0 and spreads the rest evenly."""
    p = np.full(c, (1.0 - conf) / (c - 1))
    p[0] = conf
    return np.log(p)


# ---------------------------------------------------------------- classification


def test_tiny_hand_case():
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = [.5, .5], [.75, .25]
    labels = np.array([1, 0])
    assert M.accuracy(logits, labels) == 0.5  # argmax ties -> class 0, wrong for row 0
    assert M.nll(logits, labels) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)
    assert M.brier_score(logits, labels) == pytest.approx((0.5 + 2 * 0.25**2) / 2)
    np.testing.assert_allclose(M.softmax(logits), [[0.5, 0.5], [0.75, 0.25]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_torch(seed):
    x, y = _random_logits(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    p = torch.softmax(xt, dim=1)
    np.testing.assert_allclose(M.softmax(x), p.numpy(), rtol=1e-12, atol=1e-15)
    assert M.accuracy(x, y) == pytest.approx((xt.argmax(1) == yt).double().mean().item())
    assert M.nll(x, y) == pytest.approx(F.cross_entropy(xt, yt).item(), rel=1e-12)
    brier = ((p - F.one_hot(yt, 10).double()) ** 2).sum(1).mean().item()
    assert M.brier_score(x, y) == pytest.approx(brier, rel=1e-12)


def test_softmax_and_nll_stable_for_huge_logits():
    x = np.array([[1000.0, 0.0, -1000.0], [-5e3, 5e3, 0.0]])
    y = np.array([0, 0])
    assert np.all(np.isfinite(M.softmax(x)))
    assert M.nll(x, y) == pytest.approx((0.0 + 1e4) / 2)


# ---------------------------------------------------------------- calibration


def _ece_loop(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """Independent ECE: Python loop over bins (lo, hi], confidence 0 in the first bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for i in range(n_bins):
        lo, hi = edges[i], edges[i + 1]
        mask = (conf > lo) & (conf <= hi)
        if i == 0:
            mask |= conf == 0.0
        if mask.any():
            total += mask.sum() / len(conf) * abs(correct[mask].mean() - conf[mask].mean())
    return total


def test_ece_perfectly_calibrated_is_zero():
    x = np.tile(_logits_for_confidence(0.8), (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert M.expected_calibration_error(x, y) == pytest.approx(0.0, abs=1e-12)


def test_ece_overconfident():
    x = np.tile(_logits_for_confidence(0.9, c=5), (10, 1))
    y = np.array([0] * 5 + [3] * 5)
    r = M.reliability(x, y)
    assert r.ece == pytest.approx(0.4)
    assert r.mce == pytest.approx(0.4)
    assert r.counts.sum() == 10 and np.count_nonzero(r.counts) == 1


def test_ece_two_bins_by_hand():
    # 4 samples at conf 0.9 (3 correct) and 6 at conf 0.6 (3 correct), 10 bins.
    x = np.vstack(
        [np.tile(_logits_for_confidence(0.9), (4, 1)), np.tile(_logits_for_confidence(0.6), (6, 1))]
    )
    y = np.array([0, 0, 0, 1, 0, 0, 0, 1, 1, 1])
    r = M.reliability(x, y, n_bins=10)
    expected = 0.4 * abs(0.75 - 0.9) + 0.6 * abs(0.5 - 0.6)
    assert r.ece == pytest.approx(expected)
    assert r.mce == pytest.approx(0.15)
    assert r.counts[8] == 4 and r.counts[5] == 6 and r.counts.sum() == 10
    assert np.isnan(r.accuracy[0]) and np.isnan(r.confidence[0])
    np.testing.assert_allclose(r.accuracy[[5, 8]], [0.5, 0.75])


@pytest.mark.parametrize("seed,n_bins", [(0, 15), (1, 10), (2, 7), (3, 1)])
def test_ece_against_loop(seed, n_bins):
    x, y = _random_logits(seed, n=2000, scale=2.0)
    p = torch.softmax(torch.from_numpy(x), 1).numpy()
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    r = M.reliability(x, y, n_bins=n_bins)
    assert r.ece == pytest.approx(_ece_loop(conf, correct, n_bins), abs=1e-12)
    assert r.counts.sum() == len(y) and r.counts.dtype.kind == "i"
    assert r.bin_edges.shape == (n_bins + 1,)
    gaps = np.abs(r.accuracy - r.confidence)
    assert r.mce == pytest.approx(np.nanmax(gaps))
    assert r.ece == pytest.approx(np.nansum(r.counts / len(y) * gaps))


def test_bin_edge_convention():
    edges = np.linspace(0.0, 1.0, 5)  # 0, .25, .5, .75, 1
    conf = np.array([0.0, edges[1], edges[2], 0.5000001, edges[3], 1.0])
    r = M.reliability_from_confidence(conf, np.ones(6, dtype=bool), n_bins=4)
    # (0, .25] <- 0 and .25 ; (.25, .5] <- .5 ; (.5, .75] <- .5000001 and .75 ; (.75, 1] <- 1
    np.testing.assert_array_equal(r.counts, [2, 1, 2, 1])
    assert r.ece == pytest.approx(_ece_loop(conf, np.ones(6), 4))
    # Through logits: softmax of equal logits is exactly 1/C, and huge margins give exactly 1.
    assert M.reliability(np.zeros((3, 2)), np.zeros(3, int), n_bins=2).counts.tolist() == [3, 0]
    quarter = M.reliability(np.zeros((3, 4)), np.zeros(3, int), n_bins=4)
    assert quarter.counts.tolist() == [3, 0, 0, 0]
    assert M.reliability(np.array([[800.0, 0.0]]), [0], n_bins=4).counts.tolist() == [0, 0, 0, 1]


# ---------------------------------------------------------------- OOD detection


def _sk_reference(s_in, s_out):
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return (
        roc_auc_score(y, s),
        average_precision_score(y, s),
        average_precision_score(1 - y, -s),
        fpr[tpr >= 0.95].min(),
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_in,n_out", [(300, 300), (50, 1000), (1000, 37), (20, 20)])
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_ood_against_sklearn(seed, n_in, n_out, decimals):
    rng = np.random.default_rng(seed)
    s_in, s_out = rng.normal(1.0, 1.0, n_in), rng.normal(0.0, 1.5, n_out)
    if decimals is not None:  # heavy ties, also across ID/OOD
        s_in, s_out = np.round(s_in, decimals), np.round(s_out, decimals)
    got = M.ood_metrics(s_in, s_out)
    ref = _sk_reference(s_in, s_out)
    np.testing.assert_allclose(
        [got.auroc, got.aupr_in, got.aupr_out, got.fpr_at_95_tpr], ref, rtol=1e-12, atol=1e-14
    )


def test_ood_perfect_and_identical():
    perfect = M.ood_metrics(np.arange(10.0, 20.0), np.arange(0.0, 10.0))
    assert perfect.auroc == 1.0 and perfect.fpr_at_95_tpr == 0.0
    assert perfect.aupr_in == 1.0 and perfect.aupr_out == 1.0
    reversed_ = M.ood_metrics(np.arange(0.0, 10.0), np.arange(10.0, 20.0))
    assert reversed_.auroc == 0.0 and reversed_.fpr_at_95_tpr == 1.0
    same = M.ood_metrics(np.full(7, 3.0), np.full(11, 3.0))  # all tied
    assert same.auroc == 0.5 and same.fpr_at_95_tpr == 1.0
    rng = np.random.default_rng(0)
    iid = M.ood_metrics(rng.normal(size=20000), rng.normal(size=20000))
    assert iid.auroc == pytest.approx(0.5, abs=0.01)
    assert iid.fpr_at_95_tpr == pytest.approx(0.95, abs=0.01)


def test_fpr95_threshold_hand_case():
    # 20 ID scores 1..20: accepting >= 95% of ID means threshold 2 (19/20 accepted).
    s_in = np.arange(1.0, 21.0)
    s_out = np.array([0.0, 1.5, 2.0, 2.5, 30.0])  # 2.0, 2.5, 30 are >= 2
    assert M.ood_metrics(s_in, s_out).fpr_at_95_tpr == pytest.approx(3 / 5)


def test_ood_validation():
    with pytest.raises(ValueError, match="2 non-finite"):
        M.ood_metrics(np.array([0.0, np.nan, np.inf]), np.zeros(3))
    with pytest.raises(ValueError, match="score_out.*1 non-finite"):
        M.ood_metrics(np.zeros(3), np.array([-np.inf, 1.0]))
    with pytest.raises(ValueError, match="empty"):
        M.ood_metrics(np.zeros(0), np.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        M.ood_metrics(np.zeros(3), [])
    with pytest.raises(ValueError, match="1-D"):
        M.ood_metrics(np.zeros((3, 2)), np.zeros(3))


def test_per_batch_average_differs_from_full_set():
    """Why metrics are computed on the full set: batch means of AUROC/ECE are biased.

    Each batch separates ID from OOD perfectly (per-batch AUROC 1), but batch 2's ID scores lie
    below batch 1's OOD scores, so over the full set only 12 of 16 (ID, OOD) pairs are ordered.
    """
    batches = [
        (np.array([10.0, 11.0]), np.array([8.0, 9.0])),
        (np.array([2.0, 3.0]), np.array([0.0, 1.0])),
    ]
    per_batch = np.mean([M.ood_metrics(i, o).auroc for i, o in batches])
    full = M.ood_metrics(
        np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    )
    assert per_batch == 1.0
    assert full.auroc == pytest.approx(0.75)
    y = np.r_[np.ones(4), np.zeros(4)]
    assert full.auroc == pytest.approx(roc_auc_score(y, np.r_[10, 11, 2, 3, 8, 9, 0, 1]))

    # ECE: both batches have confidence 0.9; accuracies 1.0 and 0.8 -> ECE 0.1 each,
    # but the full set is 90% correct at confidence 0.9, i.e. perfectly calibrated.
    x = np.tile(_logits_for_confidence(0.9), (20, 1))
    y = np.array([0] * 10 + [0] * 8 + [1] * 2)
    batch_ece = np.mean(
        [M.expected_calibration_error(x[s], y[s]) for s in (slice(0, 10), slice(10, 20))]
    )
    assert batch_ece == pytest.approx(0.1)
    assert M.expected_calibration_error(x, y) == pytest.approx(0.0, abs=1e-12)


def test_ood_large_n_is_fast():
    rng = np.random.default_rng(0)
    s_in = np.round(rng.normal(1.0, 1.0, 1_000_000), 3)
    s_out = np.round(rng.normal(0.0, 1.0, 1_000_000), 3)
    got = M.ood_metrics(s_in, s_out)
    assert got.auroc == pytest.approx(0.760, abs=0.005)  # Phi(1 / sqrt(2))


# ---------------------------------------------------------------- misc


def test_bits_per_dim():
    d = 3 * 32 * 32
    nll_nats = d * math.log(2.0) * 0.5  # 0.5 bits/dim on the x/255 scale -> + log2(255)
    assert M.bits_per_dim(nll_nats, d) == pytest.approx(0.5 + math.log2(255))
    assert isinstance(M.bits_per_dim(nll_nats, d), float)
    out = M.bits_per_dim(np.array([0.0, nll_nats]), d, pixel_levels=2)
    np.testing.assert_allclose(out, [1.0, 1.5])
    with pytest.raises(ValueError, match="num_dims"):
        M.bits_per_dim(1.0, 0)


def test_adversarial_accuracy():
    labels = np.array([0, 1, 2, 3])
    pred = np.array([[0, 1, 2, 3], [0, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_allclose(M.adversarial_accuracy(pred, labels), [1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="2-D"):
        M.adversarial_accuracy(labels, labels)
    with pytest.raises(ValueError, match="N=4"):
        M.adversarial_accuracy(pred, labels[:3])


@pytest.mark.parametrize(
    "logits,labels,match",
    [
        (np.zeros(3), np.zeros(3, int), "2-D"),
        (np.zeros((3, 2)), np.zeros((3, 1), int), "1-D"),
        (np.zeros((3, 2)), np.zeros(4, int), "N=4"),
        (np.zeros((3, 2)), np.zeros(3), "integer"),
        (np.zeros((3, 2)), np.array([0, 2, 1]), r"\[0, 2\)"),
        (np.zeros((3, 2)), np.array([0, -1, 1]), r"\[0, 2\)"),
        (np.array([[0.0, np.nan], [0.0, 1.0]]), np.zeros(2, int), "1 non-finite"),
        (np.zeros((0, 2)), np.zeros(0, int), "non-empty"),
    ],
)
@pytest.mark.parametrize(
    "fn", [M.accuracy, M.nll, M.brier_score, M.reliability, M.expected_calibration_error]
)
def test_input_validation(fn, logits, labels, match):
    with pytest.raises(ValueError, match=match):
        fn(logits, labels)


def test_dequantized_bits_per_dim_bound_the_discrete_likelihood():
    # A Gaussian density over the model's pixel scale x / 255. Pixel value k owns the cell
    # [(k - 1/2)/255, (k + 1/2)/255); its probability is the density's mass there. What
    # evaluation reports, E_u[-log p((k + u - 1/2)/255)] + log 255 with u ~ U[0, 1), is above
    # -log P(k) (Jensen) and, for a density smooth at the cell's scale, close to it. The
    # expectation is the exact midpoint rule here (no Monte Carlo error).
    from dhm.evaluation.evaluate import dequantize

    normal = torch.distributions.Normal(torch.tensor(0.4, dtype=torch.float64), 0.05)
    k = torch.arange(256, dtype=torch.float64)
    exact = -torch.log(normal.cdf((k + 0.5) / 255) - normal.cdf((k - 0.5) / 255))
    u = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000
    y = dequantize(k[:, None].to(torch.uint8).expand(-1, 4000), u[None].expand(256, -1))
    assert ((y >= (k[:, None] - 0.5) / 255) & (y < (k[:, None] + 0.5) / 255)).all()
    bound = -normal.log_prob(y).mean(1) + math.log(255)
    near = (k / 255 - 0.4).abs() < 0.1  # where P(k) is not vanishingly small
    assert torch.all(bound[near] >= exact[near] - 1e-9)
    assert torch.all(bound[near] - exact[near] < 1e-3)
    # bits_per_dim is that bound in bits: nll / ln 2 + log2(255), per dimension.
    nll = float(-normal.log_prob(y).mean(1)[100])
    assert M.bits_per_dim(nll, 1) == pytest.approx(float(bound[100]) / math.log(2))


def test_ece_and_auroc_against_torchmetrics():
    # An implementation nobody here wrote; torchmetrics bins confidences into 15 equal-width
    # bins too (its boundary convention only matters for a confidence exactly on an edge,
    # which continuous random logits never give).
    from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

    x, y = _random_logits(7, n=3000, scale=2.0)
    theirs = multiclass_calibration_error(
        torch.softmax(torch.from_numpy(x), 1),
        torch.from_numpy(y),
        num_classes=10,
        n_bins=15,
        norm="l1",
    )
    assert M.expected_calibration_error(x, y, 15) == pytest.approx(float(theirs), abs=1e-6)
    rng = np.random.default_rng(3)
    s_in, s_out = rng.normal(1.0, 1.0, 700), rng.normal(0.0, 1.3, 500)
    target = torch.cat([torch.ones(700), torch.zeros(500)]).long()
    auc = binary_auroc(torch.from_numpy(np.r_[s_in, s_out]), target)
    assert M.ood_metrics(s_in, s_out).auroc == pytest.approx(float(auc), abs=1e-6)


# ---------------------------------------------------------------- intervals


WILSON_CASES = [(0, 284), (284, 284), (1, 1), (0, 1), (5, 10), (137, 284), (3, 10_000)]


@pytest.mark.parametrize(("k", "n"), WILSON_CASES)
def test_wilson_interval_against_scipy(k, n):

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = M.wilson_interval(k, n)
    # Both are the same closed form (no iteration), so they agree to rounding: 1e-12 absolute.
    assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)
    assert isinstance(lo, float) and isinstance(hi, float)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert hi - lo > 0  # never zero width, 0/n and n/n included


def test_wilson_interval_ends_and_arrays():
    lo, hi = M.wilson_interval(0, 284)  # the case: every PGD example succeeded
    assert lo == 0.0 and 0.013 < hi < 0.014
    lo, hi = M.wilson_interval(284, 284)
    assert hi == 1.0 and 0.986 < lo < 0.987
    ks, ns = np.array([k for k, _ in WILSON_CASES]), np.array([n for _, n in WILSON_CASES])
    los, his = M.wilson_interval(ks, ns)
    assert los.shape == his.shape == (len(WILSON_CASES),)
    for (k, n), lo, hi in zip(WILSON_CASES, los, his, strict=True):
        assert (lo, hi) == M.wilson_interval(k, n)
    with pytest.raises(ValueError, match="n = 0"):
        M.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="n = 0"):
        M.wilson_interval(np.array([1, 0]), np.array([2, 0]))
    with pytest.raises(ValueError, match="whole counts"):
        M.wilson_interval(5, 4)
    with pytest.raises(ValueError, match="whole counts"):
        M.wilson_interval(1.5, 4)


def test_seed_interval_against_scipy_t_interval():

    values = [0.90, 0.91, 0.92]  # mean 0.91, sample std 0.01
    want = t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sem(values))
    lo, hi = M.seed_interval(values)
    assert lo == pytest.approx(want[0], abs=1e-12) and hi == pytest.approx(want[1], abs=1e-12)
    # By hand: 0.91 +- t_{0.975, 2} 0.01 / sqrt(3), t_{0.975, 2} = 4.302653 (tables).
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert (lo, hi) == pytest.approx((0.91 - half, 0.91 + half), abs=1e-8)
    assert M.seed_interval([0.90, None, 0.91, float("nan"), 0.92]) == (lo, hi)
    assert M.seed_interval([0.9]) is None
    assert M.seed_interval([0.9, float("nan")]) is None
    assert M.seed_interval([]) is None
    assert M.seed_interval([0.5, 0.5]) == (0.5, 0.5)  # identical seeds: zero width


def test_zero_width():
    assert M.zero_width(1.0, 1.0) and M.zero_width(0.0, 0.0)
    assert not M.zero_width(0.0, 0.0133)
    assert not M.zero_width(float("nan"), float("nan"))
    assert not M.zero_width(float("inf"), float("inf"))
    assert not M.zero_width(None, None) and not M.zero_width(1.0, None)


def test_results_md_marks_zero_width_intervals(tmp_path):

    columns = ["run_id", "status", "dataset", "accuracy", "auroc_svhn_msp", "problem"]
    columns += ["accuracy_ci_lo", "accuracy_ci_hi", "auroc_svhn_msp_ci_lo", "auroc_svhn_msp_ci_hi"]
    headline = ["accuracy", "auroc_svhn_msp"]
    perfect = {"auroc_svhn_msp": 1.0, "auroc_svhn_msp_ci_lo": 1.0, "auroc_svhn_msp_ci_hi": 1.0}
    normal = {"auroc_svhn_msp": 0.9, "auroc_svhn_msp_ci_lo": 0.88, "auroc_svhn_msp_ci_hi": 0.92}
    base = {"status": "ok", "dataset": "digits", "problem": ""}
    acc = {"accuracy": 0.0, "accuracy_ci_lo": 0.0, "accuracy_ci_hi": 0.01334574538509095}
    rows = [{"run_id": "a", **base, **acc, **perfect}, {"run_id": "b", **base, **acc, **normal}]

    assert T._with_interval(rows[0], "auroc_svhn_msp") == f"1 [1, 1]{T.ZERO_WIDTH_MARK}"
    assert T._with_interval(rows[1], "auroc_svhn_msp") == "0.9 [0.88, 0.92]"
    assert T._with_interval(rows[0], "accuracy") == "0 [0, 0.0133]"  # Wilson: no mark
    # Bounds that differ never print alike at 3 digits (which would look zero-width).
    close = {"x": 0.9997, "x_ci_lo": 0.99951, "x_ci_hi": 0.99999}
    assert T._with_interval(close, "x") == "0.9997 [0.9995, 1]"

    T.write_md(tmp_path / "a.md", columns, rows, headline, [], 0)
    md = (tmp_path / "a.md").read_text()
    (line_a,) = [ln for ln in md.splitlines() if ln.startswith("| a |")]
    assert line_a.endswith(f"| 1 [1, 1]{T.ZERO_WIDTH_MARK} |  |")
    assert f"{T.ZERO_WIDTH_MARK} zero-width bootstrap interval: every resample" in md
    assert md.index("| b |") < md.index("zero-width bootstrap interval") < md.index("## Problems")

    T.write_md(tmp_path / "b.md", columns, rows[1:], headline, [], 0)
    md = (tmp_path / "b.md").read_text()
    assert T.ZERO_WIDTH_MARK not in md and "zero-width" not in md
    assert "0.9 [0.88, 0.92]" in md and "Wilson" in md


def test_results_md_seed_cells_show_the_t_interval(tmp_path):

    columns = ["run_id", "status", "beta", "dataset", "accuracy", "problem"]
    rows = [{"run_id": r, "status": "ok", "beta": 0.1, "dataset": "d", "accuracy": 0.9}
            for r in ("a", "b", "c")]  # fmt: skip
    lo, hi = M.seed_interval([0.91, 0.90, 0.93])
    cell = {"beta": 0.1, "dataset": "d", "n": 3, "runs": "a b c", "accuracy_mean": 0.9133}
    cell |= {"accuracy_std": 0.01528, "accuracy_ci_lo": lo, "accuracy_ci_hi": hi}
    same = {"beta": 1.0, "dataset": "d", "n": 2, "runs": "d e", "accuracy_mean": 1.0}
    same |= {"accuracy_std": 0.0, "accuracy_ci_lo": 1.0, "accuracy_ci_hi": 1.0}
    alone = {"beta": 10.0, "dataset": "d", "n": 1, "runs": "f", "accuracy_mean": 0.5}
    alone |= {"accuracy_std": None, "accuracy_ci_lo": None, "accuracy_ci_hi": None}
    T.write_md(tmp_path / "r.md", columns, rows, ["accuracy"], [], 0, [cell, same, alone])
    md = (tmp_path / "r.md").read_text()
    seeds = md.split("## Seed cells (mean ± std over seeds)")[1].split("## Problems")[0]
    assert "| beta | dataset | n | accuracy |" in seeds  # the bounds are not settings columns
    assert f"| 0.1 | d | 3 | 0.9133 ± 0.015 [{lo:.3g}, {hi:.3g}] |" in seeds
    assert f"| 1 | d | 2 | 1 ± 0 [1, 1]{T.ZERO_WIDTH_MARK} |" in seeds
    assert "| 10 | d | 1 | 0.5 |" in seeds
    assert "Student-t" in seeds and "zero-width interval: every seed gave the same value" in seeds
