"""The sweep report: built from the real demo pipeline and from synthetic sweeps, opened in a real
(headless) browser.

`make test` installs Debian's chromium as root. Without it the browser tests skip and say why,
except in CI (CI=true), where a missing browser is a failure.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from dhm.report.data import _value, report_data
from dhm.report.page import DATA_NAME, PAGE_RUNS, write_report
from dhm.summary.aggregate import aggregate
from dhm.summary.tables import write_h5
from hpc.cli import cli
from tests.helpers.browser import Browser, chromium
from tests.helpers.sweeps import (
    GRID,
    VARIANT_SWEEP,
    add_images,
    make_arrays,
    write_plan,
    write_run,
)

ROOT = Path(__file__).resolve().parents[1]
XSS = "<script>alert(1)</script>"
BREAKOUT = "</td><b>x"


def _need_browser() -> None:
    if chromium() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (make test installs it as root)")
        pytest.skip("chromium is not installed (make test installs it as root)")


@dataclass
class Demo:
    sweep: Path
    plan: dict[str, Any]
    failed: str  # the run made to fail
    page: str  # report.html as the aggregation wrote it (later tests may rewrite the file)
    headline: list[str]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    """The demo pipeline through the command line, one run made to fail (a NaN at step 2)."""
    root = tmp_path_factory.mktemp("report")
    args = [
        "sweep=demo",
        f"root={root}",
        "train.epochs=1",
        "train.progress=false",
        "eval.max_images=100",
        "eval.pgd_steps=2",
        "eval.fgsm_eps=[0.0,0.03137254901960784]",
        "sweep.points=[{model.name:resnet,model.alpha:1.0,model.beta:0.0},"
        "{model.name:vae,model.alpha:0.0,model.beta:1.0},"
        "{model.beta:0.5,train.debug_nan_at_step:2}]",
    ]
    assert cli(args) == 1  # the failed run makes the launch exit non-zero; the rest is summarised
    sweep = root / "demo"
    plan = json.loads((sweep / "plan.json").read_text())
    failed = next(r["run_id"] for r in plan["runs"] if r["overrides"].get("model.beta") == 0.5)
    page = (sweep / "summary" / "report.html").read_text()
    with h5py.File(sweep / "summary" / "results.h5") as f:
        headline = json.loads(f.attrs["headline"])
    return Demo(sweep, plan, failed, page, headline)


# Run in the page with every run's section open: what is clipped, overlaps or does not load.
CLIPPED = """(() => {
  const inside = (r, box) => r.left >= box.left - 0.5 && r.right <= box.right + 0.5 &&
    r.top >= box.top - 0.5 && r.bottom <= box.bottom + 0.5;
  const meet = (a, b) =>
    a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  const out = {svgs: 0, outside: [], overlap: [], partial: [], yticks: [], cells: [], images: []};
  document.querySelectorAll("details.run svg").forEach(svg => {
    out.svgs++;
    const box = svg.getBoundingClientRect();
    svg.querySelectorAll("text").forEach(t => {
      if (!inside(t.getBoundingClientRect(), box)) out.outside.push(t.textContent); });
    ["xtick", "ytick", "legend"].forEach(cls => {
      const ts = Array.from(svg.querySelectorAll("text." + cls));
      ts.forEach((a, i) => ts.slice(i + 1).forEach(b => {
        if (meet(a.getBoundingClientRect(), b.getBoundingClientRect()))
          out.overlap.push([a.textContent, b.textContent]); })); });
    svg.querySelectorAll("text.xtick:not(.cat), text.ytick").forEach(t => {
      if (!/^-?\\d+(\\.\\d+)?(e-?\\d+)?$/.test(t.textContent)) out.partial.push(t.textContent); });
    svg.querySelectorAll("text.ytick").forEach(t => out.yticks.push(t.textContent));
  });
  document.querySelectorAll("th, td").forEach(c => {
    if (c.scrollWidth > c.clientWidth + 1 || c.scrollHeight > c.clientHeight + 1)
      out.cells.push(c.textContent); });
  out.images = Array.from(document.images).map(i => [i.complete, i.naturalWidth]);
  out.na = Array.from(document.querySelectorAll("td.na")).map(td => [td.textContent, td.title]);
  out.masked = Array.from(document.querySelectorAll("#headline td.masked")).map(
    td => td.parentElement.cells[0].textContent);
  out.heat_masked = Array.from(document.querySelectorAll("table.hm td.masked")).map(td => td.title);
  return out;
})()"""


@dataclass
class Rendered:
    """What a headless browser saw of the demo's report, every run's section opened."""

    errors: list[str]
    text: str
    images: list[list]  # [complete, naturalWidth] of every image
    figures: int  # SVG charts drawn in the runs' sections
    failure_rows: list[str]
    masked_titles: list[str]
    clipped: dict[str, Any]  # what CLIPPED found
    screenshot: Path


@pytest.fixture(scope="module")
def rendered(demo: Demo, tmp_path_factory) -> Rendered:
    _need_browser()
    folder = tmp_path_factory.mktemp("rendered")
    page = folder / "report.html"
    page.write_text(demo.page)  # self-contained: the page alone, as the aggregation wrote it
    with Browser() as b:
        b.open(page.as_uri())
        # Open every run's section, so its figures and images are drawn.
        b.evaluate(
            "document.querySelectorAll('details.run').forEach(d => { d.open = true; "
            "d.dispatchEvent(new Event('toggle')); }); true"
        )
        b.evaluate("new Promise(r => setTimeout(r, 300))")
        return Rendered(
            errors=b.errors(),
            text=b.evaluate("document.body.innerText"),
            images=b.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])"),
            figures=b.evaluate("document.querySelectorAll('details.run svg').length"),
            failure_rows=b.evaluate(
                "Array.from(document.querySelectorAll('tr.failure')).map(r => r.innerText)"
            ),
            masked_titles=b.evaluate(
                "Array.from(document.querySelectorAll('table.hm td.masked')).map(td => td.title)"
            ),
            clipped=b.evaluate(CLIPPED),
            screenshot=b.screenshot(folder / "report.png"),
        )


@pytest.mark.slow
def test_the_report_is_self_contained_and_names_every_run_and_metric(demo):
    page = demo.page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<link" not in page
    for run in demo.plan["runs"]:
        assert run["run_id"] in page
    assert {"accuracy", "ece", "auroc_digits_heldout_elbo", "auroc_digits_ood_msp"} <= set(
        demo.headline
    )


@pytest.mark.slow
@pytest.mark.browser
def test_the_report_renders_in_a_browser_without_errors(demo, rendered):
    from dhm.summary.tables import column_meta

    assert rendered.errors == []
    for run in demo.plan["runs"]:
        assert run["run_id"] in rendered.text
    for metric in demo.headline:
        assert column_meta(metric)[0] in rendered.text, metric
    images = rendered.images
    assert len(images) >= 6 and all(done and width > 0 for done, width in images)
    assert rendered.figures >= 6
    # The failed run: its row says why, and its heatmap cell is masked, not absent.
    row = next((t for t in rendered.failure_rows if demo.failed in t), None)
    assert row and "non-finite loss at step 2" in row
    assert any(demo.failed in title for title in rendered.masked_titles)
    # Real -ELBO densities (about 1e-4 per nat): every chart label whole and inside its chart.
    seen = rendered.clipped
    assert seen["outside"] == [] and seen["overlap"] == [] and seen["partial"] == []
    assert seen["cells"] == []
    assert {title for _, title in seen["na"]} == {
        "does not apply to model=vae",
        "does not apply to model=resnet",
    }
    assert set(seen["masked"]) <= {demo.failed}


@pytest.mark.slow
@pytest.mark.browser
def test_the_screenshot_is_not_blank(rendered):
    assert rendered.screenshot.stat().st_size > 10_000
    image = np.asarray(Image.open(rendered.screenshot).convert("RGB")).astype(np.float64)
    assert image.shape[0] > 500 and image.shape[1] > 500
    not_white = (image < 245).any(axis=2).mean()
    assert not_white > 0.05, not_white  # text, tables, heatmaps and figures: not an empty page
    assert image.std() > 20
    colourful = (image.max(axis=2) - image.min(axis=2) > 60).mean()
    assert colourful > 0.005  # the viridis heatmaps and the chart lines


@pytest.mark.slow
def test_status_refreshes_the_report_without_recomputing(demo, capsys):
    report = demo.sweep / "summary" / "report.html"
    results = (demo.sweep / "summary" / "results.csv").stat().st_mtime_ns
    assert cli(["sweep.name=demo", f"root={demo.sweep.parent}", "mode=status"]) == 0
    out = capsys.readouterr().out
    assert f"report: {report}" in out and demo.failed in out
    assert (demo.sweep / "summary" / "results.csv").stat().st_mtime_ns == results
    assert "Runs now" in report.read_text()


FAILED = ("failed01", "dhm", 1.0, 1.0)  # planned, never evaluated: a missing run


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A synthetic sweep with a complete summary: GRID's four runs (image grids in the first
    two) and FAILED, whose reason is the exception text of its (pretend) training task."""
    sweep = tmp_path_factory.mktemp("small")
    for i, r in enumerate(GRID):
        sets = make_arrays(i, r[1])
        write_run(sweep, *r[:4], seed=i, sets=add_images(sets, i) if i < 2 else sets)
    write_plan(sweep, [*GRID, FAILED])
    aggregate(
        sweep,
        plots=False,
        tensorboard=False,
        allow_partial=True,
        reasons={FAILED[0]: f"ValueError: {XSS}"},
    )
    return sweep


def test_reasons_and_log_tails_are_escaped(small, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(small, sweep)
    states = {
        FAILED[0]: {
            "stage": "train",
            "slurm": "FAILED",
            "reason": BREAKOUT,
            "log_tail": ["Traceback (most recent call last):", XSS, BREAKOUT],
        }
    }
    page = write_report(sweep, states=states).read_text()
    assert page.count("<script>") == 1  # the page's own
    assert "<script>alert" not in page and BREAKOUT not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the reason: row, heatmap, log tail
    assert "&lt;/td&gt;&lt;b&gt;x" in page  # the launcher's reason and the log tail
    assert "<pre>Traceback (most recent call last):\n&lt;script&gt;" in page
    if chromium() is None:
        return
    with Browser() as b:
        b.open((sweep / "summary" / "report.html").as_uri())
        assert b.errors() == []
        row = b.evaluate("document.querySelector('tr.failure').innerText")
        assert XSS in row and FAILED[0] in row
        assert b.evaluate("document.querySelector('tr.failure pre').textContent").endswith(BREAKOUT)


def test_write_report_imports_neither_h5py_nor_numpy(small, tmp_path):
    # mode=status rewrites the page: the summary's data is JSON, read without h5py or numpy.
    sweep = tmp_path / "sweep"
    shutil.copytree(small, sweep)
    (sweep / "summary" / "report.html").unlink()
    heavy = ("h5py", "numpy", "torch", "matplotlib", "PIL", "pandas")
    code = (
        "import json, sys\n"
        "from dhm.report.page import write_report\n"
        f"write_report({str(sweep)!r}, states={{'failed01': {{'stage': 'train'}}}})\n"
        f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    page = (sweep / "summary" / "report.html").read_text()
    assert "<table id=headline" in page and "<h2>Over the grid</h2>" in page
    assert "Runs now" in page and page.count("data:image/png;base64,") == 6
    for run in (*GRID, FAILED):
        assert run[0] in page


@pytest.mark.parametrize("data", ["absent", "other format"])
def test_a_summary_without_its_report_data_asks_to_aggregate_again(small, tmp_path, data):
    # A summary written before report_data.json existed: the runs' states are still shown.
    sweep = tmp_path / "sweep"
    shutil.copytree(small, sweep)
    path = sweep / "summary" / DATA_NAME
    if data == "absent":
        path.unlink()
    else:
        path.write_text(json.dumps({"format": 0}))
    page = write_report(sweep, states={FAILED[0]: {"stage": "train", "slurm": "FAILED"}})
    text = page.read_text()
    assert "python launch.py sweep.name=test" in text and "mode=aggregate</code>" in text
    assert "Runs now" in text and "<table id=headline" not in text
    assert "No summary yet" not in text


def test_a_sweep_without_a_summary_shows_its_runs_in_flight(tmp_path):
    write_plan(tmp_path, GRID)
    page = write_report(tmp_path, states={"dhm0001": {"stage": "train", "step": "1/3"}})
    text = page.read_text()
    assert "No summary yet" in text and "Runs now" in text and "1/3" in text
    assert page == tmp_path / "summary" / "report.html"


@pytest.mark.browser
def test_a_large_sweeps_page_is_paginated_and_its_images_capped(tmp_path):
    # 60 runs: every heatmap cell and table row is there, the per-run figures come 25 to a
    # page and are drawn when opened, and image grids are embedded for the first runs only.
    runs = [
        (f"r{i:07d}", "dhm", a, b)
        for i, (a, b) in enumerate(
            (a, b) for a in (0.5, 1.0, 2.0) for b in np.logspace(-4, 1, 20).round(8).tolist()
        )
    ]
    for i, r in enumerate(runs):
        write_run(tmp_path, *r, seed=i)
    write_plan(tmp_path, runs)
    aggregate(tmp_path, plots=False, tensorboard=False, allow_partial=True)
    page = (tmp_path / "summary" / "report.html").read_text()
    data = json.loads(page.split("const RUNS = ", 1)[1].split(";\nconst PAGE", 1)[0])
    assert len(data) == 60 and PAGE_RUNS == 25
    assert all("images" in r for r in data[:48]) and not any("images" in r for r in data[48:])
    assert all(r["id"] in page for r in data)
    heat = page.count('<td style="background:')
    assert heat >= 60  # every grid point in every heatmap (3 x 20 cells each)
    _need_browser()
    with Browser() as b:
        b.open((tmp_path / "summary" / "report.html").as_uri())
        assert b.errors() == []
        assert b.evaluate("document.querySelectorAll('details.run').length") == PAGE_RUNS
        assert b.evaluate("document.querySelectorAll('#pager button').length") == 3
        # Only the opened run's figures exist until another is opened.
        assert b.evaluate("document.querySelectorAll('details.run svg').length") > 0
        assert b.evaluate("document.querySelectorAll('details.run[open]').length") == 1
        b.evaluate("document.querySelectorAll('#pager button')[2].click(); true")
        assert b.evaluate("document.querySelectorAll('details.run').length") == 60 - 2 * PAGE_RUNS


def test_report_data_has_an_elbo_panel_per_ood_set_and_marks_what_does_not_apply(small, tmp_path):

    data = json.loads((small / "summary" / DATA_NAME).read_text())
    runs = {r["id"]: r for r in data["runs"]}
    for rid in ("dhm0001", "vae00000"):
        (panel,) = runs[rid]["hists"]  # one OOD set: one panel, the ID set and it alone
        assert panel["ood"] == "digits_ood" and len(panel["edges"]) == 51
        assert {k: sum(v) for k, v in panel["sets"].items()} == {"digits": 120, "digits_ood": 90}
        assert list(runs[rid]["bits"]) == ["digits", "digits_ood"]  # [model, PNG] per set
    assert "hists" not in runs["resnet00"] and "bits" not in runs["resnet00"]
    groups = {g["ids"][0]: g["values"] for g in data["groups"]}
    headline = [h["col"] for h in data["headline"]]
    values = dict(zip(headline, groups["vae00000"], strict=True))
    assert values["accuracy"] == {"na": "vae"} and "value" in values["auroc_digits_ood_elbo"]
    values = dict(zip(headline, groups["resnet00"], strict=True))
    assert values["auroc_digits_ood_elbo"] == {"na": "resnet"} and "value" in values["accuracy"]
    assert groups["failed01"][0] is None  # failed: no value, not "does not apply"
    # A results.h5 written before the per-OOD-set panels: the shared grid, every set on it.
    sweep = tmp_path / "sweep"
    shutil.copytree(small, sweep)
    with h5py.File(sweep / "summary" / "results.h5", "r+") as f:
        del f["runs/elbo_hist/by_ood"]
    old = {r["id"]: r for r in report_data(sweep, sweep / "summary")["runs"]}
    (panel,) = old["dhm0001"]["hists"]
    assert panel["ood"] is None and set(panel["sets"]) == {"digits", "digits_ood"}


@pytest.fixture(scope="module")
def far(tmp_path_factory) -> Path:
    """GRID's runs with -ELBO as the demo's hybrid gives it (ID around 2,700 nats, some below
    zero; the OOD set spread over 5,000-70,000 nats, so densities are near 1e-4 per nat), image
    grids in every run, and FAILED."""
    sweep = tmp_path_factory.mktemp("far")
    for i, r in enumerate(GRID):
        sets = add_images(make_arrays(i, r[1]), i)
        rng = np.random.default_rng(i)
        for name, values in (("digits", rng.normal(2700, 1500, 120)), ("digits_ood", None)):
            a = sets[name]
            if "neg_elbo" not in a:
                continue
            n = len(a["indices"])
            a["neg_elbo"] = (rng.uniform(5e3, 7e4, n) if values is None else values).astype(
                np.float32
            )
            a["neg_iwae_k4"] = a["neg_elbo"] - rng.uniform(0, 5, n).astype(np.float32)
        write_run(sweep, *r[:4], seed=i, sets=sets)
    write_plan(sweep, [*GRID, FAILED])
    aggregate(sweep, plots=False, tensorboard=False, allow_partial=True, bootstrap=100)
    return sweep


@pytest.mark.browser
def test_charts_and_table_cells_are_not_clipped_and_na_is_not_a_failure(far):
    _need_browser()
    with Browser() as b:
        b.open((far / "summary" / "report.html").as_uri())
        b.evaluate(
            "document.querySelectorAll('details.run').forEach(d => { d.open = true; "
            "d.dispatchEvent(new Event('toggle')); }); true"
        )
        seen = b.evaluate(CLIPPED)
        errors = b.errors()
    assert errors == []
    # attacks, reliability and counts for 3 runs with a classifier; -ELBO panel and bits/dim for
    # the 3 with a likelihood
    assert seen["svgs"] == 3 * 3 + 3 * 2
    assert seen["outside"] == [] and seen["overlap"] == []
    assert seen["partial"] == []  # no tick label cut to "0000764"
    assert any("e-" in t for t in seen["yticks"])  # densities near 1e-4 per nat, as exponents
    assert seen["cells"] == []
    assert len(seen["images"]) == 3 * 4 and all(done and w > 0 for done, w in seen["images"])
    titles = {title for text, title in seen["na"] if text == "n/a"}
    assert titles == {"does not apply to model=vae", "does not apply to model=resnet"}
    assert all(text == "n/a" for text, _ in seen["na"])
    assert set(seen["masked"]) == {FAILED[0]}  # red cells: the failed run's only
    assert seen["heat_masked"] and all(t.startswith(FAILED[0]) for t in seen["heat_masked"])


def test_headline_cells_carry_wilson_t_and_zero_width_intervals():
    # One run: the interval aggregation stored (Wilson or bootstrap), flagged when it has zero
    # width (the page marks those cells with a ‡); several seeds: the Student-t interval of
    # the mean, against scipy's.

    perfect = {"auroc_x_elbo": 1.0, "auroc_x_elbo_ci_lo": 1.0, "auroc_x_elbo_ci_hi": 1.0}
    v = _value([perfect], "auroc_x_elbo", "vae")
    assert v == {"value": 1.0, "lo": 1.0, "hi": 1.0, "zero": True}
    pgd = {"pgd_acc_eps0.0314": 0.0, "pgd_acc_eps0.0314_ci_lo": 0.0}
    pgd["pgd_acc_eps0.0314_ci_hi"] = 0.0133
    assert _value([pgd], "pgd_acc_eps0.0314", "dhm")["zero"] is False
    seeds = [{"accuracy": a} for a in (0.90, 0.91, 0.93)]
    v = _value(seeds, "accuracy", "dhm")
    sem = stats.sem([0.90, 0.91, 0.93])
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean([0.90, 0.91, 0.93]), scale=sem)
    assert (v["lo"], v["hi"]) == pytest.approx((lo, hi), rel=1e-12) and not v["zero"]


SNAP_A, SNAP_B = "c0de0000000a", "c0de0000000b"


def test_the_report_names_code_snapshots_and_flags_what_mixes_them(tmp_path):
    # GRID's runs under two snapshots; the vae's ID set evaluated again under the second.
    for i, r in enumerate(GRID):
        write_run(tmp_path, *r[:4], seed=i)
    codes = {"dhm0001": SNAP_A, "dhm0010": SNAP_B, "resnet00": SNAP_A, "vae00000": SNAP_A}
    for rid, code in codes.items():
        for path in (tmp_path / "runs" / rid / "eval").glob("*.h5"):
            with h5py.File(path, "r+") as f:
                f.attrs["code"] = (
                    SNAP_B if rid == "vae00000" and path.name.startswith("digits__") else code
                )
    write_plan(tmp_path, [*GRID, FAILED])
    aggregate(tmp_path, plots=False, tensorboard=False, allow_partial=True, bootstrap=0)
    data = json.loads((tmp_path / "summary" / DATA_NAME).read_text())
    groups = {g["ids"][0]: g for g in data["groups"]}
    assert groups["dhm0010"]["code"] == SNAP_B and not groups["dhm0010"]["mixed"]
    assert groups["vae00000"]["code"] == f"{SNAP_A}+{SNAP_B}" and groups["vae00000"]["mixed"]
    assert groups[FAILED[0]]["code"] == ""  # no shard: not known
    assert {r["id"]: r["code"] for r in data["runs"]}["resnet00"] == SNAP_A
    page = (tmp_path / "summary" / "report.html").read_text()
    assert "<th data-col=6>code</th>" in page  # runs, status, model, alpha, beta, dataset
    assert f"<td class=code>{SNAP_B}</td>" in page
    assert f"<td class=code>{SNAP_A}+{SNAP_B}<span class=mixed" in page
    assert f"different code snapshots: {SNAP_A}, {SNAP_B} (ids of" in page  # under the table
    note = f"runs of this figure ran 2 code snapshots: {SNAP_A}, {SNAP_B}"
    assert page.count(note) == len(data["heatmaps"]) > 0  # every heatmap mixes A and B
    if chromium() is None:
        return
    with Browser() as b:
        b.open((tmp_path / "summary" / "report.html").as_uri())
        assert b.errors() == []
        first = b.evaluate("document.querySelector('details.run summary').textContent")
        assert first == f"dhm0001 (code {SNAP_A})"
        shown = b.evaluate(
            "document.querySelector('.heat .codenote').getBoundingClientRect().height"
        )
        assert shown > 0


def test_a_sweep_run_outside_snapshots_shows_no_code(small):
    page = (small / "summary" / "report.html").read_text()
    assert ">code</th>" not in page and "code snapshots" not in page
    assert "class=mixed" not in page
    data = json.loads((small / "summary" / DATA_NAME).read_text())
    assert {r["id"]: r["code"] for r in data["runs"]}["dhm0001"] == "none"
    assert not any(g["mixed"] for g in data["groups"])


# (variant, checkpoint, eval.pgd_steps) of each view, the primary first as aggregate writes them
VIEWS = [("default", "final", 1.0), ("pgd3", "2", 3.0), ("pgd3", "final", 3.0)]


def test_report_data_shows_the_primary_view_and_every_view_side_by_side(small, tmp_path):
    # Two runs under three views: a row and a seed cell per run and view. The headline table,
    # heatmaps and per-run figures show the primary view alone (never variant, checkpoint or
    # eval.* as a setting or a heatmap axis); variants holds every view's values, and pgd3's
    # curves over epochs put final at the run's train.epochs (a: 5), else after the largest
    # epoch (b, whose plan does not say: 3). Run b failed at epoch 2: no values there.
    accuracy = {"a": [0.9, 0.5, 0.8], "b": [0.7, None, 0.6]}
    cols = ["run_id", "status", "beta", "model", "dataset", "variant", "checkpoint"]
    cols += ["eval.pgd_steps", "code", "accuracy", "ece", "pgd_acc_eps0.0314", "problem"]
    rows, cells = [], []
    for k, (variant, checkpoint, steps) in enumerate(VIEWS):
        for rid, beta in (("a", 0.1), ("b", 1.0)):
            acc = accuracy[rid][k]
            view = {"variant": variant, "checkpoint": checkpoint, "eval.pgd_steps": steps}
            metrics = {"accuracy": acc, "ece": None, "pgd_acc_eps0.0314": None}
            if acc is not None:
                metrics.update(ece=acc / 10, **{"pgd_acc_eps0.0314": acc / steps})
            rows.append(
                {
                    "run_id": rid,
                    "status": "ok" if acc is not None else "missing",
                    **{"beta": beta, "model": "dhm", "dataset": "digits", **view, "code": None},
                    **metrics,
                    "problem": "" if acc is not None else "no eval shards",
                }
            )
            cells.append({"beta": beta, "model": "dhm", **view, "n": int(acc is not None)})
            cells[-1].update(runs=rid, code=None, mixed_code=False)
    eps = np.array([0.0, 8 / 255])
    curves = [
        SimpleNamespace(run_id=r["run_id"], values={}, fgsm=(eps, np.array([r["accuracy"], 0.1])),
                        pgd=None, reliability=None, id_set="digits", hist_edges={}, hists={})
        for r in rows[:2]
    ]  # fmt: skip
    headline = ["accuracy", "ece", "pgd_acc_eps0.0314"]
    (tmp_path / "summary").mkdir()
    write_h5(tmp_path / "summary" / "results.h5", cols, rows, curves, cells,
             {"created": "now", "headline": json.dumps(headline)})  # fmt: skip
    plan = {"runs": [{"run_id": "a", "config": {"train": {"epochs": 5}}}, {"run_id": "b"}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))

    data = report_data(tmp_path, tmp_path / "summary")
    assert data["shown"] == ["beta", "model", "dataset"]
    assert [r["run_id"] for r in data["rows"]] == ["a", "b"]
    assert [g["ids"] for g in data["groups"]] == [["a"], ["b"]]
    assert [g["values"][0]["value"] for g in data["groups"]] == [0.9, 0.7]
    assert [h["axes"] for h in data["heatmaps"]] == [["beta"]] * 3
    assert [c["mean"] for c in data["heatmaps"][0]["rows"][0]["cells"]] == [0.9, 0.7]
    assert [(r["id"], r["fgsm"][1][0]) for r in data["runs"]] == [("a", 0.9), ("b", 0.7)]

    v = data["variants"]
    assert v["views"] == [
        {"key": f"{name} @ {checkpoint}", "variant": name, "checkpoint": checkpoint,
         "settings": {"eval.pgd_steps": steps}}
        for name, checkpoint, steps in VIEWS
    ]  # fmt: skip
    assert [m["col"] for m in v["metrics"]] == headline
    assert v["runs"] == [
        {"run_id": "a", "label": "beta=0.1",
         "values": [[0.9, 0.9 / 10, 0.9], [0.5, 0.5 / 10, 0.5 / 3], [0.8, 0.8 / 10, 0.8 / 3]]},
        {"run_id": "b", "label": "beta=1",
         "values": [[0.7, 0.7 / 10, 0.7], [None, None, None], [0.6, 0.6 / 10, 0.6 / 3]]},
    ]  # fmt: skip
    (pgd3,) = v["curves"]  # default has one checkpoint: no curves
    assert pgd3["variant"] == "pgd3"
    assert [m["col"] for m in pgd3["metrics"]] == ["accuracy", "ece"]  # not the attacks
    assert [(r["run_id"], r["label"], r["points"]) for r in pgd3["metrics"][0]["runs"]] == [
        ("a", "beta=0.1", [[2, 0.5], [5, 0.8]]),
        ("b", "beta=1", [[3, 0.6]]),
    ]
    # A sweep evaluated once: no views to compare.
    assert json.loads((small / "summary" / DATA_NAME).read_text())["variants"] is None


# Picks views a and b in the side-by-side selects (as a reader does: a change event each) and
# reads the table back: per row, its cells' text.
PICK = """((a, b) => {
  [["variant-a", a], ["variant-b", b]].forEach(([id, v]) => { const s = document.getElementById(id);
    s.value = String(v); s.dispatchEvent(new Event("change")); });
  return Array.from(document.querySelectorAll("#side-by-side tbody tr")).map(
    r => Array.from(r.cells).map(c => c.textContent));
})"""


@pytest.mark.slow
@pytest.mark.browser
def test_two_evaluations_side_by_side_in_a_browser(tmp_path):
    # A sweep trained once, then evaluated again (mode=evaluate) with 3-step PGD at epoch 1
    # and final: three views. The page compares any two of them per run, and draws the new
    # variant's metrics over epochs.
    _need_browser()
    assert cli([f"root={tmp_path}", *VARIANT_SWEEP]) == 0
    again = ["sweep.name=var", "mode=evaluate", "eval.pgd_steps=3", "eval.checkpoints=[1,final]"]
    assert cli([f"root={tmp_path}", *again]) == 0
    summary = tmp_path / "var" / "summary"
    with open(summary / "results.csv") as f:
        table = {(r["run_id"], r["variant"], r["checkpoint"]): r for r in csv.DictReader(f)}
    views = list(dict.fromkeys((variant, checkpoint) for _, variant, checkpoint in table))
    assert len(views) == 3 and views[0] == ("default", "final")
    a, b = views[2], views[1]  # the new variant at final, then at epoch 1: other weights
    data = json.loads((summary / DATA_NAME).read_text())
    headline = [m["col"] for m in data["variants"]["metrics"]]
    with Browser() as browser:
        browser.open((summary / "report.html").as_uri())
        picked = browser.evaluate(
            "['a', 'b'].map(k => document.getElementById('variant-' + k).value)"
        )
        shown = browser.evaluate(f"{PICK}(2, 1)")
        charts = browser.evaluate("document.querySelectorAll('#epochs svg').length")
        text = browser.evaluate("document.body.innerText")
        errors = browser.errors()
        shot = browser.screenshot(tmp_path / "report.png")
    assert errors == []
    assert picked == ["0", "1"]  # before picking, A: the primary view, B: the second
    assert "show the primary view, default @ final" in text and "Over epochs" in text
    assert charts == len(data["variants"]["curves"][0]["metrics"]) >= 3  # accuracy, ECE, AUROC

    def value(rid: str, view: tuple[str, str], m: str) -> float | None:
        row = table[(rid, *view)]
        return float(row[m]) if row["status"] == "ok" and row[m] else None

    run_ids = [r["run_id"] for r in data["rows"]]
    assert [row[0] for row in shown] == run_ids and len(run_ids) == 2
    compared = 0
    for rid, row in zip(run_ids, shown, strict=True):
        for k, m in enumerate(headline):
            x, y, diff = row[2 + 3 * k : 5 + 3 * k]
            va, vb = value(rid, a, m), value(rid, b, m)
            if va is None or vb is None:  # the ResNet's likelihood AUROCs
                assert diff == "–" and (x == "–") == (va is None) and (y == "–") == (vb is None)
                continue
            assert (float(x), float(y)) == pytest.approx((va, vb), rel=1e-3)
            assert float(diff) == pytest.approx(vb - va, rel=1e-3, abs=1e-12)
            compared += 1
    assert compared >= 10  # both runs' classifier metrics, the DHM's likelihood AUROCs
    assert any(r[4 + 3 * k] not in ("0", "–") for r in shown for k in range(len(headline)))
    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    assert image.shape[0] > 500 and (image < 245).any(axis=2).mean() > 0.05
    assert image.std() > 20
