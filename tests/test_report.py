"""The sweep report: built from the real demo pipeline, opened in a real (headless) browser.

`make test` installs Debian's chromium as root. Without it these tests skip and say why,
except in CI (CI=true), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.browser import Browser, chromium

pytestmark = pytest.mark.browser


def _need_browser() -> None:
    if chromium() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (make test installs it as root)")
        pytest.skip("chromium is not installed (make test installs it as root)")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo pipeline through the command line, one run made to fail (a NaN at step 2)."""
    from hpc.cli import cli

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
    return sweep, plan, failed


def test_the_report_is_self_contained_and_names_every_run_and_metric(demo):
    sweep, plan, failed = demo
    page = (sweep / "summary" / "report.html").read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<link" not in page
    for run in plan["runs"]:
        assert run["run_id"] in page
    headline = json.loads(__import__("h5py").File(sweep / "summary/results.h5").attrs["headline"])
    assert {"accuracy", "ece", "auroc_digits_heldout_elbo", "auroc_digits_ood_msp"} <= set(headline)


def _open(sweep: Path) -> Browser:
    b = Browser()
    b.open((sweep / "summary" / "report.html").as_uri())
    # Open every run's section, so its figures and images are drawn.
    b.evaluate(
        "document.querySelectorAll('details.run').forEach(d => { d.open = true; "
        "d.dispatchEvent(new Event('toggle')); }); true"
    )
    b.evaluate("new Promise(r => setTimeout(r, 300))")
    return b


def test_the_report_renders_in_a_browser_without_errors(demo, tmp_path):
    _need_browser()
    from dhm.summary.tables import column_meta

    sweep, plan, failed = demo
    with _open(sweep) as b:
        assert b.errors() == []
        text = b.evaluate("document.body.innerText")
        for run in plan["runs"]:
            assert run["run_id"] in text
        headline = json.loads(
            __import__("h5py").File(sweep / "summary/results.h5").attrs["headline"]
        )
        for metric in headline:
            assert column_meta(metric)[0] in text, metric
        images = b.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert len(images) >= 6 and all(done and width > 0 for done, width in images)
        assert b.evaluate("document.querySelectorAll('details.run svg').length") >= 6
        # The failed run: its row says why, and its heatmap cell is masked, not absent.
        row = b.evaluate(
            f"Array.from(document.querySelectorAll('tr.failure')).map(r => "
            f"r.innerText).find(t => t.includes('{failed}'))"
        )
        assert row and "non-finite loss at step 2" in row
        masked = b.evaluate(
            "Array.from(document.querySelectorAll('table.hm td.masked')).map(td => td.title)"
        )
        assert any(failed in title for title in masked)
        b.screenshot(tmp_path / "report.png")
    shot = tmp_path / "report.png"
    assert shot.stat().st_size > 10_000
    (sweep / "screenshot-path").write_text(str(shot))


def test_the_screenshot_is_not_blank(demo):
    _need_browser()
    from PIL import Image

    sweep, _, _ = demo
    marker = sweep / "screenshot-path"
    if not marker.exists():
        pytest.fail("the browser test did not save its screenshot")
    image = np.asarray(Image.open(marker.read_text()).convert("RGB")).astype(np.float64)
    assert image.shape[0] > 500 and image.shape[1] > 500
    not_white = (image < 245).any(axis=2).mean()
    assert not_white > 0.05, not_white  # text, tables, heatmaps and figures: not an empty page
    assert image.std() > 20
    colourful = (image.max(axis=2) - image.min(axis=2) > 60).mean()
    assert colourful > 0.005  # the viridis heatmaps and the chart lines


def test_status_refreshes_the_report_without_recomputing(demo, capsys):
    from hpc.cli import cli

    sweep, plan, failed = demo
    report = sweep / "summary" / "report.html"
    results = (sweep / "summary" / "results.csv").stat().st_mtime_ns
    assert cli(["sweep.name=demo", f"root={sweep.parent}", "mode=status"]) == 0
    out = capsys.readouterr().out
    assert f"report: {report}" in out and failed in out
    assert (sweep / "summary" / "results.csv").stat().st_mtime_ns == results
    assert "Runs now" in report.read_text()


def test_a_large_sweeps_page_is_paginated_and_its_images_capped(tmp_path):
    # 60 runs: every heatmap cell and table row is there, the per-run figures come 25 to a
    # page and are drawn when opened, and image grids are embedded for the first runs only.
    from dhm.report.page import PAGE_RUNS
    from dhm.summary.aggregate import aggregate
    from tests.test_aggregate import write_plan, write_run

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
    if chromium() is None:
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
