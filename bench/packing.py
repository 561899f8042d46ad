"""Packed runs: the throughput of N small runs trained side by side on one device.

What ``cluster.runs_per_task=N`` does in a train task: N processes, each training its own
width-16 DHM (``--width`` overrides) on the same GPU (or sharing the CPUs, threads split evenly),
as ``hpc.stages.train_packed`` starts them. Reference in the same run: N = 1. Reported: the
images per second of all N together, and their ratio to one run alone (target on a GPU: at
least 1.5x at the best N). Each process times ``--steps`` x ``--repeats`` optimisation steps
after ``--warmup`` untimed ones, through the same step as dhm.training.train
(bench.train_step.OurStep).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKER = """
import json, sys, time
sys.path.insert(0, {repo!r})
import torch
from bench import common
from bench.run import parse_args
from bench.train_step import OurStep
args = parse_args({argv!r})
torch.set_num_threads({threads})
data = common.synthetic_set(args.images, seed=args.seed)
step = OurStep("dhm", 0, args, data)
for _ in range(args.warmup):
    step()
common.sync(args.device)
start = time.perf_counter()
for _ in range(args.steps * args.repeats):
    step()
common.sync(args.device)
step.close()
seconds = time.perf_counter() - start
print(json.dumps({{"images_per_s": args.steps * args.repeats * args.batch / seconds}}))
"""


def _argv(args: argparse.Namespace, width: int) -> list[str]:
    return [
        "--device",
        args.device.type,
        "--width",
        str(width),
        "--batch",
        str(args.batch),
        "--images",
        str(args.images),
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--latent-dim",
        str(args.latent_dim),
    ]


def _together(args: argparse.Namespace, n: int, width: int) -> float:
    cpus = os.cpu_count() or 1
    threads = max(1, cpus // n) if args.device.type == "cpu" else max(1, cpus // n)
    code = WORKER.format(repo=str(REPO), argv=_argv(args, width), threads=threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
    total = 0.0
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"packed worker failed: {err[-1500:]}")
        total += json.loads(out.strip().splitlines()[-1])["images_per_s"]
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    width = 16 if args.width in (None, 64) else args.width
    counts = [1, 2] if args.quick else [1, 2, 4, 8]
    rows, base = [], None
    for n in counts:
        start = time.perf_counter()
        ips = _together(args, n, width)
        base = base or ips
        rows.append(
            {
                "runs per task": n,
                "images/s (all runs)": round(ips, 1),
                "ratio vs 1 run": round(ips / base, 2),
                "wall s": round(time.perf_counter() - start, 1),
            }
        )
    best = max(rows, key=lambda r: r["ratio vs 1 run"])
    return {
        "rows": rows,
        "config": {"width": width, "batch": args.batch},
        "summary": {
            "best N": best["runs per task"],
            "best ratio": best["ratio vs 1 run"],
            "target (GPU)": ">= 1.5x at the best N",
        },
    }
