"""The sweep's report: one self-contained HTML page, written from the summary and run states.

``write_report(sweep_dir)`` reads ``summary/results.h5`` (the table, the seed cells and the
stacked per-run curves that ``dhm.summary.aggregate`` wrote), ``plan.json`` and, for a few runs, the
image grids in their first test shard, and writes ``summary/report.html``: no network access,
images embedded as data URIs, charts drawn by a small inline script. It never recomputes a
metric, so the launcher refreshes it cheaply from ``mode=status`` with each run's live state
(stage, Slurm state, step, last loss, the reason it failed and the tail of its log), and it
works before any summary exists (runs in flight only).

A 1,000-run sweep's page stays usable: heatmaps are HTML tables (one cell per grid point), the
per-run figures are drawn only when a run's section is opened, the run list is paginated, and
image grids are embedded for at most ``max_image_runs`` runs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dhm.core.fsutil import atomic_write_text

if TYPE_CHECKING:
    import h5py
    import numpy as np

# numpy, h5py and dhm.summary.tables (~0.15 s to import) are imported where a summary is read or
# drawn: mode=status rewrites this page for runs in flight, before any summary exists.

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
PAGE_TEMPLATE = Path(__file__).with_name("page.html")  # style and the charts' script


def _head(col: str) -> str:
    from dhm.summary.tables import column_meta

    words, unit, better = column_meta(col)
    arrow = {1: " ↑", -1: " ↓"}.get(better, "")
    unit = f" <span class=u>{html.escape(unit)}</span>" if unit else ""
    return f"{html.escape(words)}{unit}{arrow}"


def _fmt(v: Any, digits: int = 4) -> str:
    import numpy as np

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float | np.floating):
        return f"{float(v):.{digits}g}"
    return str(v)


def _colour(v: float) -> str:
    i = min(max(v, 0.0), 1.0) * (len(VIRIDIS) - 1)
    return VIRIDIS[int(round(i))]


def _read_table(group: h5py.Group) -> tuple[list[str], list[dict]]:
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
    def arr(key: str) -> np.ndarray | None:
        return g[key][()] if key in g else None

    out: dict[str, Any] = {"run_id": list(g["run_id"].asstr()[()]) if "run_id" in g else []}
    for key in (
        "fgsm/eps",
        "fgsm/accuracy",
        "pgd/eps",
        "pgd/accuracy",
        "reliability/counts",
        "reliability/accuracy",
        "reliability/confidence",
        "elbo_hist/edges",
    ):
        out[key] = arr(key)
    out["hists"] = {k: g[f"elbo_hist/counts/{k}"][()] for k in g.get("elbo_hist/counts", {})}
    return out


def _round(values: Any) -> Any:
    import numpy as np

    if values is None:
        return None
    a = np.asarray(values, dtype=np.float64)
    return [None if not math.isfinite(v) else float(f"{v:.4g}") for v in a.ravel()]


def _run_data(i: int, rid: str, c: dict[str, Any], row: dict) -> dict[str, Any]:
    import numpy as np

    d: dict[str, Any] = {"id": rid, "id_set": row.get("dataset")}
    for kind in ("fgsm", "pgd"):
        if c[f"{kind}/eps"] is not None and not np.isnan(c[f"{kind}/accuracy"][i]).all():
            d[kind] = [_round(c[f"{kind}/eps"]), _round(c[f"{kind}/accuracy"][i])]
    if c["reliability/counts"] is not None and c["reliability/counts"][i].sum() > 0:
        d["rel"] = {k: _round(c[f"reliability/{k}"][i]) for k in ("accuracy", "confidence")}
        d["rel"]["counts"] = [int(v) for v in c["reliability/counts"][i]]
    if c["elbo_hist/edges"] is not None and np.isfinite(c["elbo_hist/edges"][i]).all():
        d["hist"] = {
            "edges": _round(c["elbo_hist/edges"][i]),
            "sets": {k: [int(v) for v in h[i]] for k, h in c["hists"].items() if h[i].sum() > 0},
        }
    return d


def _png(images: np.ndarray, ncol: int = 8) -> str:
    """A grid of uint8 images [n, 3, 32, 32] as a PNG data URI (2x upscaled)."""
    import numpy as np
    from PIL import Image

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


def _images(sweep_dir: Path, rid: str, id_set: str | None) -> dict[str, str]:
    import h5py

    if not id_set:
        return {}
    paths = sorted((sweep_dir / "runs" / rid / "eval").glob(f"{id_set}__0000000-*.h5"))
    if not paths:
        return {}
    try:
        with h5py.File(paths[0], "r") as f:
            g = f.get(f"{id_set}/images")
            return (
                {}
                if g is None
                else {k: _png(g[k][()]) for k in ("inputs", "recon", "samples") if k in g}
            )
    except OSError:
        return {}


def _heatmap(
    metric: str, grid: list[dict], base: list[dict], axes: list[str], states: dict[str, dict]
) -> str:
    import numpy as np

    from dhm.summary.tables import axis_values, column_meta

    words, _, better = column_meta(metric)
    xs = axis_values(grid, axes[0])
    ys = axis_values(grid, axes[1]) if len(axes) > 1 else [None]
    cell: dict[tuple, list[dict]] = {}
    for r in grid:
        key = (_fmt(r.get(axes[0])), _fmt(r.get(axes[1])) if len(axes) > 1 else "")
        cell.setdefault(key, []).append(r)

    def td(rs: list[dict]) -> str:
        ok = [r[metric] for r in rs if r.get("status") == "ok" and r.get(metric) is not None]
        if ok:
            v = float(np.mean(ok))
            text = _fmt(v, 3) + (f"<br><small>n={len(ok)}</small>" if len(ok) > 1 else "")
            tip = ", ".join(r["run_id"] for r in rs)
            fg = "#000" if v > 0.6 else "#fff"
            return f'<td style="background:{_colour(v)};color:{fg}" title="{tip}">{text}</td>'
        if not rs:
            return '<td class="empty"></td>'
        if all(r.get("status") == "ok" for r in rs):  # the metric does not apply (a resnet's ELBO)
            return '<td class="empty" title="not applicable">n/a</td>'
        r = rs[0]
        st = states.get(r["run_id"], {})
        label = st.get("slurm") or st.get("stage") or r.get("status") or "missing"
        why = r.get("problem") or st.get("reason") or ""
        return (
            f'<td class="masked" title="{html.escape(r["run_id"] + ": " + why)}">'
            f"{html.escape(str(label))}</td>"
        )

    head = "".join(f"<th>{html.escape(_fmt(x, 3))}</th>" for x in xs)
    body = []
    for y in reversed(ys):
        tds = "".join(td(cell.get((_fmt(x), _fmt(y) if y is not None else ""), [])) for x in xs)
        label = html.escape(_fmt(y, 3)) if y is not None else ""
        body.append(f"<tr><th>{label}</th>{tds}</tr>")
    bases = "".join(f"<tr><th>{html.escape(str(r.get('model')))}</th>{td([r])}</tr>" for r in base)
    ylabel = html.escape(axes[1]) if len(axes) > 1 else ""
    bar = "".join(f'<span style="background:{c}"></span>' for c in VIRIDIS)
    return (
        f'<figure class="heat"><figcaption>{html.escape(words)}'
        f" ({'higher' if better > 0 else 'lower'} is better; colour scale fixed to [0, 1])"
        f"</figcaption><div class=hrow><table class=hm><tr><th>{ylabel} \\ "
        f"{html.escape(axes[0])}</th>{head}</tr>{''.join(body)}</table>"
        + (f"<table class=hm><tr><th>baselines</th><th></th></tr>{bases}</table>" if bases else "")
        + f"</div><div class=cbar><span>0</span>{bar}<span>1</span> "
        f"<em>{html.escape(words)}</em></div></figure>"
    )


def _table(
    cols: list[str],
    rows: list[dict],
    cells: list[dict] | None,
    settings: list[str],
    headline: list[str],
    states: dict[str, dict],
) -> str:
    """The headline table: a row per seed cell (mean ± std when it has several seeds, else the
    value and its 95% bootstrap interval), failed runs masked with their reason."""
    import numpy as np

    by_id = {r["run_id"]: r for r in rows}
    groups = [c["runs"].split() for c in cells] if cells else [[r["run_id"]] for r in rows]
    shown = [c for c in settings if c not in ("seed", "train.seed")]
    head = ["runs", "status", *shown, *headline]
    out = ["<table id=headline class=sortable><thead><tr>"]
    out += [
        f"<th data-col={i}>{_head(c) if c in headline else html.escape(c)}</th>"
        for i, c in enumerate(head)
    ]
    out.append("</tr></thead><tbody>")
    for k, ids in enumerate(groups):
        members = [by_id[i] for i in ids if i in by_id]
        ok = [r for r in members if r["status"] == "ok"]
        first = members[0]
        status = f"{len(ok)}/{len(members)} ok" if len(members) > 1 else first["status"]
        bad = [r for r in members if r["status"] != "ok"]
        tds = [
            f"<td>{' '.join(html.escape(i) for i in ids)}</td>",
            f'<td class="{"ok" if not bad else "bad"}">{status}</td>',
        ]
        tds += [f"<td>{html.escape(_fmt(first.get(c)))}</td>" for c in shown]
        for m in headline:
            vals = [r[m] for r in ok if r.get(m) is not None]
            if not vals:
                tds.append('<td class="masked" data-v="">—</td>')
            elif len(vals) > 1:
                mean, std = float(np.mean(vals)), float(np.std(vals, ddof=1))
                tds.append(f'<td data-v="{mean}">{_fmt(mean, 4)} ± {_fmt(std, 2)}</td>')
            else:
                lo, hi = ok[0].get(f"{m}_ci_lo"), ok[0].get(f"{m}_ci_hi")
                ci = f" <small>[{_fmt(lo, 3)}, {_fmt(hi, 3)}]</small>" if lo is not None else ""
                tds.append(f'<td data-v="{vals[0]}">{_fmt(vals[0], 4)}{ci}</td>')
        out.append(f"<tr>{''.join(tds)}</tr>")
        for r in bad:
            st = states.get(r["run_id"], {})
            tail = "\n".join(st.get("log_tail") or [])
            why = r.get("problem") or st.get("reason") or "no reason recorded"
            state = st.get("slurm", "")
            out.append(
                f'<tr class="failure"><td colspan={len(head)}><b>{html.escape(r["run_id"])}'
                f"</b> {html.escape(r['status'])} {html.escape(state)}: {html.escape(why)}"
                + (
                    f"<details><summary>log tail</summary><pre>{html.escape(tail)}</pre></details>"
                    if tail
                    else ""
                )
                + "</td></tr>"
            )
        del k
    out.append("</tbody></table>")
    return "".join(out)


def _in_flight(plan_runs: list[dict], states: dict[str, dict]) -> str:
    """Each run's stage, Slurm state, epoch/step and last loss, as the launcher saw them."""
    if not states:
        return ""
    keys = ("stage", "slurm", "step", "loss", "reason")
    rows = [
        f"<tr><td>{html.escape(r['run_id'])}</td>"
        + "".join(
            f"<td>{html.escape(str(states.get(r['run_id'], {}).get(k) or ''))}</td>" for k in keys
        )
        + "</tr>"
        for r in plan_runs
    ]
    return (
        "<h2>Runs now</h2><table class=sortable id=states><thead><tr><th>run</th><th>stage</th>"
        "<th>Slurm</th><th>epoch/step</th><th>last loss</th><th>why</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def write_report(
    sweep_dir: str | Path,
    *,
    states: dict[str, dict] | None = None,
    summary_dir: str | Path | None = None,
    max_image_runs: int = 48,
    plan: dict[str, Any] | None = None,
) -> Path:
    """Write ``<summary_dir>/report.html`` (default ``<sweep_dir>/summary``); return its path.
    ``plan``: the sweep's plan.json as read (read here when None)."""
    sweep_dir = Path(sweep_dir)
    summary = Path(summary_dir) if summary_dir is not None else sweep_dir / "summary"
    states = states or {}
    if plan is None:
        plan = {}
        if (sweep_dir / "plan.json").exists():
            plan = json.loads((sweep_dir / "plan.json").read_text())
    plan_runs = plan.get("runs", [])
    cols: list[str] = []
    rows: list[dict] = []
    cells: list[dict] | None = None
    curves: dict[str, Any] = {"run_id": []}
    attrs: dict[str, Any] = {}
    h5 = summary / "results.h5"
    if h5.exists():
        import h5py

        with h5py.File(h5, "r") as f:
            cols, rows = _read_table(f["table"])
            if "cells" in f:
                cells = _read_table(f["cells"])[1]
                for c in cells:
                    c["n"] = int(c["n"] or 0)
            curves = _curves(f["runs"])
            attrs = dict(f.attrs)
    dataset_at = cols.index("dataset") if "dataset" in cols else 1
    settings = cols[2 : dataset_at + 1]
    headline = json.loads(attrs.get("headline", "[]"))
    name = plan.get("sweep", sweep_dir.name)
    ok = sum(r["status"] == "ok" for r in rows)
    failed = sum(r["status"] != "ok" for r in rows)
    active = sum(1 for s in states.values() if s.get("active"))
    root = plan.get("root", str(sweep_dir.parent))
    parts = [
        f"<h1>Sweep {html.escape(name)}</h1><p class=meta>",
        f"summary made {html.escape(str(attrs.get('created', 'not yet')))}; page written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}; git commit "
        f"<code>{html.escape(str(attrs.get('git_commit', 'unknown'))[:12])}</code>; "
        f"{len(plan_runs) or len(rows)} runs: <b>{ok} ok</b>, {failed} failed or missing, "
        f"{active} in flight.<br>Rebuild: <code>python launch.py sweep.name={html.escape(name)}"
        f" root={html.escape(root)} mode=report</code></p>",
    ]
    if rows:
        from dhm.summary.tables import grid_layout

        parts += ["<h2>Headline</h2>", _table(cols, rows, cells, settings, headline, states)]
        grid, base, axes = grid_layout(settings, rows)
        if axes:
            metrics = [
                m for m in headline if m.startswith(("accuracy", "ece", "auroc", "fgsm", "pgd"))
            ]
            parts.append("<h2>Over the grid</h2>")
            parts += [_heatmap(m, grid, base, axes, states) for m in metrics]
    else:
        parts.append("<p>No summary yet: the runs below are still training or evaluating.</p>")
    parts.append(_in_flight(plan_runs, states))
    data = []
    for i, rid in enumerate(curves["run_id"]):
        d = _run_data(i, rid, curves, rows[i])
        if i < max_image_runs:
            d["images"] = _images(sweep_dir, rid, rows[i].get("dataset"))
        data.append(d)
    if data:
        more = len(data) > max_image_runs
        parts.append(
            "<h2>Per run</h2><p>Open a run to draw its figures"
            + (f" (image grids for the first {max_image_runs} runs)" if more else "")
            + ". <input id=filter placeholder='filter by run id'></p><div id=runs></div>"
            "<p id=pager></p>"
        )
    page = (
        PAGE_TEMPLATE.read_text()
        .replace("%TITLE%", html.escape(f"Sweep {name}"))
        .replace("%BODY%", "".join(parts))
        .replace("%DATA%", json.dumps(data).replace("</", "<\\/"))
        .replace("%PAGE_RUNS%", str(PAGE_RUNS))
    )
    return atomic_write_text(summary / "report.html", page)
