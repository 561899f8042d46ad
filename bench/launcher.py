"""Launcher: planning and dry-run of a 1,000-run grid (``--runs``), and its sbatch calls.

Reference in the same run: the thesis workflow, one hand-written sbatch script per run and stage
(train + one eval per set), so its sbatch count is runs x (1 + sets). Ours is constant: one
train array, one eval array per set, one aggregate job.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from typing import Any

from hpc.launcher import arrays_for, compose_config, make_plan, print_arrays
from hpc.slurm import check_cluster
from hpc.sweep import expand


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    betas = ["1e-4", "1e-3", "1e-2", "1e-1", "1", "10", "100", "1e3", "1e4", "1e5"]
    betas = betas[: min(len(betas), args.runs)]
    seeds = -(-args.runs // len(betas))  # a seeds x betas grid of at least --runs runs
    rows = []
    with tempfile.TemporaryDirectory() as root:
        overrides = [
            "cluster=slurm", "sweep=demo", "sweep.name=bench", f"root={root}",
            "sweep.points=[]",
            f"+sweep.axes={{train.seed:[{','.join(map(str, range(seeds)))}],"
            f"model.beta:[{','.join(betas)}]}}",
        ]  # fmt: skip
        cfg, t_compose = _timed(lambda: compose_config(overrides))
        check_cluster(cfg, query_slurm=False)
        runs, t_expand = _timed(lambda: expand(cfg))
        plan, t_plan = _timed(lambda: make_plan(cfg, runs, query_slurm=False))
        specs, t_arrays = _timed(lambda: arrays_for(cfg, plan))
        with contextlib.redirect_stdout(io.StringIO()):
            _, t_render = _timed(lambda: print_arrays(cfg, specs, scripts=True))
    n = len(runs)
    ours = len(specs)
    # One script per run for training plus one per run and evaluated set.
    thesis = sum(1 + len(st.roles) for st in plan.states)
    for name, seconds in [("compose config", t_compose), ("expand grid (run ids)", t_expand),
                          ("plan (disk + ledger)", t_plan), ("build arrays", t_arrays),
                          ("render sbatch scripts", t_render)]:  # fmt: skip
        rows.append({"step": name, "seconds": round(seconds, 3),
                     "us_per_run": round(seconds / n * 1e6, 1)})  # fmt: skip
    total = t_compose + t_expand + t_plan + t_arrays + t_render
    return {
        "rows": rows,
        "summary": {
            "runs": n,
            "dry_run_total_s": round(total, 3),
            "sbatch_calls_ours": ours,
            "sbatch_calls_per_stage": {s.stage: 1 for s in specs},
            "tasks_per_stage": {s.stage: len(s.tasks) for s in specs},
            "sbatch_calls_one_script_per_run_and_stage": thesis,
            "ratio_sbatch_calls_reference_over_ours": round(thesis / ours, 1),
        },
    }
