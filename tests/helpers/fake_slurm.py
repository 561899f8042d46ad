"""A stand-in for Slurm's commands, for tests that must prove nothing is submitted, and for the
launcher's benchmark.

``install(folder)`` writes ``sinfo``, ``scontrol``, ``sacctmgr``, ``sacct``, ``squeue``,
``sbatch`` and ``scancel`` into ``folder``, to be put first on PATH. They describe one
partition, ``debug``, of two nodes with 2 CPUs, 8000 MB and no GPU (the local test cluster's
shape). ``sbatch`` (but ``sbatch --test-only``, which submits nothing and is accepted) and
``scancel`` append their command line to $FAKE_SLURM_LOG and fail, so a test can check that a
refused launch never called them. ``sacct`` and ``squeue`` print the files named by
$FAKE_SLURM_SACCT and $FAKE_SLURM_SQUEUE (nothing when unset): their ``-P``/``%i|%T|%r`` text.

The commands start Python with ``-I -S`` (no site-packages, ~8 ms) and import nothing but
``os`` and ``sys``: Slurm's real commands are C programs that start in a few milliseconds, and
a benchmark of the launcher must not time 10 interpreter start-ups instead of the launcher.
"""

from __future__ import annotations

import os
import sys

NODES = [("node1", 2, 8000), ("node2", 2, 8000)]
COMMANDS = ("sinfo", "scontrol", "sacctmgr", "sacct", "squeue", "sbatch", "scancel")


def install(folder: str | os.PathLike) -> str:
    """Write the fake commands into ``folder``; return it (to prepend to PATH)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in COMMANDS:
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write(
                f"#!{sys.executable} -IS\nimport sys\nsys.path.insert(0, {here!r})\n"
                f"import fake_slurm\nsys.exit(fake_slurm.main({name!r}))\n"
            )
        os.chmod(path, 0o755)
    return str(folder)


def _print_file(variable: str) -> int:
    path = os.environ.get(variable)
    if path:
        with open(path) as f:
            sys.stdout.write(f.read())
    return 0


def main(name: str | None = None) -> int:
    name, args = name or os.path.basename(sys.argv[0]), sys.argv[1:]
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
                print(f"{node}|debug*|{cpus}|{mem}|gpu:2")  # as slurm/cluster.sh's fake GPUs
        elif fmt.startswith("%P|%l"):
            print("debug*|infinite")
        else:
            print("debug*")
        return 0
    if name == "scontrol":
        print("MaxArraySize            = 1001\nMaxJobCount             = 10000")
        return 0
    if name == "sacct":
        return _print_file("FAKE_SLURM_SACCT")
    if name == "squeue":
        return _print_file("FAKE_SLURM_SQUEUE")
    return 0  # sacctmgr: no limits


if __name__ == "__main__":
    sys.exit(main())
