"""Inject faults into sweeps on the local cluster; report what was lost and what relaunch did.

    python slurm/faults.py [--only usr2,requeue,...] [--out FILE]     (as root, cluster up)

Each scenario launches a small sweep through ``launch.py`` (cluster=slurm), injects one fault,
waits, relaunches if the fault needs it, and prints one Markdown row: the fault, how it was
injected, what was lost, what the relaunch did, and whether the final weights equal those of an
uninterrupted run of the same settings (trained once first, on the same cluster and CPUs). The
rows are docs/reliability.md's fault table. A measurement, not a test: about 20 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILE = [
    "cluster=slurm",
    "cluster.partition=debug",
    "cluster.cpus_per_task=1",
    "cluster.eval_cpus=1",
    "cluster.time=15",
    "cluster.eval_time=15",
    "cluster.aggregate_time=10",
    "train.progress=false",
    "train.dist_timeout_s=60",
    "eval.iwae_k=[1,4]",
    "eval.fgsm_eps=[0.0,0.03]",
    "eval.pgd_steps=2",
    "eval.max_images=100",
    "eval.ood_sets=[digits_ood]",
    "sweep=single",
    "model.width=8",
    "model.latent_dim=16",
    "train.batch_size=50",
    "train.epochs=4",
    "train.log_every_steps=1",
]


def env() -> dict[str, str]:
    line = subprocess.run(
        ["bash", str(REPO / "slurm/cluster.sh"), "env"], capture_output=True, text=True, check=True
    ).stdout
    return {**os.environ, "SLURM_CONF": line.strip().split("=", 1)[1]}


ENV = env()


def launch(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "launch.py", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"launch.py {' '.join(args)} exited {out.returncode}: {out.stderr}")
    return out


def jobs(sweep: Path) -> list[dict]:
    return [
        json.loads(ln)
        for ln in (sweep / "ledger.jsonl").read_text().splitlines()
        if json.loads(ln).get("kind", "submission") == "submission"
    ]


def wait(sweep: Path, timeout: float = 1200) -> None:
    ids = [j["job_id"] for j in jobs(sweep)]
    deadline = time.time() + timeout
    while subprocess.run(
        ["squeue", "-h", "-j", ",".join(ids)], env=ENV, capture_output=True, text=True
    ).stdout.strip():
        if time.time() > deadline:
            raise TimeoutError(f"{sweep}: jobs still queued")
        time.sleep(2)
    time.sleep(3)


def step_reached(run_dir: Path) -> int:
    path = run_dir / "logs" / "metrics.csv"
    if not path.exists():
        return 0
    rows = [r for r in csv.DictReader(path.open()) if r.get("loss")]
    return int(rows[-1]["step"]) if rows else 0


def wait_step(run_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while step_reached(run_dir) < step:
        if time.time() > deadline:
            raise TimeoutError(f"{run_dir} did not reach step {step}")
        time.sleep(0.3)


def same_weights(a: Path, b: Path) -> bool:
    import torch

    x = torch.load(a / "checkpoints" / "final.pt", weights_only=True)["model"]
    y = torch.load(b / "checkpoints" / "final.pt", weights_only=True)["model"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def run_dir_of(sweep: Path, timeout: float = 600) -> Path:
    """The sweep's one run folder; the train task creates it when it starts."""
    deadline = time.time() + timeout
    while not (sweep / "runs").is_dir() or not any((sweep / "runs").iterdir()):
        if time.time() > deadline:
            raise TimeoutError(f"{sweep}: no run folder after {timeout:.0f} s")
        time.sleep(0.5)
    (rd,) = (sweep / "runs").iterdir()
    return rd


def resumes(sweep: Path) -> list[int]:
    """The step each requeued attempt resumed from (from the train logs)."""
    steps = []
    for log in sorted((sweep / "slurm").glob("*_0_log.out")):
        for line in log.read_text(errors="replace").splitlines():
            if "resuming from" in line and "(step " in line:
                steps.append(int(line.split("(step ")[1].split(")")[0]))
    return steps


def footer(status: str) -> str:
    """mode=status's summary line ("N runs: ...; summary ...; aggregate job ...")."""
    return next((ln for ln in status.splitlines() if " runs: " in ln and ln[0].isdigit()), "")


def scenario_usr2(root: Path, ref: Path) -> list[str]:
    sweep = root / "single"
    launch(f"root={root}", *PROFILE, "train.checkpoint_every_steps=0")
    rd = run_dir_of(sweep)
    train = jobs(sweep)[0]["job_id"]
    signalled = []
    for target in (10, 30, 50):
        wait_step(rd, target)
        signalled.append(step_reached(rd))
        subprocess.run(["scancel", "--signal=USR2", train], env=ENV, check=True)
        time.sleep(15)
    wait(sweep)
    attempts = [
        json.loads(ln) for ln in (rd / "logs/train_attempts.jsonl").read_text().splitlines()
    ]
    stopped = [a["step"] for a in attempts if a["outcome"] == "stopped"]
    lost = sum(max(0, s - r) for s, r in zip(stopped, resumes(sweep), strict=False))
    return [
        "USR2 three times (preemption / time limit)",
        f"`scancel --signal=USR2` at steps ~{', '.join(map(str, signalled))}, "
        "checkpoint_every_steps=0",
        f"0 steps: each stop checkpointed its exact position (stopped at {stopped}, resumed "
        f"from {resumes(sweep)}; {lost} redone)",
        "none needed: requeued itself 3 times, then evaluated and aggregated",
        str(same_weights(rd, run_dir_of(ref))),
    ]


def scenario_requeue(root: Path, ref: Path) -> list[str]:
    sweep = root / "single"
    launch(f"root={root}", *PROFILE, "train.checkpoint_every_steps=10")
    rd = run_dir_of(sweep)
    train = jobs(sweep)[0]["job_id"]
    wait_step(rd, 25)
    asked = step_reached(rd)
    subprocess.run(["scontrol", "requeue", train], env=ENV, check=True)
    # The task runs on until Slurm kills it: the last step it logged is the step it reached.
    at, deadline = asked, time.time() + 600
    while not resumes(sweep) and time.time() < deadline:
        at = max(at, step_reached(rd))
        time.sleep(0.1)
    wait(sweep)
    back = resumes(sweep)
    return [
        "`scontrol requeue` (no USR2 first)",
        f"asked at step {asked}; the task reached step {at} before Slurm killed it; "
        "checkpoints every 10 steps",
        f"{at - back[0] if back else '?'} steps redone (resumed from step "
        f"{back[0] if back else '?'}, the newest periodic checkpoint)",
        "none needed: Slurm restarted the task, which resumed",
        str(same_weights(rd, run_dir_of(ref))),
    ]


def _first_running(sweep: Path, stage: str) -> str | None:
    for j in jobs(sweep):
        if j["stage"].startswith(stage):
            out = subprocess.run(
                ["squeue", "-h", "-r", "-t", "R", "-o", "%i", "-j", j["job_id"]],
                env=ENV,
                capture_output=True,
                text=True,
            ).stdout.split()
            if out:
                return out[0]
    return None


def scenario_killed_eval(root: Path, ref: Path) -> list[str]:
    sweep = root / "single"
    launch(f"root={root}", *PROFILE, "eval.pgd_steps=20")
    deadline = time.time() + 600
    task = None
    while task is None and time.time() < deadline:
        task = _first_running(sweep, "eval:digits")
        time.sleep(0.5)
    time.sleep(3)
    subprocess.run(["scancel", task], env=ENV, check=True)
    wait(sweep)
    status = launch("sweep.name=single", f"root={root}", "mode=status").stdout
    again = launch(f"root={root}", *PROFILE, "eval.pgd_steps=20")
    planned = [ln.strip() for ln in again.stdout.splitlines() if ln.strip().startswith("eval ")]
    wait(sweep)
    final = footer(launch("sweep.name=single", f"root={root}", "mode=status").stdout)
    return [
        "a killed eval task",
        f"`scancel {task}` while it ran",
        "that set's shard (never written under its final name); training and other sets kept",
        f"status said: {status.splitlines()[1].split()[1:3]}; relaunch: "
        f"{'; '.join(p for p in planned if 'now' in p)}; then: {final.split(';')[0]}",
        "-",
    ]


def scenario_killed_aggregate(root: Path, ref: Path) -> list[str]:
    sweep = root / "single"
    launch(f"root={root}", *PROFILE)
    deadline = time.time() + 900
    task = None
    while task is None and time.time() < deadline:
        task = _first_running(sweep, "aggregate")
        time.sleep(0.2)
    # Kill it mid-write: the tables are out (results.csv), the plots, report and manifest not.
    summary = sweep / "summary"
    while not (summary / "results.csv").exists() and time.time() < deadline:
        time.sleep(0.02)
    # SIGKILL every process of the job at once, as the OOM killer or a lost node would
    # (scancel sends SIGTERM to the step first, and the aggregate finished within KillWait).
    listing = subprocess.run(
        ["scontrol", "listpids", task], env=ENV, capture_output=True, text=True
    ).stdout.splitlines()[1:]
    for pid in {int(ln.split()[0]) for ln in listing if ln.split() and ln.split()[0].isdigit()}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    written = sorted(p.name for p in summary.iterdir() if p.is_file())
    wait(sweep)
    plots_missing = not any((summary / "plots").glob("*.png"))
    status = footer(launch("sweep.name=single", f"root={root}", "mode=status").stdout)
    again = launch(f"root={root}", *PROFILE)
    wait(sweep)
    after = footer(launch("sweep.name=single", f"root={root}", "mode=status").stdout)
    line = next((ln for ln in again.stdout.splitlines() if "aggregate:" in ln), "")
    return [
        "a killed aggregate job",
        f"`kill -9` of every process of job {task} once results.csv was written",
        f"the rest of the summary (files there: {', '.join(written)}; plots missing: "
        f"{plots_missing}); no manifest.json (written last), so the summary is not done",
        f"status: '{status.split(';')[1].strip()}'; relaunch: '{line.strip()}', then "
        f"'{after.split(';')[1].strip()}'",
        "-",
    ]


def scenario_killed_rank(root: Path, ref: Path) -> list[str]:
    sweep = root / "single"
    launch(f"root={root}", *PROFILE, "cluster.nodes=2", "train.checkpoint_every_steps=10")
    rd = run_dir_of(sweep)
    wait_step(rd, 15)
    pids = subprocess.run(
        ["pgrep", "-f", "submitit.core._submit"], capture_output=True, text=True
    ).stdout.split()
    victim = int(pids[-1])
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    wait(sweep)
    status = launch("sweep.name=single", f"root={root}", "mode=status").stdout
    row = next(ln for ln in status.splitlines() if ln.startswith(rd.name))
    again = launch(f"root={root}", *PROFILE, "cluster.nodes=2", "train.checkpoint_every_steps=10")
    plan = next(ln.strip() for ln in again.stdout.splitlines() if "train:" in ln)
    wait(sweep)
    done = (rd / "checkpoints" / "final.pt").exists()
    del killed
    return [
        "a killed DDP rank (2 nodes)",
        "`kill -9` of one rank's process at step ~15",
        "the steps since the newest checkpoint (every 10 steps)",
        f"status: {' '.join(row.split()[1:4])}; relaunch: '{plan[:110]}'; trained: {done}",
        "-",
    ]


def scenario_slurmd_down(root: Path, ref: Path) -> list[str]:
    sweep = root / "single"
    launch(f"root={root}", *PROFILE, "train.checkpoint_every_steps=10", "cluster.exclude=node1")
    rd = run_dir_of(sweep)
    wait_step(rd, 15)
    pid = int(Path("/var/lib/dhm-slurm/run/slurmd-node2.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    subprocess.run("pkill -9 -f slurmstepd", shell=True)
    time.sleep(50)  # SlurmdTimeout=30: the controller marks node2 down, the job NODE_FAIL
    states = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", jobs(sweep)[0]["job_id"]],
        env=ENV,
        capture_output=True,
        text=True,
    ).stdout.split()
    subprocess.run(["bash", str(REPO / "slurm/cluster.sh"), "up"], capture_output=True)
    subprocess.run(
        ["scontrol", "update", "nodename=node2", "state=resume"], env=ENV, capture_output=True
    )
    again = launch(f"root={root}", *PROFILE, "train.checkpoint_every_steps=10")
    plan = next((ln.strip() for ln in again.stdout.splitlines() if "train:" in ln), "")
    wait(sweep)
    return [
        "slurmd down on the training node",
        "`kill -9` slurmd and slurmstepd of node2",
        "the steps since the newest checkpoint (every 10 steps)",
        f"sacct: {', '.join(st.replace('|', ' ') for st in states)}; "
        f"relaunch: '{plan[:120]}'; trained: {(rd / 'checkpoints/final.pt').exists()}",
        "-",
    ]


SCENARIOS = {
    "usr2": scenario_usr2,
    "requeue": scenario_requeue,
    "eval": scenario_killed_eval,
    "aggregate": scenario_killed_aggregate,
    "rank": scenario_killed_rank,
    "slurmd": scenario_slurmd_down,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=",".join(SCENARIOS))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    base = Path(tempfile.mkdtemp(prefix="dhm-faults-"))
    ref = base / "reference"
    launch(f"root={ref}", *PROFILE, "train.checkpoint_every_steps=0")
    wait(ref / "single")
    rows = [
        "| fault | injected | lost | what the relaunch did | weights = uninterrupted |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        start = time.time()
        cells = SCENARIOS[name](base / name, ref / "single")
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], f"({time.time() - start:.0f} s)", flush=True)
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
