"""Full-set evaluation metrics for Deep Hybrid Models (numpy only).

Every metric here is computed over the FULL evaluation set in one pass. The earlier thesis code
computed ECE and AUROC per mini-batch and averaged the results, which is biased: AUROC is a
statistic over all (ID, OOD) pairs and ECE over all samples in a confidence bin, and neither
decomposes into a mean over batches (see ``tests/test_metrics.py::test_per_batch_average_*``).
Accumulate logits / scores over the whole set, then call these functions once.

Conventions
-----------
* ``logits``: ``[N, C]`` real array (any float dtype; computed in float64); ``labels``: ``[N]``
  integer class indices in ``[0, C)``.
* Log-likelihoods are in nats unless the name says bits.
* Calibration is top-label with ``n_bins`` equal-width bins on [0, 1]; bin ``i`` is the half-open
  interval ``(edges[i], edges[i+1]]`` (Guo et al. 2017, ``I_m = ((m-1)/M, m/M]``) and a
  confidence of exactly 0 goes to bin 0.
* OOD detection: in-distribution (ID) is the POSITIVE class and a HIGHER score means "more
  in-distribution" (max softmax probability, ELBO = -neg_elbo, IWAE bound, ...).
* Uncertainty (95% intervals): proportions of test images (accuracy, FGSM / PGD accuracy) get
  ``wilson_interval``; the other metrics get ``Bootstrap``, which resamples test images (the
  same resamples for every run of a sweep, so differences between runs are paired); a seed
  cell's mean over seeds gets ``seed_interval``; ``zero_width`` tells a collapsed interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Bootstrap",
    "OODScores",
    "Reliability",
    "accuracy",
    "adversarial_accuracy",
    "bits_per_dim",
    "brier_score",
    "expected_calibration_error",
    "fit_temperature",
    "log_softmax",
    "nll",
    "ood_metrics",
    "placements",
    "reliability",
    "reliability_from_confidence",
    "seed_interval",
    "softmax",
    "wilson_interval",
    "zero_width",
]


def _check_logits(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"logits must be 2-D [N, C], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"logits must be non-empty [N, C], got shape {x.shape}")
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ValueError(f"logits contain {bad} non-finite value(s)")
    return x


def _check_labels(labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"labels have N={y.shape[0]} but predictions have N={n}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {y.dtype}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    return y.astype(np.int64, copy=False)


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = _check_logits(logits)
    return x, _check_labels(labels, x.shape[0], x.shape[1])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis. ``[N, C] -> [N, C]`` float64 (nats)."""
    x = _check_logits(logits)
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis. ``[N, C] -> [N, C]`` float64."""
    x = _check_logits(logits)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1]. ``logits [N, C]``, ``labels [N]``."""
    x, y = _check(logits, labels)
    return float(np.mean(x.argmax(axis=1) == y))


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood ``-1/N sum_n log p(y_n | x_n)`` in nats (via log-softmax)."""
    x, y = _check(logits, labels)
    z = x - x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(y.shape[0]), y]))


def brier_score(logits: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score ``1/N sum_n sum_c (p_nc - onehot_nc)^2``, in [0, 2]."""
    x, y = _check(logits, labels)
    p = softmax(x)
    p[np.arange(y.shape[0]), y] -= 1.0
    return float(np.mean(np.einsum("nc,nc->n", p, p)))


@dataclass
class Reliability:
    """Top-label reliability diagram and calibration errors (see module docstring for bins)."""

    bin_edges: np.ndarray  # [n_bins + 1], linspace(0, 1, n_bins + 1)
    counts: np.ndarray  # [n_bins] int64, samples per bin (sums to N)
    accuracy: np.ndarray  # [n_bins] mean correctness per bin, nan where empty
    confidence: np.ndarray  # [n_bins] mean top-label confidence per bin, nan where empty
    ece: float  # sum_b (n_b / N) |acc_b - conf_b|
    mce: float  # max over non-empty bins of |acc_b - conf_b|


def reliability_from_confidence(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15
) -> Reliability:
    """Reliability from top-label ``confidence [N]`` in [0, 1] and boolean ``correct [N]``.

    Bin ``i`` is ``(edges[i], edges[i+1]]`` with ``edges = linspace(0, 1, n_bins + 1)``; a
    confidence of exactly 0 goes to bin 0 and one equal to an edge goes to the bin that edge
    closes (e.g. 0.5 with 2 bins -> bin 0, 1.0 -> last bin).
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    n_bins = int(n_bins)
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    if conf.ndim != 1 or conf.shape != corr.shape or conf.shape[0] == 0:
        raise ValueError(f"need non-empty 1-D confidence/correct, got {conf.shape}, {corr.shape}")
    if not np.all((conf >= 0.0) & (conf <= 1.0)):
        raise ValueError("confidence must lie in [0, 1] (and be finite)")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") gives the first edge >= conf, i.e. conf in (edges[i-1], edges[i]].
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=corr, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    nonempty = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_b = np.where(nonempty, sum_acc / counts, np.nan)
        conf_b = np.where(nonempty, sum_conf / counts, np.nan)
    gap = np.abs(acc_b - conf_b)
    ece = float(np.sum(np.abs(sum_acc - sum_conf)) / conf.shape[0])
    return Reliability(edges, counts, acc_b, conf_b, ece, float(np.max(gap[nonempty])))


def reliability(logits: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> Reliability:
    """Top-label reliability of ``softmax(logits) [N, C]`` w.r.t. ``labels [N]`` (Guo et al. 2017).

    Confidence is ``max_c p_c``, correctness is ``argmax_c p_c == y``; equal-width bins
    ``(edges[i], edges[i+1]]`` on [0, 1] (confidence 0 -> bin 0). ECE/MCE are fractions in [0, 1].
    """
    x, y = _check(logits, labels)
    z = x - x.max(axis=1, keepdims=True)
    conf = np.minimum(1.0 / np.exp(z).sum(axis=1), 1.0)  # max softmax prob = exp(0) / sum
    return reliability_from_confidence(conf, x.argmax(axis=1) == y, n_bins)


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Full-set top-label ECE (fraction in [0, 1]); see :func:`reliability`."""
    return reliability(logits, labels, n_bins).ece


@dataclass
class OODScores:
    """OOD-detection metrics, all fractions in [0, 1]."""

    auroc: float  # P(s_in > s_out) + 0.5 P(s_in == s_out)
    aupr_in: float  # average precision, ID positive, score as is
    aupr_out: float  # average precision, OOD positive, score negated
    fpr_at_95_tpr: float  # fraction of OOD accepted at the threshold accepting >= 95% of ID


def _check_scores(score: np.ndarray, name: str) -> np.ndarray:
    s = np.asarray(score, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {s.shape}")
    if s.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    bad = int(s.shape[0] - np.count_nonzero(np.isfinite(s)))
    if bad:
        raise ValueError(f"{name} contains {bad} non-finite value(s) (nan/inf)")
    return s


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """Step-wise AP from per-threshold counts ``pos, neg [G]`` ordered by decreasing score."""
    tps, fps = np.cumsum(pos), np.cumsum(neg)
    precision = tps / (tps + fps)
    return float(np.sum(pos * precision) / tps[-1])


def ood_metrics(score_in: np.ndarray, score_out: np.ndarray) -> OODScores:
    """Full-set OOD metrics from ``score_in [N_in]`` and ``score_out [N_out]`` (higher = more ID).

    * ``auroc``: Mann-Whitney U / (N_in N_out), ties count 1/2 (= ``sklearn roc_auc_score``).
    * ``aupr_in``: average precision ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds,
      ID positive, step-wise without interpolation (= ``sklearn average_precision_score``).
    * ``aupr_out``: the same with OOD positive and the score negated.
    * ``fpr_at_95_tpr``: with ROC points ``(FPR(t), TPR(t))`` for every distinct score ``t``
      (predict ID iff score >= t), the smallest FPR among points with ``TPR >= 0.95``; i.e. the
      fraction of OOD samples with score >= the highest threshold that accepts at least 95% of ID.
      Equals ``fpr[tpr >= 0.95].min()`` from ``sklearn roc_curve(..., drop_intermediate=False)``
      (the default ``drop_intermediate=True`` may drop that exact point).

    Raises ``ValueError`` on empty inputs, non-1-D inputs or non-finite scores.
    """
    s_in = _check_scores(score_in, "score_in")
    s_out = _check_scores(score_out, "score_out")
    n_in, n_out = s_in.shape[0], s_out.shape[0]
    # One sort: group by distinct score value (ascending), count ID / OOD per group.
    uniq, inv = np.unique(np.concatenate([s_in, s_out]), return_inverse=True)
    g = uniq.shape[0]
    pos = np.bincount(inv[:n_in], minlength=g)[::-1].astype(np.float64)  # decreasing score
    neg = np.bincount(inv[n_in:], minlength=g)[::-1].astype(np.float64)

    tps, fps = np.cumsum(pos), np.cumsum(neg)
    # Trapezoid under the ROC in count units == Mann-Whitney U with ties counted 1/2.
    tps_prev = tps - pos
    auroc = float(np.sum(neg * (tps_prev + 0.5 * pos)) / (n_in * n_out))

    tpr = tps / n_in
    first = int(np.argmax(tpr >= 0.95))  # tpr is non-decreasing and ends at 1.0
    fpr95 = float(fps[first] / n_out)

    return OODScores(
        auroc=auroc,
        aupr_in=_average_precision(pos, neg),
        aupr_out=_average_precision(neg[::-1], pos[::-1]),
        fpr_at_95_tpr=fpr95,
    )


def bits_per_dim(
    neg_log_likelihood_nats: np.ndarray | float, num_dims: int, pixel_levels: int = 255
) -> np.ndarray | float:
    """Bits per dim of 8-bit images from ``-log p(y)`` (nats) of their dequantized versions.

    The model's pixel grid is x / ``pixel_levels`` (spacing 1/255 for x / 255), and evaluation
    dequantizes each pixel uniformly over its own grid cell, y = (x + u - 1/2) / 255. Then
    -log P(x) <= E_u[-log p(y)] + D log 255, the bound in bits: ``nll / (D ln 2) +
    log2(pixel_levels)``. Shape is preserved; a scalar input gives a float.
    """
    if int(num_dims) != num_dims or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims}")
    if int(pixel_levels) != pixel_levels or pixel_levels < 1:
        raise ValueError(f"pixel_levels must be a positive integer, got {pixel_levels}")
    x = np.asarray(neg_log_likelihood_nats, dtype=np.float64)
    out = x / (num_dims * math.log(2.0)) + math.log2(pixel_levels)
    return float(out) if out.ndim == 0 else out


def adversarial_accuracy(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy per attack strength: predicted classes ``pred [E, N]``, ``labels [N]`` -> ``[E]``.

    Row ``e`` holds the predictions under the ``e``-th perturbation budget (epsilon).
    """
    p = np.asarray(pred)
    if p.ndim != 2:
        raise ValueError(f"pred must be 2-D [E, N], got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"pred must have an integer dtype, got {p.dtype}")
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != p.shape[1]:
        raise ValueError(f"labels must be 1-D with N={p.shape[1]}, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {y.dtype}")
    if p.shape[1] == 0:
        raise ValueError("pred/labels are empty (N = 0)")
    return np.mean(p == y[None, :], axis=1, dtype=np.float64)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> float:
    """Temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    The NLL is convex in b = 1/T (log-sum-exp of a linear function minus a linear one), so
    Newton's method on b, with step halving, finds the minimum; b is kept in [1e-3, 1e3]
    (T in [1e-3, 1e3]: a separable set drives the optimum to T -> 0).
    """
    x, y = _check(logits, labels)
    z = x - x.max(axis=1, keepdims=True)
    zy = z[np.arange(y.shape[0]), y]

    def nll_at(b: float) -> float:
        s = b * z
        return float(
            np.mean(np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1) - b * zy)
        )

    b, f = 1.0, nll_at(1.0)
    for _ in range(max_iter):
        s = b * z
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        mean_z = (p * z).sum(1)
        grad = float(np.mean(mean_z - zy))
        hess = float(np.mean((p * z * z).sum(1) - mean_z**2))
        if abs(grad) < 1e-12:
            break
        step = grad / hess if hess > 1e-300 else math.copysign(b, grad)
        new = min(max(b - step, 1e-3), 1e3)
        f_new = nll_at(new)
        while f_new > f and abs(new - b) > 1e-15:
            new = (new + b) / 2
            f_new = nll_at(new)
        if abs(new - b) <= 1e-14 * b:
            break
        b, f = new, f_new
    return 1.0 / b


def placements(score_in: np.ndarray, score_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placement values: for each ID score the fraction of OOD scores below it (ties
    1/2), and for each OOD score the fraction of ID scores above it. AUROC is the mean of
    either; they are the first-order (Hajek) projection of AUROC onto single images."""
    s_in, s_out = _check_scores(score_in, "score_in"), _check_scores(score_out, "score_out")
    o, i = np.sort(s_out), np.sort(s_in)
    v10 = (np.searchsorted(o, s_in, "left") + np.searchsorted(o, s_in, "right")) / (2 * len(o))
    below = np.searchsorted(i, s_out, "left") + np.searchsorted(i, s_out, "right")
    v01 = 1.0 - below / (2 * len(i))
    return v10, v01


class Bootstrap:
    """95% percentile intervals over resampled test images, vectorised.

    ``weights(n, tag)`` is a [B, n] float32 matrix of multinomial resample counts (row b: how
    often resample b draws each of the n images), seeded by (seed, tag, n) and cached, so every
    run of a sweep is resampled with the same draws (paired comparisons) and the draws cost
    once per set. ECE is an exact bootstrap (per-bin resampled sums, one [B, n] x [n, bins]
    product); proportions (accuracy) take :func:`wilson_interval` instead, which never
    collapses to [0, 0] or [1, 1]. AUROC uses its Hajek projection on the placement values
    (DeLong et al. 1988), AUC* = AUC + mean*(v10 - AUC) + mean*(v01 - AUC) with independent
    resamples of the ID and OOD images: the bootstrap of AUROC's first-order term, O(B n)
    instead of a re-ranking per resample.
    """

    def __init__(self, replicates: int = 1000, seed: int = 0):
        self.replicates, self.seed = replicates, seed
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def weights(self, n: int, tag: str) -> np.ndarray:
        key = (tag, n)
        if key not in self._cache:
            words = [self.seed, n, *tag.encode()]
            rng = np.random.default_rng(np.random.SeedSequence(words))
            draws = rng.integers(0, n, size=(self.replicates, n))
            flat = draws + (np.arange(self.replicates) * n)[:, None]
            counts = np.bincount(flat.ravel(), minlength=self.replicates * n)
            self._cache[key] = counts.reshape(self.replicates, n).astype(np.float32)
        return self._cache[key]

    @staticmethod
    def interval(values: np.ndarray) -> tuple[float, float]:
        lo, hi = np.quantile(values, [0.025, 0.975])
        return float(lo), float(hi)

    def ece(
        self, confidence: np.ndarray, correct: np.ndarray, tag: str, n_bins: int = 15
    ) -> tuple[float, float]:
        """Interval of the top-label ECE (bins as in :func:`reliability_from_confidence`)."""
        conf = np.asarray(confidence, dtype=np.float64)
        n = len(conf)
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
        gap = np.zeros((n, n_bins), np.float32)
        gap[np.arange(n), idx] = np.asarray(correct, np.float64) - conf
        return self.interval(np.abs(self.weights(n, tag) @ gap).sum(1) / n)

    def auroc(
        self, score_in: np.ndarray, score_out: np.ndarray, auc: float, tag_in: str, tag_out: str
    ) -> tuple[float, float]:
        """Interval of AUROC through its Hajek projection (see the class docstring)."""
        v10, v01 = placements(score_in, score_out)
        w_in, w_out = self.weights(len(v10), tag_in), self.weights(len(v01), tag_out)
        d_in = w_in @ (v10 - auc).astype(np.float32) / len(v10)
        d_out = w_out @ (v01 - auc).astype(np.float32) / len(v01)
        return self.interval(np.clip(auc + d_in + d_out, 0.0, 1.0))


def wilson_interval(
    k: int | np.ndarray, n: int | np.ndarray, z: float = 1.959963984540054
) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (lo, hi) in [0, 1] of a proportion: ``k`` successes of ``n`` trials.

    For accuracy, FGSM and PGD accuracy: k test images classified correctly of n. The
    bootstrap of such a proportion has zero width at 0/n and n/n (resampling a set in which
    no image survives the attack never draws one that does), though a true accuracy above 0
    can give 0/284; Wilson's interval keeps a positive width there (0/284 -> [0, 0.0133]).
    ``z`` is the two-sided normal quantile (default: 95%). Closed form (Newcombe 1998), equal
    to ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``. Counts broadcast:
    ints give floats, arrays give float64 arrays. Raises ``ValueError`` unless n >= 1 and
    0 <= k <= n are whole numbers.
    """
    k_ = np.asarray(k, dtype=np.float64)
    n_ = np.asarray(n, dtype=np.float64)
    if np.any(n_ == 0):
        raise ValueError("wilson_interval: n = 0 trials (no test images), no proportion to bound")
    if not np.all((n_ >= 1) & (k_ >= 0) & (k_ <= n_) & (k_ == np.round(k_)) & (n_ == np.round(n_))):
        raise ValueError(f"wilson_interval needs whole counts 0 <= k <= n, n >= 1; got {k=}, {n=}")
    p = k_ / n_
    denom = 2 * (n_ + z * z)
    center = (2 * n_ * p + z * z) / denom
    delta = z / denom * np.sqrt(4 * n_ * p * (1 - p) + z * z)
    lo = np.where(k_ == 0, 0.0, center - delta)  # exact bounds at the ends, no rounding residue
    hi = np.where(k_ == n_, 1.0, center + delta)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def seed_interval(values: np.ndarray | list[float]) -> tuple[float, float] | None:
    """95% Student-t interval of the mean over seeds: ``mean +- t_{0.975, n-1} std / sqrt(n)``.

    ``values [n]``: one metric of a seed cell's runs, in the metric's units; non-finite entries
    (None, NaN) are dropped, and fewer than 2 finite values give None. ``std`` is the sample
    std (ddof = 1). The spread over seeds is training randomness, which the test-image
    intervals do not cover; with 3 seeds t = 4.30 (not 1.96), so few seeds give wide
    intervals. Not clipped: for a fraction, a bound beyond [0, 1] says the seeds are too few
    to pin the mean down. Equals ``scipy.stats.t.interval(0.95, n - 1, mean, sem)``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size < 2:
        return None
    from scipy.stats import t  # only the summary needs it; keeps `import metrics` numpy-only

    mean = float(v.mean())
    half = float(t.ppf(0.975, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean - half, mean + half


def zero_width(lo: float | None, hi: float | None) -> bool:
    """Whether an interval is one point: ``lo == hi``, both finite (None or NaN: False).

    A percentile bootstrap interval collapses when every resample gives the same value, e.g.
    AUROC = 1 when ID and OOD scores are perfectly separated (any resample stays separated).
    That is a property of resampling, not certainty about the metric, so the tables mark it.
    """
    if lo is None or hi is None:
        return False
    lo, hi = float(lo), float(hi)
    return math.isfinite(lo) and math.isfinite(hi) and lo == hi
