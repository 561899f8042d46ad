"""End to end on the local two-node Slurm cluster (slurm/cluster.sh), through launch.py.

`make test` starts the cluster first. Outside root/Debian these tests skip and say why; in CI
(CI=true) a cluster that is not up is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc import slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "cluster.sh"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Sized for the test cluster: 2 nodes x 2 CPUs.
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
    # Small enough for 2 cores: one epoch, a short epsilon grid, k = 4.
    "train.epochs=1",
    "eval.iwae_k=[1,4]",
    "eval.fgsm_eps=[0.0,0.03]",
]


def _cluster_env() -> dict[str, str]:
    status = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True)
    if status.returncode != 0:
        reason = "the local Slurm cluster is not up (run `bash slurm/cluster.sh up` as root)"
        if os.geteuid() != 0:
            reason = "the local Slurm cluster needs root (slurm/cluster.sh starts daemons)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}:\n{status.stdout}\n{status.stderr}")
        pytest.skip(reason)
    env_line = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True).stdout
    conf = env_line.strip().split("=", 1)[1].strip("'\"")
    return {**os.environ, "SLURM_CONF": conf, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def slurm_env():
    return _cluster_env()


def launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch.py", *args]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    print(out.stdout, out.stderr)
    return out


def ledger_jobs(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_jobs(env: dict[str, str], job_ids: list[str], timeout: float = 900) -> dict[str, str]:
    """Poll until no job is pending or running; return {job or job_task: sacct state}."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queued = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)],
            env=env, capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        if not queued:
            break
        time.sleep(3)
    else:
        pytest.fail(f"jobs {job_ids} still queued after {timeout} s")
    states: dict[str, str] = {}
    for _ in range(20):  # sacct lags squeue by a moment
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
            env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        states = {
            job if task is None else f"{job}_{task}": state
            for (job, task), state in slurm.parse_sacct(out).items()
        }
        if states and not any(s in ("PENDING", "RUNNING", "COMPLETING") for s in states.values()):
            break
        time.sleep(1)
    return states


def test_demo_sweep_trains_with_ddp_across_two_nodes_evaluates_and_aggregates(slurm_env, tmp_path):
    args = ["sweep=demo", f"root={tmp_path}", *PROFILE, "cluster.nodes=2"]
    first = launch(slurm_env, *args)
    assert first.returncode == 0, first.stderr
    assert "submitted train" in first.stdout and "mode=status" in first.stdout
    sweep_dir = tmp_path / "demo"
    jobs = ledger_jobs(sweep_dir)
    assert [j["stage"] for j in jobs] == ["train", "eval:digits", "eval:digits_ood", "aggregate"]
    assert jobs[1]["dependency"] == f"aftercorr:{jobs[0]['job_id']}"
    states = wait_for_jobs(slurm_env, [j["job_id"] for j in jobs])
    assert len(states) == 4 * 3 + 1 and set(states.values()) == {"COMPLETED"}, states

    summary = sweep_dir / "summary"
    assert (summary / "results.csv").exists() and (summary / "results.h5").exists()
    rows = (summary / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    for run_dir in (sweep_dir / "runs").iterdir():
        assert run_dir.name in "\n".join(rows)
        records = [json.loads(p.read_text()) for p in (run_dir / "logs").glob("train_*_rank*.json")]
        assert {r["slurmd_nodename"] for r in records} == {"node1", "node2"}
        assert {r["world_size"] for r in records} == {2} and {r["rank"] for r in records} == {0, 1}
        assert all(r["slurm_array_job_id"] == jobs[0]["job_id"] for r in records)
        assert (run_dir / "checkpoints" / "final.pt").exists()

    status = launch(slurm_env, *args, "mode=status")
    assert status.returncode == 0 and "4 runs: 4 done; summary exists" in status.stdout
    again = launch(slurm_env, *args)
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    assert len(ledger_jobs(sweep_dir)) == 4


def test_a_failed_training_cancels_its_eval_and_relaunch_resubmits_only_it(slurm_env, tmp_path):
    base = [f"root={tmp_path}", *PROFILE, "sweep=demo", "sweep.name=fail",
            "+sweep.axes={model.beta:[0.01]}"]  # fmt: skip
    bad = "sweep.points=[{model.alpha:1.0,model.beta:1.0,train.debug_nan_at_step:3}]"
    first = launch(slurm_env, *base, bad)
    assert first.returncode == 0, first.stderr
    sweep_dir = tmp_path / "fail"
    jobs = ledger_jobs(sweep_dir)
    states = wait_for_jobs(slurm_env, [j["job_id"] for j in jobs])
    train_id, agg_id = jobs[0]["job_id"], jobs[-1]["job_id"]
    bad_index, good_index = 1, 0  # axes come first in the grid, then the (NaN) point
    assert states[f"{train_id}_{good_index}"] == "COMPLETED"
    for eval_job in jobs[1:-1]:
        assert states[f"{eval_job['job_id']}_{bad_index}"] == "CANCELLED"
        assert states[f"{eval_job['job_id']}_{good_index}"] == "COMPLETED"
    assert states[agg_id] == "FAILED"  # ran (afterany) and reported the missing run
    bad_run = jobs[0]["tasks"][bad_index]["run_id"]
    agg_log = next((sweep_dir / "slurm").glob(f"{agg_id}_0_log.err")).read_text()
    assert bad_run in agg_log
    train_log = next((sweep_dir / "slurm").glob(f"{train_id}_{bad_index}_0_log.err")).read_text()
    assert "non-finite loss at step 3" in train_log
    rows = (sweep_dir / "summary" / "results.csv").read_text()
    assert bad_run in rows and jobs[0]["tasks"][good_index]["run_id"] in rows

    # Same runs without the injected fault: only the failed run is submitted again.
    fixed = launch(slurm_env, *base, "sweep.points=[{model.alpha:1.0,model.beta:1.0}]")
    assert fixed.returncode == 0, fixed.stderr
    new_jobs = ledger_jobs(sweep_dir)[len(jobs) :]
    assert [j["stage"] for j in new_jobs] == [
        "train",
        "eval:digits",
        "eval:digits_ood",
        "aggregate",
    ]
    assert all([t.get("run_id") for t in j["tasks"]] == [bad_run] for j in new_jobs[:-1]), new_jobs
    states = wait_for_jobs(slurm_env, [j["job_id"] for j in new_jobs])
    assert set(states.values()) == {"COMPLETED"}, states


def test_bad_input_is_refused_before_any_sbatch(slurm_env, tmp_path):
    for args, message in [
        ([*PROFILE, "cluster.partition=nosuch"], "not a partition sinfo knows: debug"),
        ([*PROFILE, "cluster.time=soon"], "cluster.time='soon'"),
        ([*PROFILE, "+sweep.axes={model.bta:[1]}"], "model.bta"),
        (["cluster=nosuch"], "Could not find 'cluster/nosuch'"),
        ([*PROFILE, "model.width=wide"], "model.width=wide"),
        ([*PROFILE, "cluster.nodes=0"], "cluster.nodes=0"),
    ]:
        out = launch(slurm_env, "sweep=demo", f"root={tmp_path}", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr, (args, out.stderr)
    assert not (tmp_path / "demo").exists()


def test_usr2_requeues_training_which_resumes_from_its_checkpoint(slurm_env, tmp_path):
    args = ["sweep=single", f"root={tmp_path}", *PROFILE, "model.width=8", "model.latent_dim=16",
            "train.epochs=4", "train.batch_size=50", "train.checkpoint_every_steps=4"]  # fmt: skip
    first = launch(slurm_env, *args)
    assert first.returncode == 0, first.stderr
    sweep_dir = tmp_path / "single"
    train_job = ledger_jobs(sweep_dir)[0]["job_id"]
    deadline = time.time() + 300
    while not list(sweep_dir.glob("runs/*/checkpoints/step_*.pt")):
        assert time.time() < deadline, "no step checkpoint within 300 s"
        time.sleep(1)
    # What a preemption or an approaching time limit does: USR2 to the job's processes.
    subprocess.run(["scancel", "--signal=USR2", train_job], env=slurm_env, check=True)
    (run_dir,) = (sweep_dir / "runs").iterdir()
    jobs = [j["job_id"] for j in ledger_jobs(sweep_dir)]
    states = wait_for_jobs(slurm_env, jobs)
    assert set(states.values()) == {"COMPLETED"}, states
    records = [json.loads(p.read_text()) for p in (run_dir / "logs").glob("train_*_rank0.json")]
    assert {r.get("slurm_restart_count", "0") for r in records} >= {"1"}
    out = next((sweep_dir / "slurm").glob(f"{train_job}_0_log.out")).read_text()
    assert "resuming from" in out and (run_dir / "checkpoints" / "final.pt").exists()
