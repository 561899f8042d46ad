"""Writers and reader of a sweep summary: results.csv, results.md and results.h5.

``dhm.summary.aggregate`` computes the rows; this module only lays them out (see
docs/results.md for the columns), with the cell formatting the tables and the plot labels
share. Every file is written under a temporary name next to its final one and renamed when
complete, so a killed aggregation never leaves a half-written summary file behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from dhm.core.fsutil import atomic_path


class RunCurves(Protocol):
    """What the writers here read of one run: ``dhm.summary.aggregate.RunSummary`` fits it.

    Typed structurally, so this module never imports ``aggregate`` (which imports this one).
    """

    @property
    def run_id(self) -> str: ...

    @property
    def values(self) -> dict[str, Any]: ...  # settings, model, dataset

    @property
    def fgsm(self) -> tuple[np.ndarray, np.ndarray] | None: ...  # eps [E] (pixels), accuracy [E]

    @property
    def pgd(self) -> tuple[np.ndarray, np.ndarray] | None: ...  # eps [E], accuracy [E]

    @property
    def reliability(self) -> Any: ...  # dhm.summary.metrics.Reliability or None

    @property
    def hist_edges(self) -> np.ndarray | None: ...  # -ELBO bin edges [B + 1], nats

    @property
    def hists(self) -> dict[str, np.ndarray]: ...  # set name -> counts [B]


def plain(value: Any) -> Any:
    """A cell value: numbers and strings as is, lists/dicts as JSON text, None = empty."""
    if isinstance(value, list | dict):
        return json.dumps(value)
    return value


def _cell(value: Any, digits: int | None = None) -> str:
    """A table cell as text: None and NaN empty, floats to ``digits`` significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if digits is not None and isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """results.csv / cells.csv: every column, floats exact (repr), empty cells for missing."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(row[c]) for c in columns] for row in rows)  # floats: repr, exact
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _md_columns(columns: list[str], headline: list[str]) -> list[str]:
    """A readable subset when the table is wide: identity, settings and the headline metrics."""
    if len(columns) <= 14:
        return [c for c in columns if "_ci_" not in c]
    keep = {*headline, "bits_per_dim", "nats_per_dim"}
    head = columns[: columns.index("dataset") + 1]
    return head + [c for c in columns if c in keep] + ["problem"]


def _with_interval(row: dict, col: str) -> str:
    text = _cell(row.get(col), 4)
    lo, hi = row.get(f"{col}_ci_lo"), row.get(f"{col}_ci_hi")
    if text and lo is not None and hi is not None:
        text += f" [{lo:.3g}, {hi:.3g}]"
    return text


def write_md(
    path: Path,
    columns: list[str],
    rows: list[dict],
    headline: list[str],
    problems: list[tuple[str, str]],
    ignored: int,
    cells: list[dict] | None = None,
) -> None:
    """results.md: the (possibly reduced) table with 95% intervals, the seed cells when any has
    several runs, then every problem and the ignored folders."""
    shown = _md_columns(columns, headline)
    lines = [f"# Sweep summary ({len(rows)} runs, {sum(r['status'] == 'ok' for r in rows)} ok)", ""]
    if shown != columns:
        lines += [
            f"Showing {len(shown)} of {len(columns)} columns; all of them are in "
            "results.csv and results.h5 (see docs/results.md). Brackets: 95% bootstrap "
            "interval over test images (runs without other seeds).",
            "",
        ]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells_md = [_with_interval(row, c).replace("|", "\\|") for c in shown]
        lines.append("| " + " | ".join(cells_md) + " |")
    if cells and any(c["n"] >= 2 for c in cells):
        settings = [c for c in cells[0] if not c.endswith(("_mean", "_std")) and c != "runs"]
        metrics = [c for c in headline if f"{c}_mean" in cells[0]]
        lines += ["", "## Seed cells (mean ± std over seeds)", ""]
        lines += [
            "| " + " | ".join(settings + metrics) + " |",
            "|" + "---|" * (len(settings) + len(metrics)),
        ]
        for c in cells:
            vals = [_cell(c[k], 4) for k in settings]
            for m in metrics:
                mean, std = c[f"{m}_mean"], c[f"{m}_std"]
                vals.append(
                    ""
                    if mean is None
                    else f"{mean:.4g}" + (f" ± {std:.2g}" if std is not None else "")
                )
            lines.append("| " + " | ".join(vals) + " |")
    lines += ["", "## Problems", ""]
    lines += [f"- `{rid}`: {reason}" for rid, reason in problems] or ["None."]
    if ignored:
        lines += ["", f"{ignored} run folder(s) under runs/ are not in plan.json and were ignored."]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _table(group: h5py.Group, columns: list[str], rows: list[dict]) -> None:
    group.attrs["columns"] = json.dumps(columns)
    for col in columns:
        values = [row[col] for row in rows]
        numeric = all(
            v is None or (isinstance(v, int | float | np.number) and not isinstance(v, bool))
            for v in values
        )
        if numeric:
            group.create_dataset(
                col, data=np.array([np.nan if v is None else v for v in values], dtype=np.float64)
            )
        else:
            _strings(group, col, [_cell(v) for v in values])


def write_h5(
    path: Path,
    columns: list[str],
    rows: list[dict],
    runs: Sequence[RunCurves],
    cells: list[dict] | None = None,
    attrs: dict[str, Any] | None = None,
) -> None:
    """``table/<column>`` (float64 with NaN = empty, or UTF-8 strings), ``cells/<column>``
    (the seed cells, same layout), ``runs/`` (the per-run curves, stacked) and file
    attributes ``attrs`` (created, sweep, git_commit, headline)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(attrs or {})
        _table(f.create_group("table"), columns, rows)
        if cells:
            _table(f.create_group("cells"), list(cells[0]), cells)
        _write_runs(f.create_group("runs"), runs)


def _strings(group: h5py.Group, name: str, values: list[str]) -> None:
    """A variable-length UTF-8 string dataset."""
    group.create_dataset(
        name, data=np.array(values, dtype=object), dtype=h5py.string_dtype("utf-8")
    )


def _write_runs(g: h5py.Group, runs: Sequence[RunCurves]) -> None:
    """The per-run curves stacked over runs: row i of every ``[R, ...]`` array is runs[i].

    A few datasets in all (not a group per run), so writing costs the same for 10 or 10,000
    runs. Entries a run lacks are NaN (values, edges) or 0 (counts); see docs/results.md.
    """
    n = len(runs)
    _strings(g, "run_id", [r.run_id for r in runs])
    for kind in ("fgsm", "pgd"):
        curves = [getattr(r, kind) for r in runs]
        eps = sorted({float(e) for c in curves if c is not None for e in c[0]})
        if eps:
            where = {e: j for j, e in enumerate(eps)}
            acc = np.full((n, len(eps)), np.nan)
            for i, c in enumerate(curves):
                if c is not None:
                    acc[i, [where[float(e)] for e in c[0]]] = c[1]
            g[f"{kind}/eps"], g[f"{kind}/accuracy"] = np.array(eps), acc
    rels = [(i, r.reliability) for i, r in enumerate(runs) if r.reliability is not None]
    if rels:
        edges = rels[0][1].bin_edges  # linspace(0, 1, N_BINS + 1) for every run
        stacked = {"counts": np.zeros((n, edges.size - 1), np.int64)}
        stacked["accuracy"] = np.full((n, edges.size - 1), np.nan)
        stacked["confidence"] = stacked["accuracy"].copy()
        for i, rel in rels:
            for key, array in stacked.items():
                array[i] = getattr(rel, key)
        g["reliability/bin_edges"] = edges
        for key, array in stacked.items():
            g[f"reliability/{key}"] = array
    sets = sorted({name for r in runs for name in r.hists})
    if sets:
        bins = next(r.hist_edges.size for r in runs if r.hist_edges is not None) - 1
        hist_edges = np.full((n, bins + 1), np.nan)
        counts = {name: np.zeros((n, bins), np.int64) for name in sets}
        for i, r in enumerate(runs):
            if r.hist_edges is not None:
                hist_edges[i] = r.hist_edges
            for name, c in r.hists.items():
                counts[name][i] = c
        g["elbo_hist/edges"] = hist_edges
        for name in sets:
            g[f"elbo_hist/counts/{name}"] = counts[name]


def read_table(path: str | Path) -> Any:
    """results.h5's ``table`` as a pandas DataFrame, columns in results.csv order."""
    import pandas as pd  # only readers need pandas

    with h5py.File(path, "r") as f:
        t = f["table"]
        cols = json.loads(t.attrs["columns"])
        return pd.DataFrame(
            {c: t[c].asstr()[()] if t[c].dtype.kind == "O" else t[c][()] for c in cols},
            columns=cols,
        )


def plot_labels(runs: Sequence[RunCurves], setting_cols: list[str]) -> dict[str, str]:
    """Plot labels: the settings that differ between runs (the run id if none do)."""
    varying = [c for c in setting_cols if len({_cell(r.values.get(c)) for r in runs}) > 1]
    return {
        r.run_id: ", ".join(f"{c}={_cell(r.values.get(c), 3)}" for c in varying) or r.run_id
        for r in runs
    }


# column prefix -> (words, unit, better: +1 higher, -1 lower, 0 neither)
_META = [
    ("accuracy", "accuracy", "[0, 1]", 1),
    ("nll_ts", "NLL after temperature scaling", "nats", -1),
    ("nll", "NLL of p(y|x)", "nats", -1),
    ("brier", "Brier score", "[0, 2]", -1),
    ("ece_ts", "ECE after temperature scaling", "[0, 1]", -1),
    ("ece", "expected calibration error", "[0, 1]", -1),
    ("mce", "maximum calibration error", "[0, 1]", -1),
    ("temperature", "fitted temperature", "T", 0),
    ("neg_elbo_nats", "-ELBO", "nats/image", -1),
    ("bits_per_dim", "bits per dim", "bits", -1),
    ("nats_per_dim", "nats per dim", "nats", -1),
    ("iwae_ess", "IWAE effective sample size", "samples", 1),
    ("elbo_iwae_gap", "ELBO - IWAE gap", "nats", 0),
    ("auroc", "AUROC", "[0, 1]", 1),
    ("aupr_in", "AUPR-in", "[0, 1]", 1),
    ("aupr_out", "AUPR-out", "[0, 1]", 1),
    ("fpr95", "FPR at 95% TPR", "[0, 1]", -1),
    ("fgsm_acc", "FGSM accuracy", "[0, 1]", 1),
    ("pgd_acc", "PGD accuracy", "[0, 1]", 1),
]
SCORE_WORDS = {"msp": "max p(y|x)", "elbo": "ELBO", "complexity": "complexity-corrected ELBO"}


def column_meta(col: str) -> tuple[str, str, int]:
    """(words, unit, better) of a metric column: e.g. auroc_svhn_elbo -> AUROC vs svhn (ELBO)."""
    for prefix, words, unit, better in _META:
        if col == prefix or col.startswith(prefix + "_"):
            rest = col[len(prefix) + 1 :]
            if prefix.startswith(("auroc", "aupr", "fpr95")) and rest:
                ood, _, score = rest.rpartition("_")
                if score.startswith("k") and ood.endswith("_iwae"):  # iwae_k10
                    ood, score = ood[: -len("_iwae")], "iwae_" + score
                words = f"{words} vs {ood} ({SCORE_WORDS.get(score, score)})"
            elif prefix.endswith("_acc") and rest.startswith("eps"):
                words = f"{words} at eps {rest[3:]}"
            elif rest:
                words = f"{words} on {rest}"
            return words, unit, better
    return col, "", 0


def grid_layout(settings: list[str], rows: list[dict]) -> tuple[list[dict], list[dict], list[str]]:
    """(grid rows, baseline rows, the two axis columns): the most common model's ok or failed
    runs over the two swept settings that vary most (alpha x beta when both vary)."""
    models = Counter(r.get("model") for r in rows)
    grid_model = models.most_common(1)[0][0] if models else None
    grid = [r for r in rows if r.get("model") == grid_model]
    base = [r for r in rows if r.get("model") != grid_model]
    varying = [
        c
        for c in settings
        if c not in ("model", "seed", "train.seed") and len({_cell(r.get(c)) for r in grid}) > 1
    ]
    if "alpha" in varying and "beta" in varying:
        varying = ["alpha", "beta"]
    return grid, base, varying[:2]


def axis_values(rows: list[dict], col: str) -> list[Any]:
    vals = {r.get(col) for r in rows}
    try:
        return sorted(vals, key=lambda v: (v is None, float(v) if v is not None else 0))
    except (TypeError, ValueError):
        return sorted(vals, key=lambda v: str(v))
