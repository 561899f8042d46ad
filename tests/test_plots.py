"""The summary figures (dhm.summary.plots) and the rule that says which metrics a model can have:
labels inside the figure, densities that read as densities, one -ELBO panel per OOD set, and
not-applicable cells drawn apart from failed ones. Figures are drawn, never written."""

from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dhm.summary import plots as P
from dhm.summary.aggregate import HIST_BINS, RunSummary, _elbo_hists
from dhm.summary.tables import bits_by_set, metric_applies

ID, NEAR, FAR = "digits", "digits_heldout", "digits_ood"


def _demo_like_run() -> RunSummary:
    """-ELBO as the demo's hybrid gives it: ID and near OOD around 2,000-3,000 nats (some below
    zero), far OOD spread over 5,000-70,000 nats, so a shared grid would crush the first two."""
    rng = np.random.default_rng(0)
    elbo = {
        ID: rng.normal(2700, 1500, 284),
        NEAR: rng.normal(2100, 1800, 100),
        FAR: np.r_[rng.normal(7000, 1500, 60), rng.uniform(1e4, 7e4, 140)],
    }
    run = RunSummary("run0", id_set=ID)
    _elbo_hists(run, {k: v.astype(np.float32) for k, v in elbo.items()})
    return run


def _ticklabels(ax, axis: str) -> list:
    """The tick labels drawn on ``axis`` ("x" or "y"): the locator's ticks within the limits."""
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    k = 0 if axis == "x" else 1
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t for t in labels if t.get_text() and lo <= t.get_position()[k] <= hi]


def _texts_outside(fig: Figure) -> list[str]:
    """Tick labels, titles, axis names and legends whose drawn extent leaves the figure."""
    FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    artists = [*fig.texts]
    for ax in fig.axes:
        if ax.get_visible():
            artists += [*_ticklabels(ax, "x"), *_ticklabels(ax, "y")]
            artists += [ax.title, ax.xaxis.label, ax.yaxis.label, ax.get_legend()]
    box, out = fig.bbox, []
    for a in artists:
        name = a.get_text() if hasattr(a, "get_text") else "legend"
        if a is None or not name:
            continue
        e = a.get_window_extent(renderer)
        if e.x0 < box.x0 - 0.5 or e.x1 > box.x1 + 0.5 or e.y0 < box.y0 - 0.5 or e.y1 > box.y1 + 0.5:
            out.append(name)
    return out


def _overlapping(labels: list) -> list[tuple[str, str]]:
    """Pairs of one axis' visible tick labels whose extents overlap."""
    boxes = [(t.get_text(), t.get_window_extent()) for t in labels if t.get_text()]
    return [
        (a, b) for k, (a, ea) in enumerate(boxes) for b, eb in boxes[k + 1 :] if ea.overlaps(eb)
    ]


def test_each_ood_set_gets_its_own_range_and_the_shared_grid_is_kept():
    run = _demo_like_run()
    assert set(run.hist_edges) == {None, NEAR, FAR}
    assert set(run.hists[NEAR]) == {ID, NEAR} and set(run.hists[None]) == {ID, NEAR, FAR}
    for panel, sets in run.hists.items():
        assert run.hist_edges[panel].shape == (HIST_BINS + 1,)
        for name, counts in sets.items():
            assert counts.sum() == {ID: 284, NEAR: 100, FAR: 200}[name], (panel, name)
    # On the shared grid the ID set fills a handful of the 50 bins; beside the near-OOD set
    # alone it spreads over most of them.
    shared, near = (np.count_nonzero(run.hists[p][ID]) for p in (None, NEAR))
    assert shared <= 10 and near >= 35


def test_the_elbo_figure_keeps_every_label_inside_and_densities_read_as_densities():
    run = _demo_like_run()
    bits = {ID: [9.3, 3.1], NEAR: [9.0, None], FAR: [17.7, 6.0]}
    fig = P.elbo_hist_figure("run0: beta=0.001, model=dhm", run.hist_edges, run.hists, ID, bits)
    assert _texts_outside(fig) == []
    hist_axes = [ax for ax in fig.axes if ax.get_ylabel().startswith("density")]
    assert [ax.get_title() for ax in hist_axes] == [f"{ID} vs {NEAR}", f"{ID} vs {FAR}"]
    for ax in hist_axes:
        assert _overlapping(_ticklabels(ax, "x")) == [] and _overlapping(_ticklabels(ax, "y")) == []
        labels = [t.get_text() for t in _ticklabels(ax, "y")]
        top = ax.get_ylim()[1]
        assert top < 1e-3, top  # the demo's densities are per nat, around 1e-4
        assert all(re.fullmatch(r"0|\d\.\de-0\d", s) for s in labels), labels
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend[0] == f"{ID} (ID)" and legend[1].endswith("(OOD)")
    assert P._density_tick(7.6e-5, 1e-4) == "7.6e-05"
    assert P._density_tick(0.02, 0.05) == "0.02"


def test_the_bits_panel_draws_the_uniform_models_8_bits_per_dim():
    run = _demo_like_run()
    bits = bits_by_set(
        {
            "dataset": ID,
            "bits_per_dim": 9.3,
            "bits_per_dim_ci_lo": 9.0,
            f"bits_per_dim_{FAR}": 17.7,
            "png_bits_per_dim": 3.1,
            f"png_bits_per_dim_{FAR}": 6.0,
            "accuracy": 0.9,
        },
        ID,
    )
    assert bits == {ID: [9.3, 3.1], FAR: [17.7, 6.0]}
    fig = P.elbo_hist_figure("run0", run.hist_edges, run.hists, ID, bits)
    ax = next(ax for ax in fig.axes if ax.get_ylabel() == "bits per dim")
    lines = [ln for ln in ax.get_lines() if ln.get_label() == "uniform (8 bits/dim)"]
    assert len(lines) == 1 and set(lines[0].get_ydata()) == {8.0}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"uniform (8 bits/dim)", "model (-ELBO)", "PNG codec"} <= set(legend)
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{ID}\n(ID)", f"{FAR}\n(OOD)"]
    assert _texts_outside(fig) == []


@pytest.mark.parametrize(
    ("col", "vae", "resnet"),
    [
        ("accuracy", False, True),
        ("nll_ts", False, True),
        ("ece_ts_ci_lo", False, True),
        ("temperature", False, True),
        ("fgsm_acc_eps0.0314", False, True),
        ("pgd_acc_eps0.0314_mean", False, True),
        ("auroc_svhn_msp", False, True),
        ("fpr95_svhn_msp", False, True),
        ("neg_elbo_nats", True, False),
        ("bits_per_dim_svhn", True, False),
        ("nats_per_dim", True, False),
        ("iwae_ess", True, False),
        ("elbo_iwae_gap_svhn", True, False),
        ("auroc_svhn_elbo", True, False),
        ("aupr_in_svhn_complexity", True, False),
        ("auroc_svhn_iwae_k10", True, False),
        ("png_bits_per_dim", True, False),  # computed beside a VAE's bound only
        ("iwae_bits_per_dim", True, False),
        ("trained_bits_per_dim_svhn", True, False),
        ("beta", True, True),
    ],
)
def test_which_metrics_apply_to_which_model(col, vae, resnet):
    assert metric_applies(col, "vae") is vae
    assert metric_applies(col, "resnet") is resnet
    assert all(metric_applies(col, model) for model in ("dhm", "zmodel", None))


def test_heatmap_cells_that_do_not_apply_are_neutral_and_failures_stay_red():
    grid = [
        {"run_id": "a", "status": "ok", "model": "dhm", "beta": 0.1, "auroc_x_elbo": 0.9},
        {"run_id": "b", "status": "missing", "model": "dhm", "beta": 1.0, "auroc_x_elbo": None},
    ]
    base = [{"run_id": "r", "status": "ok", "model": "resnet", "auroc_x_elbo": None}]
    fig = P.heatmap_figure("auroc_x_elbo", grid, base, ["beta"], fraction=True)
    ax = fig.axes[0]
    colours = {t.get_text(): t.get_color() for t in ax.texts}
    assert colours["n/a"] == P.NA_TEXT and colours["missing"] == "tab:red"
    assert "ok" not in colours  # an ok run is never labelled as if it had failed
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 1  # the missing run's cell only
