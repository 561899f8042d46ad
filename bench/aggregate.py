"""Aggregation of many runs' shard files against plain h5py reading the same datasets.

Writes a synthetic sweep (digits-sized sets: 360 in-distribution images with logits, -ELBO,
-IWAE and a 10-epsilon FGSM grid, 360 OOD images) of ``--runs`` runs (1,000; 200 with --quick),
then times (reference) opening every shard with h5py and reading every dataset, and (ours)
dhm.summary.aggregate.aggregate without plots, report or TensorBoard files (metrics, seed cells and
a
bootstrap interval for every headline metric of every run: the worst case, one seed each);
then the report built from that summary (``dhm.report.page.write_report``), and everything together.
Targets: the aggregation <= 2x the reference; the report <= 2x the aggregation it reads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dhm.core.config import run_config, to_yaml
from dhm.evaluation import results
from dhm.report.page import write_report
from dhm.summary.aggregate import aggregate

N_ID, N_OOD, EPS = 360, 360, np.linspace(0, 0.08, 9).tolist() + [8 / 255]


def _write_sweep(sweep: Path, n_runs: int) -> None:
    rng = np.random.default_rng(0)
    plan = {"sweep": "bench", "swept_keys": ["model.beta"], "runs": []}
    labels = rng.integers(0, 10, N_ID)
    for i in range(n_runs):
        rid = f"run{i:05d}"
        beta = float(10.0 ** (i % 10 - 4))
        plan["runs"].append({"run_id": rid, "overrides": {"model.beta": beta}})
        cfg = run_config(**{"run_dir": str(sweep / "runs" / rid), "model.beta": beta,
                            "eval.ood_sets": ["digits_ood"]})  # fmt: skip
        (sweep / "runs" / rid).mkdir(parents=True)
        (sweep / "runs" / rid / "config.yaml").write_text(to_yaml(cfg))
        common = {"run_id": rid, "model": "dhm", "config_yaml": to_yaml(cfg), "num_dims": 3072}
        sets = (("digits", "id", N_ID), ("digits-val", "val", N_ID), ("digits_ood", "ood", N_OOD))
        for name, role, n in sets:  # every set a DHM run's config evaluates
            arrays = {
                "indices": np.arange(n),
                "logits": rng.normal(size=(n, 10)).astype(np.float32),
                "neg_elbo": rng.normal(3000, 100, n).astype(np.float32),
                "neg_iwae_k10": rng.normal(2990, 100, n).astype(np.float32),
            }
            if role in ("id", "val"):
                arrays["labels"] = labels
            if role == "id":
                arrays["fgsm/eps"] = np.asarray(EPS, np.float32)
                arrays["fgsm/pred"] = rng.integers(0, 10, (len(EPS), n)).astype(np.int16)
            attrs = {**common, "role": role, "set_size": n, "start": 0, "stop": n}
            path = sweep / "runs" / rid / "eval" / results.shard_name(name, 0, n)
            results.write_shard(path, name, arrays, attrs)
    (sweep / "plan.json").write_text(json.dumps(plan))


def _read_all(sweep: Path) -> int:
    """Open every shard, read all its attributes and every dataset; return the dataset count."""
    arrays: list = []

    def read(_: str, obj: object) -> None:  # must return None, or visititems stops early
        if isinstance(obj, h5py.Dataset):
            arrays.append(obj[()])

    for path in sorted(sweep.glob("runs/*/eval/*.h5")):
        with h5py.File(path, "r") as f:
            dict(f.attrs)
            f.visititems(read)
    return len(arrays)


def run(args: argparse.Namespace) -> dict[str, Any]:
    n_runs = args.runs
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "bench"
        _write_sweep(sweep, n_runs)
        _read_all(sweep)  # warm the page cache for both contenders
        timings: dict[str, list[float]] = {
            "h5py read (ref)": [],
            "aggregate": [],
            "report.html": [],
        }
        for _ in range(2 if args.quick else 3):
            start = time.perf_counter()
            _read_all(sweep)
            timings["h5py read (ref)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            aggregate(sweep, plots=False, report=False, tensorboard=False)
            timings["aggregate"].append(time.perf_counter() - start)
            start = time.perf_counter()
            write_report(sweep)
            timings["report.html"].append(time.perf_counter() - start)
        page_mb = (sweep / "summary" / "report.html").stat().st_size / 2**20
        start = time.perf_counter()
        aggregate(sweep, plots=True)
        everything = time.perf_counter() - start
    ref, ours = np.median(timings["h5py read (ref)"]), np.median(timings["aggregate"])
    page = np.median(timings["report.html"])
    rows = [{"contender": k, "seconds": round(float(np.median(v)), 3)} for k, v in timings.items()]
    rows.append(
        {"contender": "aggregate + plots + report + tensorboard", "seconds": round(everything, 3)}
    )
    return {
        "rows": rows,
        "summary": {
            "runs": n_runs,
            "ratio_aggregate_over_h5py_read": round(float(ours / ref), 2),
            "ratio_report_over_aggregate": round(float(page / ours), 2),
            "report_mb": round(page_mb, 2),
            "target": "aggregate <= 2x read; report <= 2x aggregate",
            "meets_target": bool(ours / ref <= 2.0 and page / ours <= 2.0),
        },
    }
