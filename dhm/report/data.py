"""The report's data, extracted once per aggregation into ``summary/report_data.json``.

``write_report_data(sweep_dir, summary_dir)`` reads ``summary/results.h5`` (the table, the seed
cells and the stacked per-run curves that ``dhm.summary.aggregate`` has just written) and, for
the first ``max_image_runs`` runs, the image grids in their first test shard, and writes what
``dhm.report.page.write_report`` draws as plain JSON: the headline table's values per seed cell
(mean and std over seeds, or the value and its 95% bootstrap interval), each headline metric's
heatmap over the grid, and per run its attack curves, reliability bins, -ELBO histograms (one
panel per OOD set), bits/dim per set and image grids (PNG data URIs). Cells whose metric does
not apply to the run's model (``dhm.summary.tables.metric_applies``) are marked ``na``. The
page is then rendered from this file and the runs' live states alone, with neither h5py nor
numpy, so ``mode=status`` can rewrite it for runs in flight.

Each run and seed cell names the code snapshot(s) its shards were written by (``code``); a seed
cell, heatmap cell or heatmap whose numbers come from several snapshots says so (``mixed``,
``codes``).

A sweep evaluated under several variants or at several checkpoints has a table row per run and
*view* (a variant at a checkpoint; columns ``variant``, ``checkpoint``, ``eval.<key>``), the
primary view (the default variant at its final checkpoint) first. The sections above show the
primary view alone; ``variants`` holds every view's headline values per run, to compare two side
by side, and the curves over epochs of each variant evaluated at several checkpoints.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

from dhm.core import variants as V
from dhm.core.fsutil import atomic_write_text
from dhm.core.provenance import code_ids, code_text
from dhm.report.page import DATA_FORMAT, DATA_NAME, fmt
from dhm.summary.metrics import seed_interval, zero_width
from dhm.summary.tables import (
    VIEW_COLUMNS,
    axis_values,
    bits_by_set,
    column_meta,
    grid_layout,
    head_end,
    metric_applies,
)

MAX_IMAGE_RUNS = 48  # runs whose image grids are embedded (the page stays a few MB)
HEATMAP_PREFIXES = ("accuracy", "ece", "auroc", "fgsm", "pgd")  # headline metrics drawn as grids
_CURVES = (
    "fgsm/eps",
    "fgsm/accuracy",
    "pgd/eps",
    "pgd/accuracy",
    "reliability/counts",
    "reliability/accuracy",
    "reliability/confidence",
    "elbo_hist/edges",
)


def _read_table(group: h5py.Group) -> tuple[list[str], list[dict]]:
    """A table of results.h5 as rows: floats (None for NaN) and strings (None when empty)."""
    cols = json.loads(group.attrs["columns"])
    data = {c: group[c].asstr()[()] if group[c].dtype.kind == "O" else group[c][()] for c in cols}
    n = len(data[cols[0]]) if cols else 0
    rows = []
    for i in range(n):
        row = {}
        for c in cols:
            v = data[c][i]
            if isinstance(v, str):
                row[c] = v or None
            else:
                row[c] = None if math.isnan(v) else float(v)
        rows.append(row)
    return cols, rows


def _curves(g: h5py.Group) -> dict[str, Any]:
    out: dict[str, Any] = {"run_id": list(g["run_id"].asstr()[()]) if "run_id" in g else []}
    for key in _CURVES:
        out[key] = g[key][()] if key in g else None
    out["hists"] = {k: g[f"elbo_hist/counts/{k}"][()] for k in g.get("elbo_hist/counts", {})}
    out["by_ood"] = {  # absent from a results.h5 written before the per-OOD-set panels
        ood: {k: panel[k][()] for k in ("edges", "id_counts", "ood_counts")}
        for ood, panel in g.get("elbo_hist/by_ood", {}).items()
    }
    return out


def _round(values: Any) -> list[float | None]:
    a = np.asarray(values, dtype=np.float64)
    return [None if not math.isfinite(v) else float(f"{v:.4g}") for v in a.ravel()]


def _hist(ood: str | None, edges: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "ood": ood,
        "edges": _round(edges),
        "sets": {k: [int(v) for v in h] for k, h in sets.items() if h.sum() > 0},
    }


def _hists(i: int, c: dict[str, Any], id_set: str | None) -> list[dict[str, Any]]:
    """Run i's -ELBO panels: the ID set and each OOD set on a grid of their own, else (a run
    without OOD sets, a results.h5 from before the panels) every set on the shared grid."""
    panels = [
        _hist(ood, p["edges"][i], {id_set or "ID": p["id_counts"][i], ood: p["ood_counts"][i]})
        for ood, p in sorted(c["by_ood"].items())
        if np.isfinite(p["edges"][i]).all()
    ]
    edges = c["elbo_hist/edges"]
    if not panels and edges is not None and np.isfinite(edges[i]).all():
        panels = [_hist(None, edges[i], {k: h[i] for k, h in c["hists"].items()})]
    return panels


def _run_data(i: int, rid: str, c: dict[str, Any], row: dict) -> dict[str, Any]:
    """Run i's figures as the page's script draws them (attacks, reliability, histograms,
    bits/dim)."""
    d: dict[str, Any] = {
        "id": rid,
        "id_set": row.get("dataset"),
        "code": _code(row.get("code"), row.get("status") == "ok"),
    }
    for kind in ("fgsm", "pgd"):
        if c[f"{kind}/eps"] is not None and not np.isnan(c[f"{kind}/accuracy"][i]).all():
            d[kind] = [_round(c[f"{kind}/eps"]), _round(c[f"{kind}/accuracy"][i])]
    if c["reliability/counts"] is not None and c["reliability/counts"][i].sum() > 0:
        d["rel"] = {k: _round(c[f"reliability/{k}"][i]) for k in ("accuracy", "confidence")}
        d["rel"]["counts"] = [int(v) for v in c["reliability/counts"][i]]
    hists = _hists(i, c, row.get("dataset"))
    if hists:
        d["hists"] = hists
    bits = bits_by_set(row, row.get("dataset"))
    if bits:
        d["bits"] = {k: _round(v) for k, v in bits.items()}
    return d


def _png(images: np.ndarray, ncol: int = 8) -> str:
    """A grid of uint8 images [n, 3, 32, 32] as a PNG data URI (2x upscaled)."""
    n = len(images)
    rows = -(-n // ncol)
    grid = np.full((rows * 34, ncol * 34, 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, col = divmod(k, ncol)
        grid[r * 34 + 1 : r * 34 + 33, col * 34 + 1 : col * 34 + 33] = img.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
        buf, format="PNG"
    )
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _images(sweep_dir: Path, row: dict, primary: V.Variant | None) -> dict[str, str]:
    """inputs, recon and samples of the run's first test shard, as PNG data URIs: the shard of
    the primary view (the ID set's scores folder of the ``primary`` variant at its last
    checkpoint), else one in eval/ itself (the layout before variants), else any final scores
    folder's (a sweep with no variants.json or plan.json)."""
    id_set = row.get("dataset")
    if not id_set:
        return {}
    eval_dir = sweep_dir / "runs" / row["run_id"] / "eval"
    folders = [eval_dir]
    if primary is not None and row.get("model"):
        s = primary.settings
        scores = V.part_folder(s, s["checkpoints"][-1], "id", "scores", str(row["model"]))
        folders.insert(0, eval_dir / scores)
    folders += sorted(eval_dir.glob(f"{V.FINAL}-scores-*"))
    paths = [p for d in folders for p in sorted(d.glob(f"{id_set}__0000000-*.h5"))]
    if not paths:
        return {}
    try:
        with h5py.File(paths[0], "r") as f:
            g = f.get(f"{id_set}/images")
            if g is None:
                return {}
            return {k: _png(g[k][()]) for k in ("inputs", "recon", "samples") if k in g}
    except OSError:
        return {}


def _value(ok: list[dict], metric: str, model: Any) -> dict[str, Any] | None:
    """A headline cell: ``{"na": model}`` when the metric does not apply to the model, the mean
    and std (ddof 1) over the cell's ok runs with the Student-t interval over seeds when several
    have the metric, else the value with its interval (Wilson or bootstrap; lo, hi: None when
    not computed); ``zero``: the interval has zero width. None: no value."""
    if not metric_applies(metric, model):
        return {"na": str(model)}
    vals = [r[metric] for r in ok if r.get(metric) is not None]
    if not vals:
        return None
    if len(vals) > 1:
        lo, hi = seed_interval(vals)
        mean, std = float(np.mean(vals)), float(np.std(vals, ddof=1))
        return {"mean": mean, "std": std, "lo": lo, "hi": hi, "zero": zero_width(lo, hi)}
    lo, hi = ok[0].get(f"{metric}_ci_lo"), ok[0].get(f"{metric}_ci_hi")
    return {"value": vals[0], "lo": lo, "hi": hi, "zero": zero_width(lo, hi)}


def _code(value: str | None, ok: bool) -> str:
    """A ``code`` cell as the page shows it (ids joined by "+", "" as ``none``): results.h5
    keeps "" and "no shard read" alike as empty, and an ok run had shards, so its empty cell
    is the id ""; a failed run's empty cell stays empty (not known)."""
    return code_text(value if value is not None or not ok else "")


def _ok_codes(rows: list[dict]) -> list[str]:
    """The snapshot ids of these rows' ok runs, sorted, once each (an ok run's empty ``code``
    is the id "": its shards name no snapshot)."""
    return sorted(
        {i for r in rows if r.get("status") == "ok" for i in code_ids(r.get("code") or "")}
    )


def _groups(
    rows: list[dict], cells: list[dict] | None, shown: list[str], headline: list[str]
) -> list[dict[str, Any]]:
    """The headline table's rows: one per seed cell (its runs, settings and metric cells, the
    snapshot ids of its shards and whether they are several: ``mixed``)."""
    by_id = {r["run_id"]: r for r in rows}
    groups = [c["runs"].split() for c in cells] if cells else [[r["run_id"]] for r in rows]
    out = []
    for k, ids in enumerate(groups):
        members = [by_id[i] for i in ids if i in by_id]
        ok = [r for r in members if r["status"] == "ok"]
        if cells and "code" in cells[k]:  # aggregate's, over every run with shards
            code, mixed = cells[k].get("code"), cells[k].get("mixed_code") in ("True", True)
        else:  # a results.h5 from before the code columns: nothing to say
            code, mixed = None, False
        out.append(
            {
                "ids": ids,
                "members": [r["run_id"] for r in members],
                "settings": [members[0].get(c) for c in shown],
                "values": [_value(ok, m, members[0].get("model")) for m in headline],
                "code": _code(code, bool(ok)),
                "mixed": mixed,
                "run_codes": {r["run_id"]: _code(r.get("code"), r in ok) for r in members},
            }
        )
    return out


def _heatmap(metric: str, grid: list[dict], base: list[dict], axes: list[str]) -> dict[str, Any]:
    """One metric over the two axes: per cell its runs and, when any is ok, their mean."""
    words, _, better = column_meta(metric)
    xs = axis_values(grid, axes[0])
    ys = axis_values(grid, axes[1]) if len(axes) > 1 else [None]
    by_key: dict[tuple, list[dict]] = {}
    for r in grid:
        key = (fmt(r.get(axes[0])), fmt(r.get(axes[1])) if len(axes) > 1 else "")
        by_key.setdefault(key, []).append(r)

    def cell(rs: list[dict]) -> dict[str, Any]:
        ok = [r[metric] for r in rs if r.get("status") == "ok" and r.get(metric) is not None]
        out: dict[str, Any] = {"ids": [r["run_id"] for r in rs]}
        if ok:
            out.update(mean=float(np.mean(ok)), n=len(ok))
            codes = _ok_codes([r for r in rs if r.get(metric) is not None])
            if len(codes) > 1:  # the mean mixes code snapshots
                out["codes"] = codes
        elif rs and not any(metric_applies(metric, r.get("model")) for r in rs):
            out["na"] = str(rs[0].get("model"))
        return out

    lines = [
        {
            "label": fmt(y, 3) if y is not None else "",
            "cells": [cell(by_key.get((fmt(x), fmt(y) if y is not None else ""), [])) for x in xs],
        }
        for y in reversed(ys)
    ]
    drawn = [r for r in [*grid, *base] if r.get(metric) is not None]
    return {
        "words": words,
        "better": better,
        "codes": _ok_codes(drawn),  # the snapshots of the runs whose values it draws
        "axes": axes,
        "xs": [fmt(x, 3) for x in xs],
        "rows": lines,
        "base": [{"label": str(r.get("model")), "cell": cell([r])} for r in base],
    }


def _heatmaps(settings: list[str], rows: list[dict], headline: list[str]) -> list[dict] | None:
    """The headline heatmaps over the grid; None when no setting varies (no grid)."""
    grid, base, axes = grid_layout(settings, rows)
    if not axes:
        return None
    metrics = [m for m in headline if m.startswith(HEATMAP_PREFIXES)]
    return [_heatmap(m, grid, base, axes) for m in metrics]


def _meta(col: str) -> dict[str, Any]:
    words, unit, better = column_meta(col)
    return {"col": col, "words": words, "unit": unit, "better": better}


def _is_view_column(col: str) -> bool:
    """variant, checkpoint and eval.<key>: which evaluation a row is, not a run's setting."""
    return col in VIEW_COLUMNS or col.startswith("eval.")


def _view_key(row: dict) -> str:
    """A view's name: ``<variant> @ <checkpoint>`` (``default @ final``)."""
    return f"{row.get('variant')} @ {row.get('checkpoint')}"


def _primary(rows: list[dict], cells: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    """The rows and seed cells of the primary view: those of the first row's variant and
    checkpoint (aggregate writes that view first, its rows in the order of the run curves)."""
    key = _view_key(rows[0])
    mine = [r for r in rows if _view_key(r) == key]
    return mine, None if cells is None else [c for c in cells if _view_key(c) == key]


def _labels(rows: list[dict], settings: list[str]) -> dict[str, str]:
    """Each run's short label: the settings that differ between the runs (its id if none do)."""
    varying = [c for c in settings if len({fmt(r.get(c)) for r in rows}) > 1]
    return {
        r["run_id"]: ", ".join(f"{c}={fmt(r.get(c), 3)}" for c in varying) or r["run_id"]
        for r in rows
    }


def _train_epochs(sweep_dir: Path) -> dict[str, int]:
    """Each planned run's train.epochs (the epoch of its ``final`` checkpoint), from plan.json;
    runs whose plan does not say are left out."""
    try:
        runs = json.loads((sweep_dir / "plan.json").read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out = {}
    for r in runs:
        epochs = ((r.get("config") or {}).get("train") or {}).get("epochs")
        if isinstance(epochs, int):
            out[r["run_id"]] = epochs
    return out


def _points(mine: list[dict], rows: list[dict | None], m: str, final: int) -> list[list[float]]:
    """A run's (epoch, value) points of metric m over the views ``mine`` of one variant (its
    rows there, None where it has none): ``final`` at epoch ``final``; ok rows with a value."""
    pts = []
    for v, row in zip(mine, rows, strict=True):
        if row is not None and row["status"] == "ok" and row.get(m) is not None:
            c = v["checkpoint"]
            pts.append([final if c == V.FINAL else int(c), row[m]])
    return sorted(pts)


def _over_epochs(
    views: list[dict],
    by_view: dict[str, dict[str, dict]],
    labels: dict[str, str],
    headline: list[str],
    epochs: dict[str, int],
) -> list[dict[str, Any]]:
    """Per variant evaluated at two or more checkpoints, per curve metric (ECE, accuracy and
    the AUROCs among the headline), each run's (epoch, value) points over its checkpoints:
    ``final`` at the run's train.epochs, or after the variant's largest epoch when unknown."""
    metrics = [m for m in headline if m in ("ece", "accuracy") or m.startswith("auroc_")]
    out = []
    for name in dict.fromkeys(v["variant"] for v in views):
        mine = [v for v in views if v["variant"] == name]
        if len(mine) < 2 or not metrics:
            continue
        last = max((int(v["checkpoint"]) for v in mine if v["checkpoint"] != V.FINAL), default=0)
        rows = {rid: [by_view[v["key"]].get(rid) for v in mine] for rid in labels}
        curves = []
        for m in metrics:
            runs = [
                {"run_id": rid, "label": label, "points": pts}
                for rid, label in labels.items()
                if (pts := _points(mine, rows[rid], m, epochs.get(rid, last + 1)))
            ]
            if runs:
                curves.append({**_meta(m), "runs": runs})
        if curves:
            out.append({"variant": name, "metrics": curves})
    return out


def _variants(
    cols: list[str],
    rows: list[dict],
    settings: list[str],
    headline: list[str],
    epochs: dict[str, int],
) -> dict[str, Any]:
    """Every view (its key, variant, checkpoint and the eval settings views differ in) and,
    per run of the primary view (its id and label), each view's headline values (None where
    the run is not ok there or lacks the metric), then the curves over epochs."""
    evals = [c for c in cols if c.startswith("eval.")]
    views: list[dict] = []
    by_view: dict[str, dict[str, dict]] = {}  # view key -> run id -> row
    for r in rows:
        key = _view_key(r)
        if key not in by_view:
            by_view[key] = {}
            views.append(
                {
                    "key": key,
                    "variant": r.get("variant"),
                    "checkpoint": r.get("checkpoint"),
                    "settings": {c: r.get(c) for c in evals},
                }
            )
        by_view[key][r["run_id"]] = r
    labels = _labels(list(by_view[views[0]["key"]].values()), settings)

    def values(row: dict | None) -> list[float | None]:
        ok = row is not None and row["status"] == "ok"
        return [row.get(m) if ok else None for m in headline]

    return {
        "views": views,
        "metrics": [_meta(m) for m in headline],
        "runs": [
            {
                "run_id": rid,
                "label": label,
                "values": [values(by_view[v["key"]].get(rid)) for v in views],
            }
            for rid, label in labels.items()
        ],
        "curves": _over_epochs(views, by_view, labels, headline, epochs),
    }


def report_data(
    sweep_dir: Path, summary: Path, max_image_runs: int = MAX_IMAGE_RUNS
) -> dict[str, Any]:
    """Everything the page shows of ``summary/results.h5`` and the runs' shards, as JSON."""
    with h5py.File(summary / "results.h5", "r") as f:
        cols, all_rows = _read_table(f["table"])
        cells = _read_table(f["cells"])[1] if "cells" in f else None
        curves = _curves(f["runs"])
        attrs = dict(f.attrs)
    several = "variant" in cols and bool(all_rows)  # several views: the primary one's rows
    rows, cells = _primary(all_rows, cells) if several else (all_rows, cells)
    settings = [c for c in cols[2 : head_end(cols) + 1] if not _is_view_column(c)]
    shown = [c for c in settings if c not in ("seed", "train.seed")]
    headline = json.loads(attrs.get("headline", "[]"))
    registry = V.read_registry(sweep_dir)
    primary = registry[0] if registry else None  # the default variant: the primary view's
    runs = []
    for i, rid in enumerate(curves["run_id"]):
        d = _run_data(i, rid, curves, rows[i])
        if i < max_image_runs:
            d["images"] = _images(sweep_dir, rows[i], primary)
        runs.append(d)
    return {
        "format": DATA_FORMAT,
        "created": str(attrs["created"]) if "created" in attrs else None,
        "git_commit": str(attrs.get("git_commit", "unknown")),
        "shown": shown,
        "headline": [_meta(m) for m in headline],
        "rows": [{k: r.get(k) for k in ("run_id", "status", "problem", "code")} for r in rows],
        "groups": _groups(rows, cells, shown, headline),
        "heatmaps": _heatmaps(settings, rows, headline) if rows else None,
        "runs": runs,
        "max_image_runs": max_image_runs,
        "variants": (
            _variants(cols, all_rows, settings, headline, _train_epochs(sweep_dir))
            if several
            else None
        ),
    }


def write_report_data(
    sweep_dir: str | Path,
    summary_dir: str | Path | None = None,
    max_image_runs: int = MAX_IMAGE_RUNS,
) -> Path:
    """Write ``<summary_dir>/report_data.json`` (default ``<sweep_dir>/summary``); its path."""
    sweep_dir = Path(sweep_dir)
    summary = Path(summary_dir) if summary_dir is not None else sweep_dir / "summary"
    data = report_data(sweep_dir, summary, max_image_runs)
    return atomic_write_text(summary / DATA_NAME, json.dumps(data, separators=(",", ":")))
