"""Summary figures of a sweep (matplotlib Agg canvas, PNG), a bounded number however many runs.

``write_plots`` draws, under ``<summary>/plots/``:

* ``fgsm_accuracy.png``: adversarial accuracy vs FGSM epsilon (and PGD, dashed), at most
  ``max_plot_runs`` runs;
* ``reliability_<run_id>.png`` (with a per-bin count panel) and ``elbo_hist_<run_id>.png`` for
  at most ``max_plot_runs`` runs (spread evenly over the sweep's row order); the latter has one
  -ELBO panel per OOD set (binned over the ID set and that set only) and, when the row has
  bits/dim columns, a bar panel of the model's (and PNG's) bits/dim per set beside the uniform
  model's 8 bits/dim;
* ``heatmap_<column>.png`` of each headline metric over the two swept settings that vary
  (alpha x beta for the thesis study), colour limits fixed to [0, 1], failed runs hatched with
  their status, cells whose metric does not apply to the model (a vae's accuracy) light grey
  with n/a, and the baselines (other model kinds) in a strip beside the grid.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot global state, no backend switch),
saved with a tight bounding box (no clipped labels) and written under a temporary name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from dhm.core.fsutil import atomic_path
from dhm.summary.tables import (
    axis_values,
    bits_by_set,
    column_meta,
    grid_layout,
    metric_applies,
)

NOT_APPLICABLE = "n/a"  # a heatmap cell whose metric the model cannot have (a vae's accuracy)
NA_FACE, NA_TEXT = "0.93", "0.45"  # light grey, grey text: neutral, unlike a failed run's red
UNIFORM_BITS = 8.0  # bits/dim of the uniform model over 256 pixel levels: the reference line


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", pad_inches=0.15)
    return path


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


def fgsm_figure(curves: Sequence[tuple[str, Any, Any]]) -> Figure:
    """Accuracy vs eps (pixel units in [0, 1]) per (label, fgsm (eps, acc), pgd (eps, acc) or
    None): FGSM solid, PGD dashed in the same colour."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for k, (label, fgsm, pgd) in enumerate(curves):
        colour = f"C{k % 10}"
        ax.plot(*fgsm, marker="o", ms=3, color=colour, label=label)
        if pgd is not None:
            ax.plot(*pgd, ls="--", marker="x", ms=3, color=colour)
    ax.set(xlabel="attack epsilon (L-inf, pixel scale [0, 1])", ylabel="accuracy", ylim=(0, 1.02))
    ax.set_title("Accuracy under attack on the test set (solid: FGSM, dashed: PGD)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return fig


def reliability_figure(title: str, rel: Any) -> Figure:
    """Reliability diagram from a ``dhm.summary.metrics.Reliability`` (15 equal-width bins), above a
    panel with the number of test images in each confidence bin."""
    fig = Figure(figsize=(4.8, 6.0))
    ax, counts = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
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
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in bin")
    ax.set_title(f"{title}\nECE {rel.ece:.4f}, MCE {rel.mce:.4f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    counts.bar(edges[:-1], rel.counts, width=width, align="edge", color="0.5", edgecolor="k")
    counts.set(xlabel="confidence (max p(y|x))", ylabel="images")
    return fig


def _density_tick(v: float, top: float) -> str:
    """A density tick label: exponent form (7.6e-05) when the axis tops out below 1e-3, so a
    small density never reads as a count."""
    if v == 0:
        return "0"
    return f"{v:.1e}" if top < 1e-3 else f"{v:.3g}"


def _hist_panel(
    ax: Any, edges: np.ndarray, hists: dict[str, np.ndarray], id_set: str | None
) -> None:
    """One panel: each set's -ELBO density (counts / total / bin width, per nat) on ``edges``."""
    for k, name in enumerate(sorted(hists, key=lambda n: (n != id_set, n))):
        counts = hists[name]
        density = counts / max(counts.sum(), 1) / np.diff(edges)
        ident = name == id_set
        ax.stairs(
            density,
            edges,
            fill=ident,
            alpha=0.4 if ident else 1.0,
            color=f"C{k % 10}",
            label=f"{name} ({'ID' if ident else 'OOD'})",
        )
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _density_tick(v, ax.get_ylim()[1])))
    ax.set(xlabel="-ELBO per image (nats)", ylabel="density (per nat)")
    ax.legend(fontsize=7, loc="upper right")


def _bits_panel(ax: Any, bits: dict[str, list[float | None]], id_set: str | None) -> None:
    """bits/dim per set: the model's (solid) and the PNG codec's (hatched) beside it, with the
    uniform model's 8 bits/dim as a reference line."""
    names = sorted(bits, key=lambda n: (n != id_set, n))
    x = np.arange(len(names))
    model = [np.nan if bits[n][0] is None else bits[n][0] for n in names]
    png = [np.nan if bits[n][1] is None else bits[n][1] for n in names]
    has_png = not np.isnan(png).all()
    width = 0.38 if has_png else 0.6
    shift = width / 2 if has_png else 0.0
    ax.bar(x - shift, model, width, color="tab:blue", label="model (-ELBO)")
    if has_png:
        ax.bar(x + shift, png, width, color="white", ec="tab:blue", hatch="//", label="PNG codec")
    ax.axhline(UNIFORM_BITS, color="k", ls="--", lw=1, label=f"uniform ({UNIFORM_BITS:g} bits/dim)")
    top = np.nanmax([*model, *png, UNIFORM_BITS])
    ax.set(ylabel="bits per dim", ylim=(0, top * 1.25))
    ax.set_xticks(x, [f"{n}\n({'ID' if n == id_set else 'OOD'})" for n in names], fontsize=8)
    ax.legend(fontsize=7, loc="upper left", ncols=3 if has_png else 2)


def elbo_hist_figure(
    title: str,
    edges: dict[str | None, np.ndarray],
    hists: dict[str | None, dict[str, np.ndarray]],
    id_set: str | None,
    bits: dict[str, list[float | None]] | None = None,
) -> Figure:
    """-ELBO histograms (nats, densities since set sizes differ): one panel per OOD set, the ID
    set and that set on a grid of their own (``edges``/``hists`` keyed by OOD set, see
    ``dhm.summary.aggregate.RunSummary``); every set on one grid (panel None) when the run has
    no OOD panel. ``bits``: set -> [model, PNG] bits/dim, drawn in a last panel when given."""
    panels: list[str | None] = sorted(p for p in edges if p is not None)
    if not panels and None in edges:
        panels = [None]
    n = len(panels) + (1 if bits else 0)
    cols = min(n, 2)
    rows = -(-n // cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        _hist_panel(ax, edges[panel], hists[panel], id_set)
        ax.set_title(f"{id_set} vs {panel}" if panel is not None else "every set", fontsize=9)
    if bits:
        _bits_panel(axes[len(panels)], bits, id_set)
        axes[len(panels)].set_title("bits per dim", fontsize=9)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(
        f"-ELBO in- vs out-of-distribution: {title}\n(end bins hold the outer 0.1% of a panel)",
        fontsize=10,
    )
    return fig


def _cell_values(
    metric: str, grid: list[dict], axes: list[str], xs: list, ys: list
) -> tuple[np.ndarray, dict[tuple[int, int], str]]:
    """``metric`` per grid cell [len(ys), len(xs)] (NaN where no ok run; the running pairwise
    mean over ok runs otherwise) and the status to print in each cell that has no value:
    ``NOT_APPLICABLE`` where the metric does not apply to the cell's model (a vae's accuracy)."""
    value = np.full((len(ys), len(xs)), np.nan)
    status: dict[tuple[int, int], str] = {}
    for r in grid:
        i = ys.index(r.get(axes[1])) if len(axes) > 1 else 0
        j = xs.index(r.get(axes[0]))
        v = _number(r.get(metric))
        if r.get("status") == "ok" and not math.isnan(v):
            value[i, j] = v if math.isnan(value[i, j]) else (value[i, j] + v) / 2
        elif not metric_applies(metric, r.get("model")):
            status.setdefault((i, j), NOT_APPLICABLE)
        elif math.isnan(value[i, j]):
            status[(i, j)] = str(r.get("status") or "missing")
    return value, {k: text for k, text in status.items() if math.isnan(value[k])}


def _annotate_cells(
    ax: Any, im: Any, value: np.ndarray, status: dict[tuple[int, int], str]
) -> None:
    """Print each finite cell's value (dark text on light colours) and hatch the failed cells
    with their status."""
    for (i, j), v in np.ndenumerate(value):
        if np.isfinite(v):
            shade = (v - im.norm.vmin) / ((im.norm.vmax - im.norm.vmin) or 1)
            ax.text(
                j,
                i,
                f"{v:.3g}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if shade > 0.6 else "white",
            )
    for (i, j), text in status.items():
        if text == NOT_APPLICABLE:  # neutral: nothing failed
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fc=NA_FACE, ec="none"))
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=NA_TEXT)
            continue
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", ec="0.6"))
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="tab:red")


def _baseline_strip(ax: Any, im: Any, metric: str, base: list[dict], n_x: int) -> None:
    """One square per baseline row (other model kinds) to the right of the ``n_x`` grid columns,
    coloured on the grid's colour scale, light grey with n/a when the metric does not apply to
    its model, hatched with its status when it has no value otherwise."""
    for k, r in enumerate(base):
        x = n_x + 0.5 + k
        v = _number(r.get(metric))
        ok = r.get("status") == "ok" and not math.isnan(v)
        na = not ok and not metric_applies(metric, r.get("model"))
        face = im.cmap(im.norm(v)) if ok else NA_FACE if na else "white"
        ax.add_patch(
            Rectangle(
                (x - 0.45, -0.45),
                0.9,
                0.9,
                fc=face,
                ec="0.7" if na else "k",
                hatch="///" if not ok and not na else None,
                clip_on=False,
            )
        )
        if ok:
            text, colour = f"{v:.3g}", "black" if im.norm(v) > 0.6 else "white"
        else:
            text, colour = (NOT_APPLICABLE, NA_TEXT) if na else (str(r.get("status")), "tab:red")
        ax.text(x, 0, text, ha="center", va="center", fontsize=8, color=colour)
        ax.text(x, -0.75, str(r.get("model")), ha="center", va="top", fontsize=8)


def _label_axes(ax: Any, axes: list[str], xs: list, ys: list, cols: int, has_base: bool) -> None:
    """Limits, tick labels (powers of ten as 10^e) and axis names of the heatmap."""
    ax.set_xlim(-0.5, cols - 0.5 if has_base else len(xs) - 0.5)
    ax.set_xticks(
        range(len(xs)), [_tick(_number(x)) if not math.isnan(_number(x)) else str(x) for x in xs]
    )
    ax.set_xlabel(axes[0] + ("   |   baselines" if has_base else ""))
    if len(axes) > 1:
        ax.set_yticks(
            range(len(ys)),
            [_tick(_number(y)) if not math.isnan(_number(y)) else str(y) for y in ys],
        )
        ax.set_ylabel(axes[1])
    else:
        ax.set_yticks([])


def heatmap_figure(
    metric: str, grid: list[dict], base: list[dict], axes: list[str], fraction: bool
) -> Figure:
    """``metric`` over the grid rows (mean per cell of the ok runs), failed cells hatched with
    their status, baselines in a strip on the right. ``fraction``: colours fixed to [0, 1]."""
    words, unit, better = column_meta(metric)
    xs = axis_values(grid, axes[0])
    ys = axis_values(grid, axes[1]) if len(axes) > 1 else [None]
    value, status = _cell_values(metric, grid, axes, xs, ys)
    cols = len(xs) + (len(base) + 1 if base else 0)
    fig = Figure(figsize=(max(4.5, 2.6 + 0.9 * cols), max(3.2, 1.8 + 0.55 * len(ys))))
    ax = fig.add_subplot()
    limits = {"vmin": 0.0, "vmax": 1.0} if fraction else {}
    im = ax.imshow(
        np.ma.masked_invalid(value),
        origin="lower",
        aspect="auto",
        cmap="viridis",
        extent=(-0.5, len(xs) - 0.5, -0.5, len(ys) - 0.5),
        **limits,
    )
    _annotate_cells(ax, im, value, status)
    _baseline_strip(ax, im, metric, base, len(xs))
    _label_axes(ax, axes, xs, ys, cols, bool(base))
    direction = {1: "higher is better", -1: "lower is better"}.get(better, "")
    ax.set_title(f"{words} ({direction})" if direction else words, fontsize=9)
    bar = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.03)
    bar.set_label(f"{words}" + (f" [{unit}]" if unit else ""), fontsize=8)
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
    settings: list[str] | None = None,
) -> list[Path]:
    """Every summary figure (see module docstring); returns the paths written.

    ``runs`` are ``dhm.summary.aggregate.RunSummary`` objects in row order; PNGs left in
    ``plot_dir`` by an earlier aggregation that this one did not write are removed, so the count
    stays capped.
    """
    plot_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with_fgsm = [r for r in runs if r.fgsm is not None]
    curves = [
        (labels[r.run_id], r.fgsm, r.pgd)
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
    by_id = {row.get("run_id"): row for row in rows}
    for i in spread(len(with_hist), max_plot_runs):
        r = with_hist[i]
        bits = bits_by_set(by_id.get(r.run_id, {}), r.id_set)
        title = f"{r.run_id}: {labels[r.run_id]}"
        fig = elbo_hist_figure(title, r.hist_edges, r.hists, r.id_set, bits)
        written.append(_save(fig, plot_dir / f"elbo_hist_{r.run_id}.png"))
    grid, base, axes = grid_layout(settings if settings is not None else list(rows[0]), rows)
    if axes:
        for metric in heat_metrics:
            if all(math.isnan(_number(r.get(metric))) for r in rows):
                continue
            fraction = column_meta(metric)[1] == "[0, 1]"
            fig = heatmap_figure(metric, grid, base, axes, fraction)
            written.append(_save(fig, plot_dir / f"heatmap_{metric}.png"))
    keep = {p.name for p in written}
    for stale in plot_dir.glob("*.png"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return written
