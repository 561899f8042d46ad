"""Writers and reader of a sweep summary: results.csv, results.md and results.h5.

``dhm.aggregate`` computes the rows; this module only lays them out (see docs/results.md for the
columns), with the cell formatting the tables and the plot labels share. Every file is written
under a temporary name next to its final one and renamed when complete, so a killed aggregation
never leaves a half-written summary file behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

if TYPE_CHECKING:
    from dhm.aggregate import RunSummary


def plain(value: Any) -> Any:
    """A cell value: numbers and strings as is, lists/dicts as JSON text, None = empty."""
    if isinstance(value, list | dict):
        return json.dumps(value)
    return value


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed onto it only if the block completes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cell(value: Any, digits: int | None = None) -> str:
    """A table cell as text: None and NaN empty, floats to ``digits`` significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if digits is not None and isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """results.csv: every column, floats exact (repr), empty cells for missing values."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(row[c]) for c in columns] for row in rows)  # floats: repr, exact
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _md_columns(columns: list[str], headline: list[str]) -> list[str]:
    """A readable subset when the table is wide: identity, settings and the headline metrics."""
    if len(columns) <= 14:
        return columns
    keep = {*headline, "bits_per_dim"}
    head = columns[: columns.index("dataset") + 1]
    return head + [c for c in columns if c in keep] + ["problem"]


def write_md(
    path: Path,
    columns: list[str],
    rows: list[dict],
    headline: list[str],
    problems: list[tuple[str, str]],
    ignored: int,
) -> None:
    """results.md: the (possibly reduced) table, then every problem and the ignored folders."""
    shown = _md_columns(columns, headline)
    lines = [f"# Sweep summary ({len(rows)} runs, {sum(r['status'] == 'ok' for r in rows)} ok)", ""]
    if shown != columns:
        lines += [
            f"Showing {len(shown)} of {len(columns)} columns; all of them are in "
            "results.csv and results.h5 (see docs/results.md).",
            "",
        ]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = [_cell(row[c], 4).replace("|", "\\|") for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Problems", ""]
    lines += [f"- `{rid}`: {reason}" for rid, reason in problems] or ["None."]
    if ignored:
        lines += ["", f"{ignored} run folder(s) under runs/ are not in plan.json and were ignored."]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def write_h5(path: Path, columns: list[str], rows: list[dict], runs: list[RunSummary]) -> None:
    """``table/<column>`` (float64 with NaN = empty, or UTF-8 strings) and ``runs/`` (stacked)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        table = f.create_group("table")
        table.attrs["columns"] = json.dumps(columns)
        for col in columns:
            values = [row[col] for row in rows]
            numeric = all(
                v is None or (isinstance(v, int | float | np.number) and not isinstance(v, bool))
                for v in values
            )
            if numeric:
                table.create_dataset(
                    col,
                    data=np.array([np.nan if v is None else v for v in values], dtype=np.float64),
                )
            else:
                _strings(table, col, [_cell(v) for v in values])
        _write_runs(f.create_group("runs"), runs)


def _strings(group: h5py.Group, name: str, values: list[str]) -> None:
    """A variable-length UTF-8 string dataset."""
    group.create_dataset(
        name, data=np.array(values, dtype=object), dtype=h5py.string_dtype("utf-8")
    )


def _write_runs(g: h5py.Group, runs: list[RunSummary]) -> None:
    """The per-run curves stacked over runs: row i of every ``[R, ...]`` array is runs[i].

    A few datasets in all (not a group per run), so writing costs the same for 10 or 10,000
    runs. Entries a run lacks are NaN (values, edges) or 0 (counts); see docs/results.md.
    """
    n = len(runs)
    _strings(g, "run_id", [r.run_id for r in runs])
    eps = sorted({float(e) for r in runs if r.fgsm is not None for e in r.fgsm[0]})
    if eps:
        where = {e: j for j, e in enumerate(eps)}
        acc = np.full((n, len(eps)), np.nan)
        for i, r in enumerate(runs):
            if r.fgsm is not None:
                acc[i, [where[float(e)] for e in r.fgsm[0]]] = r.fgsm[1]
        g["fgsm/eps"], g["fgsm/accuracy"] = np.array(eps), acc
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


def plot_labels(runs: Sequence[RunSummary], setting_cols: list[str]) -> dict[str, str]:
    """Plot labels: the settings that differ between runs (the run id if none do)."""
    varying = [c for c in setting_cols if len({_cell(r.values.get(c)) for r in runs}) > 1]
    return {
        r.run_id: ", ".join(f"{c}={_cell(r.values.get(c), 3)}" for c in varying) or r.run_id
        for r in runs
    }
