"""The sweep's report: one self-contained HTML page, written from the summary and run states.

``write_report(sweep_dir)`` reads ``summary/report_data.json`` (the tables, heatmaps, per-run
curves and image grids that ``dhm.report.data`` extracted when the sweep was aggregated) and
``plan.json``, and renders ``summary/report.html`` from the Jinja2 template ``page.html.j2``
(autoescaped: failure reasons and log tails are shown as text, never as markup): no network
access, images embedded as data URIs, charts drawn by a small inline script. It never recomputes
a metric and imports neither numpy nor h5py, so the launcher refreshes it cheaply from
``mode=status`` with each run's live state (stage, Slurm state, step, last loss, the reason it
failed and the tail of its log), and it works before any summary exists (runs in flight only).

A sweep evaluated under several variants or at several checkpoints (views) shows the primary
view (the default variant, final) in every section but two: "Evaluations side by side" (any two
views' headline values per run and their difference, the views picked in the page) and "Over
epochs" (each variant evaluated at several checkpoints: its metrics against the epoch).

A 1,000-run sweep's page stays usable: heatmaps are HTML tables (one cell per grid point), the
per-run figures are drawn only when a run's section is opened, the run list is paginated, and
image grids are embedded for the first runs only (``dhm.report.data.MAX_IMAGE_RUNS``).
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jinja2

from dhm.core.fsutil import atomic_write_text
from dhm.core.provenance import NO_SNAPSHOT, code_ids

VIRIDIS = [
    "#440154",
    "#482475",
    "#414487",
    "#355f8d",
    "#2a788e",
    "#21918c",
    "#22a884",
    "#44bf70",
    "#7ad151",
    "#bddf26",
    "#fde725",
]
PAGE_RUNS = 25
CURVE_RUNS = 12  # lines an "Over epochs" chart draws: 6 colours, solid then dashed
TEMPLATE = "page.html.j2"  # next to this file: the page's markup, style and charts' script
DATA_NAME = "report_data.json"  # in the summary folder, written by dhm.report.data
DATA_FORMAT = 5  # report_data.json's layout; a file of another format is re-made by aggregate
# 4: code (snapshot ids) of rows, runs and groups; mixed groups, heatmaps' and cells' codes
# 5: variants (every view's headline values, curves over epochs); the rest the primary view's
_STATE_KEYS = ("stage", "slurm", "step", "loss", "reason")  # the "Runs now" table's columns


def fmt(v: Any, digits: int = 4) -> str:
    """A cell as text: None and NaN empty, floats to ``digits`` significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{float(v):.{digits}g}"
    return str(v)


def colour(v: float) -> str:
    """The viridis colour of a value in [0, 1] (clipped)."""
    i = min(max(v, 0.0), 1.0) * (len(VIRIDIS) - 1)
    return VIRIDIS[int(round(i))]


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = fmt
    env.policies["json.dumps_kwargs"] = {"sort_keys": False}
    return env.get_template(TEMPLATE)


def _read_plan(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / "plan.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _read_data(summary: Path) -> tuple[dict[str, Any] | None, bool]:
    """(report_data.json's content or None, whether a summary exists that lacks it: one written
    before the report kept its data there, or unreadable; aggregating again writes it)."""
    try:
        data = json.loads((summary / DATA_NAME).read_text())
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and data.get("format") == DATA_FORMAT:
        return data, False
    return None, (summary / "results.h5").exists()


def _failure(row: dict, states: dict[str, dict]) -> dict[str, Any]:
    """A failed run's line under its table row: status, Slurm state, why, its log's tail."""
    st = states.get(row["run_id"], {})
    return {
        "run_id": row["run_id"],
        "status": row["status"],
        "state": st.get("slurm") or "",
        "why": row.get("problem") or st.get("reason") or "no reason recorded",
        "tail": "\n".join(st.get("log_tail") or []),
    }


def show_code(data: dict[str, Any]) -> bool:
    """Whether the page names code snapshots: some run ran in one, or a cell mixes them."""
    return any(g["mixed"] or g["code"] not in ("", NO_SNAPSHOT) for g in data["groups"])


def _mixed_title(g: dict[str, Any]) -> str:
    """Which run ran which snapshot, for a cell whose runs ran several."""
    runs = ", ".join(f"{rid} {code or '?'}" for rid, code in g["run_codes"].items())
    return f"its runs (or a run's sets) ran different code snapshots: {runs}"


def _table(data: dict[str, Any], by_id: dict[str, dict], states: dict[str, dict]) -> dict:
    """The headline table: a row per seed cell (mean ± std when it has several seeds, else the
    value and its 95% bootstrap interval), failed runs masked with their reason; the cell's
    code snapshot(s) when any run ran in one, marked where they are several."""
    code = show_code(data)
    cols = ("runs", "status", *data["shown"], *(["code"] if code else []))
    head = [{"words": c, "unit": "", "arrow": ""} for c in cols]
    for h in data["headline"]:
        arrow = {1: " ↑", -1: " ↓"}.get(h["better"], "")
        head.append({"words": h["words"], "unit": h["unit"], "arrow": arrow})
    groups = []
    for g in data["groups"]:
        members = [by_id[i] for i in g["members"]]
        bad = [r for r in members if r["status"] != "ok"]
        ok = len(members) - len(bad)
        status = f"{ok}/{len(members)} ok" if len(members) > 1 else members[0]["status"]
        groups.append(
            {
                "ids": g["ids"],
                "status": status,
                "bad": bool(bad),
                "settings": [fmt(v) for v in g["settings"]],
                "code": g["code"] if code else None,
                "mixed": _mixed_title(g) if g["mixed"] else "",
                "values": g["values"],
                "failures": [_failure(r, states) for r in bad],
            }
        )
    mixed = sorted({c for g in data["groups"] if g["mixed"] for c in code_ids(g["code"])})
    return {"head": head, "groups": groups, "mixed": mixed}


def _heat_cell(cell: dict[str, Any], by_id: dict[str, dict], states: dict[str, dict]) -> dict:
    """A heatmap cell: its ok runs' mean in colour, empty, not applicable (the metric does not
    apply to the model: a resnet's ELBO), or masked with its first run's state and reason (a
    failed run, or an ok run that lacks the metric)."""
    ids = cell["ids"]
    if "na" in cell:
        return {"kind": "na", "title": f"does not apply to model={cell['na']}"}
    if "mean" in cell:
        v = cell["mean"]
        fg = "#000" if v > 0.6 else "#fff"
        tip = ", ".join(ids)
        codes = [c or NO_SNAPSHOT for c in cell.get("codes", [])]  # several: the mean mixes them
        if codes:
            tip += f" (ran {len(codes)} code snapshots: {', '.join(codes)})"
        return {
            "kind": "value",
            "bg": colour(v),
            "fg": fg,
            "text": fmt(v, 3),
            "n": cell["n"],
            "tip": tip,
            "mixed": bool(codes),
        }
    if not ids:
        return {"kind": "empty"}
    rows = [by_id.get(i, {}) for i in ids]
    st = states.get(ids[0], {})
    if all(r.get("status") == "ok" for r in rows):
        label, why = "no value", "ok, but the metric is missing"
    else:
        label = st.get("slurm") or st.get("stage") or rows[0].get("status") or "missing"
        why = rows[0].get("problem") or st.get("reason") or ""
    return {"kind": "masked", "title": f"{ids[0]}: {why}", "label": str(label)}


def _heatmaps(
    data: dict[str, Any], by_id: dict[str, dict], states: dict[str, dict]
) -> list[dict] | None:
    if data["heatmaps"] is None:
        return None
    out = []
    for h in data["heatmaps"]:
        axes = h["axes"]
        rows = [
            {"label": r["label"], "cells": [_heat_cell(c, by_id, states) for c in r["cells"]]}
            for r in h["rows"]
        ]
        base = [
            {"label": b["label"], "cell": _heat_cell(b["cell"], by_id, states)} for b in h["base"]
        ]
        codes = [c or NO_SNAPSHOT for c in h["codes"]]
        out.append(
            {
                "words": h["words"],
                "codes": codes if len(codes) > 1 else [],  # its runs ran several snapshots
                "better": "higher" if h["better"] > 0 else "lower",
                "xlabel": axes[0],
                "ylabel": axes[1] if len(axes) > 1 else "",
                "xs": h["xs"],
                "rows": rows,
                "base": base,
            }
        )
    return out


def _in_flight(plan_runs: list[dict], states: dict[str, dict]) -> list[dict]:
    """Each run's stage, Slurm state, epoch/step, last loss and why, as the launcher saw them."""
    if not states:
        return []
    return [
        {
            "run_id": r["run_id"],
            "cells": [str(states.get(r["run_id"], {}).get(k) or "") for k in _STATE_KEYS],
        }
        for r in plan_runs
    ]


def _context(
    sweep_dir: Path,
    plan: dict[str, Any],
    data: dict[str, Any] | None,
    stale: bool,
    states: dict[str, dict],
) -> dict[str, Any]:
    """What the template shows: the header's counts and, from the summary's data, the tables."""
    rows = data["rows"] if data else []
    by_id = {r["run_id"]: r for r in rows}
    ok = sum(r["status"] == "ok" for r in rows)
    plan_runs = plan.get("runs", [])
    return {
        "name": plan.get("sweep", sweep_dir.name),
        "root": plan.get("root", str(sweep_dir.parent)),
        "created": (data or {}).get("created") or ("unknown (see below)" if stale else "not yet"),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": str((data or {}).get("git_commit", "unknown"))[:12],
        "n_runs": len(plan_runs) or len(rows),
        "ok": ok,
        "failed": len(rows) - ok,
        "active": sum(1 for s in states.values() if s.get("active")),
        "table": _table(data, by_id, states) if rows else None,
        "heatmaps": _heatmaps(data, by_id, states) if rows else None,
        "states": _in_flight(plan_runs, states),
        "efficiency": _efficiency(sweep_dir),
        "runs": data["runs"] if data else [],
        "variants": data["variants"] if data else None,
        "show_code": bool(rows) and show_code(data),
        "max_image_runs": data["max_image_runs"] if data else 0,
        "page_runs": PAGE_RUNS,
        "curve_runs": CURVE_RUNS,
        "viridis": VIRIDIS,
        "data_name": DATA_NAME,
        "stale": stale,
    }


def _efficiency(sweep_dir: Path) -> list[dict[str, Any]]:
    """``<sweep>/efficiency.json`` as status last wrote it (asked against used per stage,
    hpc.efficiency); [] when there is none or it cannot be read."""
    try:
        rows = json.loads((sweep_dir / "efficiency.json").read_text())
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) else []


def write_report(
    sweep_dir: str | Path,
    *,
    states: dict[str, dict] | None = None,
    summary_dir: str | Path | None = None,
    plan: dict[str, Any] | None = None,
) -> Path:
    """Write ``<summary_dir>/report.html`` (default ``<sweep_dir>/summary``); return its path.
    ``plan``: the sweep's plan.json as read (read here when None)."""
    sweep_dir = Path(sweep_dir)
    summary = Path(summary_dir) if summary_dir is not None else sweep_dir / "summary"
    plan = _read_plan(sweep_dir) if plan is None else plan
    data, stale = _read_data(summary)
    page = _template().render(_context(sweep_dir, plan, data, stale, states or {}))
    return atomic_write_text(summary / "report.html", page)
