"""A stand-in for Slurm's commands, for tests that must prove nothing is submitted.

Installed as ``sinfo``, ``scontrol``, ``sacctmgr``, ``sacct``, ``squeue``, ``sbatch`` and
``scancel`` (symlinks to this file) in a folder put first on PATH. It describes one partition,
``debug``, of two nodes with 2 CPUs, 8000 MB and no GPU (the local test cluster's shape).
``sbatch`` (but ``sbatch --test-only``, which submits nothing and is accepted) and ``scancel``
append their command line to $FAKE_SLURM_LOG and fail, so a test can check that a refused
launch never called them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

NODES = [("node1", 2, 8000), ("node2", 2, 8000)]


def main(name: str | None = None) -> int:
    name, args = name or Path(sys.argv[0]).name, sys.argv[1:]
    if name == "sbatch" and "--test-only" in args:  # submits nothing: Slurm's verdict only
        print(
            "sbatch: Job 1 to start at 2026-12-01T00:00:00 using 1 processors on nodes node1 "
            "in partition debug",
            file=sys.stderr,
        )
        return 0
    if name in ("sbatch", "scancel"):
        with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
            f.write(" ".join([name, *args]) + "\n")
        print(f"{name}: error: refused by the test's fake Slurm", file=sys.stderr)
        return 1
    if name == "sinfo":
        fmt = args[args.index("-o") + 1] if "-o" in args else ""
        if "-N" in args:
            for node, cpus, mem in NODES:
                print(f"{node}|debug*|{cpus}|{mem}|(null)")
        elif fmt.startswith("%P|%l"):
            print("debug*|infinite")
        else:
            print("debug*")
        return 0
    if name == "scontrol":
        print("MaxArraySize            = 1001\nMaxJobCount             = 10000")
        return 0
    return 0  # sacctmgr, sacct, squeue: no limits, no jobs


if __name__ == "__main__":
    sys.exit(main())
