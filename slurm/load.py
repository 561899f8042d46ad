"""A load measurement on the local cluster: a sweep of many tiny runs, end to end.

    python slurm/load.py [--runs 300] [--parallelism 4] [--runs-per-task 4] [--root DIR]
                                                                          (as root, cluster up)

Launches ``--runs`` tiny digits runs (one per train.seed) through launch.py with
``cluster.array_parallelism`` and ``cluster.runs_per_task``, waits for every task, and prints
the wall time, the sbatch calls (the ledger), the sacct state of every task, and whether every
shard and every summary row is there. A measurement, not a test: on 2 x 2 CPUs, 300 runs packed
3 a task (``--runs-per-task 3 cluster.mem=3800M cluster.eval_mem=3800M``: Slurm counts ~0.5 GB
of RSS per torch process, so 4 a task exceeded 3,800 MB) took 2,681 s: 41 sbatch calls, 401
tasks COMPLETED, 900 of 900 shards, 300 of 300 summary rows (docs/reliability.md). CI runs
the 30-run version (tests/test_slurm_e2e.py::test_thirty_tiny_runs_*).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slurm.faults import ENV, jobs  # noqa: E402

TINY = [
    "cluster=slurm",
    "cluster.partition=debug",
    "cluster.cpus_per_task=1",
    "cluster.eval_cpus=1",
    "cluster.time=15",
    "cluster.eval_time=15",
    "cluster.aggregate_time=30",
    "train.progress=false",
    "sweep=single",
    "sweep.points=[]",
    "model.width=4",
    "model.latent_dim=4",
    "train.epochs=1",
    "train.batch_size=100",
    "eval.batch_size=50",
    "eval.max_images=100",
    "eval.iwae_k=[1,4]",
    "eval.fgsm_eps=[0.0,0.03]",
    "eval.pgd_steps=0",
    "eval.ood_sets=[digits_ood]",
    "train.val_every_epochs=0",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--parallelism", type=int, default=4)
    p.add_argument("--runs-per-task", type=int, default=4)
    p.add_argument("--root", type=Path)
    p.add_argument("overrides", nargs="*", help="more launch.py overrides (e.g. cluster.mem=3G)")
    args = p.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="dhm-load-"))
    seeds = ",".join(str(s) for s in range(args.runs))
    cmd = [
        sys.executable,
        "launch.py",
        *TINY,
        f"root={root}",
        f"+sweep.axes={{train.seed:[{seeds}]}}",
        f"cluster.array_parallelism={args.parallelism}",
        f"cluster.runs_per_task={args.runs_per_task}",
        *args.overrides,
    ]
    start = time.time()
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stdout[-3000:], out.stderr[-3000:])
        return 1
    launched = time.time() - start
    sweep = root / "single"
    ids = [j["job_id"] for j in jobs(sweep)]
    while subprocess.run(
        ["squeue", "-h", "-j", ",".join(ids)], env=ENV, capture_output=True, text=True
    ).stdout.strip():
        time.sleep(5)
    wall = time.time() - start
    time.sleep(5)
    text = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
        env=ENV,
        capture_output=True,
        text=True,
    ).stdout
    from hpc.ledger import parse_sacct

    states = collections.Counter(v[-1].state for v in parse_sacct(text).values())
    rows = (sweep / "summary" / "results.csv").read_text().splitlines()[1:]
    shards = len(list(sweep.glob("runs/*/eval/*.h5")))
    result = {
        "runs": args.runs,
        "array_parallelism": args.parallelism,
        "runs_per_task": args.runs_per_task,
        "overrides": args.overrides,
        "launch_seconds": round(launched, 1),
        "wall_seconds": round(wall, 1),
        "sbatch_calls": len(ids),
        "tasks": sum(states.values()),
        "states": dict(states),
        "summary_rows": len(rows),
        "rows_ok": sum(",ok," in r for r in rows),
        "shards": shards,
        "shards_expected": args.runs * 3,
    }
    print(json.dumps(result, indent=1))
    return 0 if result["rows_ok"] == args.runs and shards == args.runs * 3 else 1


if __name__ == "__main__":
    sys.exit(main())
