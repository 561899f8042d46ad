"""Launcher: a ``--runs``-run grid (1,000), planned in process and through the command line.

In process: compose, expand (run ids), plan (disk + ledger), arrays, rendered scripts, and the
sbatch calls the grid needs. Reference in the same run for the call count: the thesis
workflow, one hand-written sbatch script per run and stage (train + one eval per set).

Command line (issue 13's target): wall time of ``python launch.py ... mode=dry_run`` and of
``mode=status`` on the stored plan of that grid, against ``python -c "import hydra, omegaconf"``
in the same run (the floor of any Hydra application): target <= 3x. Slurm's commands are
replaced by tests/helpers/fake_slurm.py, so the figure is the launcher's own time, not the
controller's latency.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hpc.cli import compose_config
from hpc.launcher import print_arrays
from hpc.plan import arrays_for, make_plan
from hpc.schema import check_launch
from hpc.sweep import expand, write_plan

REPO = Path(__file__).resolve().parents[1]
FAKES = ("sinfo", "scontrol", "sacctmgr", "sacct", "squeue", "sbatch", "scancel")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _grid(runs: int) -> list[str]:
    betas = ["1e-4", "1e-3", "1e-2", "1e-1", "1", "10", "100", "1e3", "1e4", "1e5"]
    betas = betas[: min(len(betas), runs)]
    seeds = -(-runs // len(betas))  # a seeds x betas grid of at least --runs runs
    return [
        "sweep=demo",
        "sweep.name=bench",
        "sweep.points=[]",
        f"+sweep.axes={{train.seed:[{','.join(map(str, range(seeds)))}],"
        f"model.beta:[{','.join(betas)}]}}",
    ]


def _fake_slurm(folder: Path) -> dict[str, str]:
    for name in FAKES:
        script = folder / name
        script.write_text(
            f"#!{sys.executable}\nimport sys\n"
            f"sys.path.insert(0, {str(REPO / 'tests' / 'helpers')!r})\n"
            f"import fake_slurm\nsys.exit(fake_slurm.main({name!r}))\n"
        )
        script.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{folder}:{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(folder / "sbatch.log"),
    }


def _wall(cmd: list[str], env: dict[str, str], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        samples.append(time.perf_counter() - start)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} ... failed: {out.stderr[-500:]}")
    return sorted(samples)[len(samples) // 2]


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory() as root:
        overrides = ["cluster=slurm", f"root={root}", *_grid(args.runs)]
        cfg, t_compose = _timed(lambda: compose_config(overrides))
        check_launch(cfg)
        runs, t_expand = _timed(lambda: expand(cfg))
        plan, t_plan = _timed(lambda: make_plan(cfg, runs, query_slurm=False))
        specs, t_arrays = _timed(lambda: arrays_for(cfg, plan))
        with contextlib.redirect_stdout(io.StringIO()):
            _, t_render = _timed(lambda: print_arrays(cfg, specs, scripts=True))
        n = len(runs)
        thesis = sum(1 + len(st.roles) for st in plan.states)
        for name, seconds in [
            ("compose config", t_compose),
            ("expand grid (run ids)", t_expand),
            ("plan (disk + ledger)", t_plan),
            ("build arrays", t_arrays),
            ("render sbatch scripts", t_render),
        ]:
            rows.append(
                {
                    "step": name,
                    "seconds": round(seconds, 3),
                    "us_per_run": round(seconds / n * 1e6, 1),
                }
            )
        # The command line, as a user runs it.
        env = _fake_slurm(Path(root))
        repeats = max(1, args.repeats)
        t_hydra = _wall([sys.executable, "-c", "import hydra, omegaconf"], env, repeats)
        launch = [
            sys.executable,
            "launch.py",
            *overrides,
            "cluster.partition=debug",
            "cluster.cpus_per_task=1",
            "cluster.eval_cpus=1",
        ]
        t_dry = _wall([*launch, "mode=dry_run"], env, repeats)
        write_plan(cfg, runs)
        t_status = _wall(
            [sys.executable, "launch.py", "sweep.name=bench", f"root={root}", "mode=status"],
            env,
            repeats,
        )
    for name, seconds in [
        ("python -c 'import hydra, omegaconf' (reference)", t_hydra),
        ("python launch.py ... mode=dry_run", t_dry),
        ("python launch.py sweep.name=bench mode=status", t_status),
    ]:
        rows.append(
            {"step": name, "seconds": round(seconds, 3), "us_per_run": round(seconds / n * 1e6, 1)}
        )
    return {
        "rows": rows,
        "summary": {
            "runs": n,
            "dry_run_total_s": round(t_compose + t_expand + t_plan + t_arrays + t_render, 3),
            "sbatch_calls_ours": len(specs),
            "sbatch_calls_per_stage": {s.stage: 1 for s in specs},
            "tasks_per_stage": {s.stage: len(s.tasks) for s in specs},
            "sbatch_calls_one_script_per_run_and_stage": thesis,
            "ratio_sbatch_calls_reference_over_ours": round(thesis / len(specs), 1),
            "cli_dry_run_over_import_hydra": round(t_dry / t_hydra, 2),
            "cli_status_over_import_hydra": round(t_status / t_hydra, 2),
        },
    }
