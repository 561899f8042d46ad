"""Summary figures of a sweep (matplotlib Agg canvas, PNG), a bounded number however many runs.

``write_plots`` draws, under ``<summary>/plots/``:

* ``fgsm_accuracy.png``: adversarial accuracy vs FGSM epsilon, at most ``max_plot_runs`` lines;
* ``reliability_<run_id>.png`` and ``elbo_hist_<run_id>.png`` for at most ``max_plot_runs`` runs
  (spread evenly over the sweep's row order, so a grid is sampled end to end);
* ``heatmap_<column>.png`` over the alpha x beta grid when alpha and/or beta take >= 2 values.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot global state, no backend switch)
and each file is written under a temporary name and renamed, so a killed job leaves no half PNG.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _margins(
    fig: Figure, left: float = 0.8, bottom: float = 0.6, top: float = 0.5, right: float = 0.2
) -> None:
    """Fixed margins in inches: tight_layout measures every text and costs more than the plot."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h)


def spread(n: int, k: int) -> list[int]:
    """At most ``k`` indices of ``range(n)``, evenly spaced and including both ends."""
    if k <= 0 or n == 0:
        return []
    if n <= k:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, k).round()})


def _tick(v: float) -> str:
    """Log-scale style tick label: 10^e for exact powers of ten, else 2 significant digits."""
    if v <= 0:
        return f"{v:g}"
    e = math.log10(v)
    return f"$10^{{{round(e)}}}$" if abs(e - round(e)) < 1e-9 else f"{v:.2g}"


def fgsm_figure(curves: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> Figure:
    """Accuracy [E] vs eps [E] (pixel units in [0, 1]) per (label, eps, accuracy)."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for label, eps, acc in curves:
        ax.plot(eps, acc, marker="o", ms=3, label=label)
    ax.set(xlabel="FGSM epsilon (pixel scale [0, 1])", ylabel="accuracy", ylim=(0, 1.02))
    ax.set_title("Adversarial accuracy under FGSM (in-distribution test set)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    _margins(fig, top=0.4)
    return fig


def reliability_figure(title: str, rel: Any) -> Figure:
    """Reliability diagram from a ``dhm.metrics.Reliability`` (15 equal-width bins)."""
    fig = Figure(figsize=(4.8, 4.8))
    ax = fig.add_subplot()
    edges = rel.bin_edges
    width = np.diff(edges)
    acc = np.nan_to_num(rel.accuracy)
    ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="k", alpha=0.7, label="accuracy")
    gap = np.where(rel.counts > 0, np.nan_to_num(rel.confidence) - acc, 0.0)
    ax.bar(
        edges[:-1],
        gap,
        bottom=acc,
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max p(y|x))", ylabel="accuracy")
    ax.set_title(f"{title}\nECE {rel.ece:.4f}, MCE {rel.mce:.4f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    _margins(fig, top=0.55)
    return fig


def elbo_hist_figure(
    title: str, edges: np.ndarray, hists: dict[str, np.ndarray], id_set: str | None
) -> Figure:
    """-ELBO histograms (nats) on shared ``edges`` [B+1]; densities, since set sizes differ."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for name in sorted(hists, key=lambda n: (n != id_set, n)):
        counts = hists[name]
        density = counts / max(counts.sum(), 1) / np.diff(edges)
        label = f"{name} (ID)" if name == id_set else f"{name} (OOD)"
        ax.stairs(
            density, edges, fill=name == id_set, alpha=0.4 if name == id_set else 1.0, label=label
        )
    ax.set(xlabel="-ELBO per image (nats; end bins hold the outer 0.1%)", ylabel="density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    _margins(fig, top=0.4)
    return fig


def heatmap_figure(metric: str, alpha: np.ndarray, beta: np.ndarray, value: np.ndarray) -> Figure:
    """Mean ``value`` per (alpha, beta) cell; inputs [R] over runs, NaN values ignored."""
    alphas, betas = np.unique(alpha), np.unique(beta)
    total = np.zeros((betas.size, alphas.size))
    count = np.zeros_like(total)
    ok = ~np.isnan(value)
    np.add.at(
        total, (np.searchsorted(betas, beta[ok]), np.searchsorted(alphas, alpha[ok])), value[ok]
    )
    np.add.at(count, (np.searchsorted(betas, beta[ok]), np.searchsorted(alphas, alpha[ok])), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(count > 0, total / count, np.nan)
    fig = Figure(figsize=(max(4.0, 2.2 + 0.9 * alphas.size), max(3.0, 1.6 + 0.5 * betas.size)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.1, pad=0.03)
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(
                j,
                i,
                f"{v:.3g}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if v > mid else "white",
            )
    ax.set_xticks(range(alphas.size), [_tick(a) for a in alphas])
    ax.set_yticks(range(betas.size), [_tick(b) for b in betas])
    ax.set(xlabel="alpha (cross-entropy weight)", ylabel="beta (-ELBO weight)")
    several = count.max() > 1
    ax.set_title(metric + (" (mean over runs per cell)" if several else ""), fontsize=9)
    _margins(fig, left=1.0, right=0.6, top=0.4)
    return fig


def _number(v: Any) -> float:
    return (
        float(v) if isinstance(v, int | float | np.number) and not isinstance(v, bool) else np.nan
    )


def write_plots(
    plot_dir: Path,
    runs: Sequence[Any],
    rows: list[dict],
    labels: dict[str, str],
    heat_metrics: list[str],
    max_plot_runs: int,
) -> list[Path]:
    """Every summary figure (see module docstring); returns the paths written.

    ``runs`` are ``dhm.aggregate.RunSummary`` objects in row order; PNGs left in ``plot_dir``
    by an earlier aggregation that this one did not write are removed, so the count stays capped.
    """
    plot_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with_fgsm = [r for r in runs if r.fgsm is not None]
    curves = [
        (labels[r.run_id], *r.fgsm)
        for r in (with_fgsm[i] for i in spread(len(with_fgsm), max_plot_runs))
    ]
    if curves:
        written.append(_save(fgsm_figure(curves), plot_dir / "fgsm_accuracy.png"))
    with_rel = [r for r in runs if r.reliability is not None]
    for i in spread(len(with_rel), max_plot_runs):
        r = with_rel[i]
        fig = reliability_figure(f"{r.run_id}: {labels[r.run_id]}", r.reliability)
        written.append(_save(fig, plot_dir / f"reliability_{r.run_id}.png"))
    with_hist = [r for r in runs if r.hists]
    for i in spread(len(with_hist), max_plot_runs):
        r = with_hist[i]
        fig = elbo_hist_figure(f"{r.run_id}: {labels[r.run_id]}", r.hist_edges, r.hists, r.id_set)
        written.append(_save(fig, plot_dir / f"elbo_hist_{r.run_id}.png"))
    written += _heatmaps(plot_dir, rows, heat_metrics)
    keep = {p.name for p in written}
    for stale in plot_dir.glob("*.png"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return written


def _heatmaps(plot_dir: Path, rows: list[dict], metrics: list[str]) -> list[Path]:
    """Heatmaps over alpha x beta of the ok runs of the most common model kind."""
    if not rows or "alpha" not in rows[0] or "beta" not in rows[0]:
        return []
    grid_rows = [
        r
        for r in rows
        if r["status"] == "ok"
        and not (math.isnan(_number(r["alpha"])) or math.isnan(_number(r["beta"])))
    ]
    if not grid_rows:
        return []
    model = Counter(r.get("model") for r in grid_rows).most_common(1)[0][0]
    grid_rows = [r for r in grid_rows if r.get("model") == model]
    alpha = np.array([_number(r["alpha"]) for r in grid_rows])
    beta = np.array([_number(r["beta"]) for r in grid_rows])
    if np.unique(alpha).size < 2 and np.unique(beta).size < 2:
        return []
    out = []
    for metric in metrics:
        value = np.array([_number(r.get(metric)) for r in grid_rows])
        if np.isnan(value).all():
            continue
        fig = heatmap_figure(f"{metric} ({model})", alpha, beta, value)
        out.append(_save(fig, plot_dir / f"heatmap_{metric}.png"))
    return out
