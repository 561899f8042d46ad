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
from dhm.core.provenance import NO_SNAPSHOT, code_ids, code_text
from dhm.summary.metrics import zero_width

ZERO_WIDTH_MARK = "‡"  # after an interval with lo == hi, explained under its table
_RUNS_FOOTNOTE = (
    f"{ZERO_WIDTH_MARK} zero-width bootstrap interval: every resample of the test images gives "
    "the same value (for AUROC: perfect separation in every resample). It reflects the "
    "resampling, not certainty about the metric."
)
_CELLS_FOOTNOTE = f"{ZERO_WIDTH_MARK} zero-width interval: every seed gave the same value."
MIXED_CODE_MARK = "†"  # after a code cell naming several snapshots, explained under its table
_NO_SNAPSHOT_NOTE = (
    f"{NO_SNAPSHOT}: no snapshot (a run in this process, cluster=local, or a shard written "
    "before shards named their code)"
)


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
    def id_set(self) -> str | None: ...  # the in-distribution set's name

    @property
    def hist_edges(self) -> dict[str | None, np.ndarray]: ...  # panel -> -ELBO edges [B + 1], nats

    @property
    def hists(self) -> dict[str | None, dict[str, np.ndarray]]: ...  # panel -> set -> counts [B]


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


VIEW_COLUMNS = ("variant", "checkpoint")  # with eval.<key>: a sweep with several evaluations


def head_end(columns: list[str]) -> int:
    """The index of the last column of a results table's head: run_id, status, the swept
    settings, then model and dataset where they are not swept (so either may come last), then
    the evaluation's variant, checkpoint and eval.<key> settings when there are several."""
    return max(
        (i for i, c in enumerate(columns)
         if c in ("model", "dataset", *VIEW_COLUMNS) or c.startswith("eval.")),
        default=1,
    )  # fmt: skip


def _md_columns(columns: list[str], headline: list[str]) -> list[str]:
    """A readable subset when the table is wide: identity, settings and the headline metrics."""
    if len([c for c in columns if c != "code"]) <= 14:
        return [c for c in columns if "_ci_" not in c]
    keep = {*headline, "bound_sigma", "code", "bits_per_dim", "png_bits_per_dim", "nats_per_dim"}
    head = columns[: head_end(columns) + 1]
    return head + [c for c in columns[len(head) :] if c in keep] + ["problem"]


def _bounds(lo: float, hi: float) -> str:
    """``[lo, hi]`` to 3 significant digits, more where 3 would print two different bounds
    alike: only a zero-width interval (marked) may read as a single point."""
    for digits in range(3, 18):
        a, b = f"{lo:.{digits}g}", f"{hi:.{digits}g}"
        if a != b or lo == hi:
            break
    return f"[{a}, {b}]"


def _interval(value: Any, lo: Any, hi: Any) -> str:
    """`` [lo, hi]`` (with ``ZERO_WIDTH_MARK`` when lo == hi) after a shown value, else ``""``."""
    if _cell(value) == "" or _cell(lo) == "" or _cell(hi) == "":
        return ""
    return f" {_bounds(lo, hi)}" + (ZERO_WIDTH_MARK if zero_width(lo, hi) else "")


def _with_interval(row: dict, col: str) -> str:
    """A run's cell: ``value [lo, hi]`` when the row has ``<col>_ci_lo`` and ``<col>_ci_hi``."""
    value = row.get(col)
    return _cell(value, 4) + _interval(value, row.get(f"{col}_ci_lo"), row.get(f"{col}_ci_hi"))


def _seed_value(cell: dict, m: str) -> str:
    """A seed cell's cell: ``mean ± std [lo, hi]``, the brackets from ``<m>_ci_lo``/``_ci_hi``
    (the t interval over seeds) when the cell has them."""
    mean, std = cell.get(f"{m}_mean"), cell.get(f"{m}_std")
    if _cell(mean) == "":
        return ""
    text = f"{mean:.4g}" + (f" ± {std:.2g}" if _cell(std) else "")
    return text + _interval(mean, cell.get(f"{m}_ci_lo"), cell.get(f"{m}_ci_hi"))


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
    show_code = any(code_ids(r.get("code")) not in ([], [""]) for r in rows) or any(
        c.get("mixed_code") for c in cells or []
    )
    if not show_code:  # every run unsnapshotted (local runs, old shards): nothing to say
        shown = [c for c in shown if c != "code"]
    lines = [f"# Sweep summary ({len(rows)} runs, {sum(r['status'] == 'ok' for r in rows)} ok)", ""]
    about = []
    if shown != columns:
        about.append(
            f"Showing {len(shown)} of {len(columns)} columns; all of them are in "
            "results.csv and results.h5 (see docs/results.md)."
        )
    table = [[_run_cell(row, c) for c in shown] for row in rows]
    if any(_cell(row.get(f"{c}_ci_lo")) for row in rows for c in shown):
        about.append(
            "Brackets: 95% interval over test images (runs without other seeds): Wilson for "
            "accuracy, FGSM and PGD accuracy, percentile bootstrap for the others."
        )
    lines += [" ".join(about), ""] if about else []
    mixed_runs = [r for r in rows if len(code_ids(r.get("code"))) > 1]
    mixed_ids = {i for r in mixed_runs for i in code_ids(r.get("code"))}
    runs_note = (
        f"{MIXED_CODE_MARK} the run's shards were written by different code snapshots (a set "
        f"evaluated again under newer code), ids of `<sweep>/code/<id>/`: "
        f"{_snapshot_list(mixed_ids)}." + (f" {_NO_SNAPSHOT_NOTE}." if "" in mixed_ids else "")
    )
    lines += _md_table(shown, table, [_RUNS_FOOTNOTE, runs_note])
    if cells and any(c["n"] >= 2 for c in cells):
        bounds = ("_mean", "_std", "_ci_lo", "_ci_hi")
        skip = ("runs", "code", "mixed_code")
        settings = [c for c in cells[0] if not c.endswith(bounds) and c not in skip]
        metrics = [c for c in headline if f"{c}_mean" in cells[0]]
        lines += ["", "## Seed cells (mean ± std over seeds)", ""]
        lines += [
            "Brackets: 95% Student-t interval of the mean over the cell's n seeds, "
            "mean ± t(0.975, n - 1) std / sqrt(n).",
            "",
        ]
        table = [
            [_cell(c[k], 4) for k in settings]
            + ([_code_cell(c.get("code"), bool(c.get("mixed_code")))] if show_code else [])
            + [_seed_value(c, m) for m in metrics]
            for c in cells
        ]
        header = settings + (["code"] if show_code else []) + metrics
        notes = [_CELLS_FOOTNOTE, _mixed_cells_note(cells, settings, rows)]
        lines += _md_table(header, table, notes)
    lines += ["", "## Problems", ""]
    lines += [f"- `{rid}`: {reason}" for rid, reason in problems] or ["None."]
    if ignored:
        lines += ["", f"{ignored} run folder(s) under runs/ are not in plan.json and were ignored."]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _md_table(header: list[str], table: list[list[str]], footnotes: list[str]) -> list[str]:
    """A markdown table's lines, with each footnote (it starts with its mark) under it when a
    cell carries that mark."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(t.replace("|", "\\|") for t in row) + " |" for row in table]
    for note in footnotes:
        if any(t.endswith(note[0]) for row in table for t in row):
            lines += ["", note]
    return lines


def _run_cell(row: dict, col: str) -> str:
    """A run's cell of results.md: its code with the mark when several, else the value with
    its interval."""
    if col == "code":
        return _code_cell(row.get(col), len(code_ids(row.get(col))) > 1)
    return _with_interval(row, col)


def _code_cell(value: Any, mixed: bool) -> str:
    return code_text(value) + (MIXED_CODE_MARK if mixed else "")


def _snapshot_list(ids: Any) -> str:
    """Snapshot ids as `a`, `b`, none (sorted, once each)."""
    return ", ".join(f"`{i}`" if i else NO_SNAPSHOT for i in sorted(set(ids)))


def _mixed_cells_note(cells: list[dict], settings: list[str], rows: list[dict]) -> str:
    """The seed-cell table's footnote: per cell whose runs ran different code snapshots, its
    settings and which runs ran which snapshot."""
    by_id = {r["run_id"]: r for r in rows}
    lines = [
        f"{MIXED_CODE_MARK} the cell's runs ran different code snapshots (ids of "
        "`<sweep>/code/<id>/`; its mean and spread mix code versions):"
    ]
    for c in cells:
        if not c.get("mixed_code"):
            continue
        which: dict[str, list[str]] = {}
        for rid in str(c.get("runs") or "").split():
            which.setdefault(code_text(by_id.get(rid, {}).get("code")) or "?", []).append(rid)
        name = ", ".join(f"{k}={_cell(c.get(k), 4)}" for k in settings if k != "n") or "cell"
        runs = "; ".join(f"`{code}`: {' '.join(ids)}" for code, ids in sorted(which.items()))
        lines.append(f"- {name}: {runs}")
    if any("" in code_ids(c.get("code")) for c in cells if c.get("mixed_code")):
        lines.append(f"\n{_NO_SNAPSHOT_NOTE}.")
    return "\n".join(lines)


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
    _write_hists(g, runs)


def _write_hists(g: h5py.Group, runs: Sequence[RunCurves]) -> None:
    """The -ELBO histograms, stacked over runs (NaN edges and zero counts where a run lacks one).

    ``elbo_hist/edges`` [R, B + 1] and ``elbo_hist/counts/<set>`` [R, B]: every set of a run on
    one grid (panel None). ``elbo_hist/by_ood/<ood>/edges`` [R, B + 1], ``.../id_counts`` and
    ``.../ood_counts`` [R, B]: the run's ID set and OOD set ``<ood>`` on a grid of their own.
    """
    n = len(runs)
    bins = next((e.size - 1 for r in runs for e in r.hist_edges.values()), 0)
    if not bins:
        return

    def edges(panel: str | None) -> np.ndarray:
        out = np.full((n, bins + 1), np.nan)
        for i, r in enumerate(runs):
            if panel in r.hist_edges:
                out[i] = r.hist_edges[panel]
        return out

    def counts(panel: str | None, names: list[str | None]) -> np.ndarray:
        """Row i: run i's counts of set ``names[i]`` in ``panel``."""
        out = np.zeros((n, bins), np.int64)
        for i, (r, name) in enumerate(zip(runs, names, strict=True)):
            c = r.hists.get(panel, {}).get(name) if name is not None else None
            if c is not None:
                out[i] = c
        return out

    g["elbo_hist/edges"] = edges(None)
    for name in sorted({s for r in runs for s in r.hists.get(None, {})}):
        g[f"elbo_hist/counts/{name}"] = counts(None, [name] * n)
    for ood in sorted({p for r in runs for p in r.hist_edges if p is not None}):
        g[f"elbo_hist/by_ood/{ood}/edges"] = edges(ood)
        g[f"elbo_hist/by_ood/{ood}/id_counts"] = counts(ood, [r.id_set for r in runs])
        g[f"elbo_hist/by_ood/{ood}/ood_counts"] = counts(ood, [ood] * n)


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
    ("iwae_bits_per_dim", "bits per dim (IWAE, largest k)", "bits", -1),
    ("iwae_nats_per_dim", "nats per dim (IWAE, largest k)", "nats", -1),
    ("trained_bits_per_dim", "bits per dim (trained sigma)", "bits", -1),
    ("trained_nats_per_dim", "nats per dim (trained sigma)", "nats", -1),
    ("png_bits_per_dim", "PNG codec bits per dim", "bits", -1),
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


_CLASSIFIER_METRICS = ("accuracy", "nll", "brier", "ece", "mce", "temperature", "fgsm", "pgd")
# A run's likelihood columns, in results.csv's order, per set (the ID set bare, others suffixed
# _<set>): -ELBO under the fitted sigma, its bits (or nats) per dim beside the PNG codec's, the
# largest-k IWAE's, the trained sigma's.
LIKELIHOOD_COLUMNS = (
    "neg_elbo_nats", "bits_per_dim", "png_bits_per_dim", "nats_per_dim", "iwae_bits_per_dim",
    "iwae_nats_per_dim", "trained_bits_per_dim", "trained_nats_per_dim", "iwae_ess",
    "elbo_iwae_gap",
)  # fmt: skip
_MODEL_LACKS = {"vae": "classifier", "resnet": "likelihood"}  # model kind -> the part it has not


def metric_applies(col: str, model: Any) -> bool:
    """Whether metric column ``col`` can have a value for a run of model kind ``model``.

    A ``vae`` has no classifier: no accuracy, NLL, Brier, calibration, temperature, attack
    accuracy or max-p(y|x) OOD scores. A ``resnet`` has no likelihood: no -ELBO, bits or nats per
    dim (of any bound, or of the PNG codec: computed beside a VAE only), IWAE or ELBO-based OOD
    scores (elbo, complexity, iwae_k*). Every other column (settings, costs) and every other
    model (dhm, zmodel) applies. Interval and seed-cell
    suffixes (``_ci_lo``, ``_mean``, ...) follow their metric.
    """
    lacks = _MODEL_LACKS.get(str(model))
    if lacks is None:
        return True
    for suffix in ("_ci_lo", "_ci_hi", "_mean", "_std"):
        col = col.removesuffix(suffix)
    if col.startswith(("auroc_", "aupr_in_", "aupr_out_", "fpr95_")):
        if col.endswith("_msp"):
            needs = "classifier"
        elif col.endswith(("_elbo", "_complexity")) or "_iwae_k" in col:
            needs = "likelihood"
        else:
            return True
    elif any(col == p or col.startswith(p + "_") for p in _CLASSIFIER_METRICS):
        needs = "classifier"
    elif any(col == p or col.startswith(p + "_") for p in LIKELIHOOD_COLUMNS):
        needs = "likelihood"
    else:
        return True
    return needs != lacks


def bits_by_set(row: dict, id_set: str | None) -> dict[str, list[float | None]]:
    """set -> [model, PNG codec] bits/dim (None where absent) from a row's ``bits_per_dim``,
    ``bits_per_dim_<set>``, ``png_bits_per_dim`` and ``png_bits_per_dim_<set>`` columns (the bare
    name is the ID set's); the ID set first, then the others by name."""
    out: dict[str, list[float | None]] = {}
    for k, prefix in enumerate(("bits_per_dim", "png_bits_per_dim")):
        for col, v in row.items():
            number = isinstance(v, int | float | np.number) and not isinstance(v, bool)
            if not number or math.isnan(v) or "_ci_" in col:
                continue
            name = id_set if col == prefix else col[len(prefix) + 1 :]
            if name and (col == prefix or col.startswith(prefix + "_")):
                out.setdefault(name, [None, None])[k] = float(v)
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != id_set, kv[0])))


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
