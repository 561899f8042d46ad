"""End to end on the local two-node Slurm cluster (slurm/cluster.sh), through launch.py.

`make test` starts the cluster first. Outside root/Debian these tests skip and say why; in CI
(CI=true) a cluster that is not up is a failure, not a skip. The cluster enforces --mem (jobs
above it are killed, as on a real cluster) and has MaxArraySize=11.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpc import efficiency as E
from hpc.ledger import parse_sacct

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
    # Small enough for 2 cores: one epoch, a short epsilon grid, k = 4, 100 images a set.
    "train.epochs=1",
    "eval.iwae_k=[1,4]",
    "eval.fgsm_eps=[0.0,0.03]",
    "eval.pgd_steps=2",
    "eval.max_images=100",
]
TINY = [
    "model.width=4",
    "model.latent_dim=4",
    "train.batch_size=100",
    "eval.batch_size=50",
    "eval.ood_sets=[digits_ood]",
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
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    print(out.stdout[-6000:], out.stderr[-3000:])
    return out


def ledger(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / "ledger.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in entries if e.get("kind", "submission") == "submission"]


def sacct_states(env: dict[str, str], job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {k: v[-1].state for k, v in parse_sacct(out).items()}


def wait_for_jobs(env: dict[str, str], job_ids: list[str], timeout: float = 900) -> dict[str, str]:
    """Poll until no job is pending or running; return {job or job_task: sacct state}."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queued = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)],
            env=env,
            capture_output=True,
            text=True,
        ).stdout.split()
        if not queued:
            break
        time.sleep(3)
    else:
        pytest.fail(f"jobs {job_ids} still queued after {timeout} s")
    states: dict[str, str] = {}
    for _ in range(30):  # sacct lags squeue by a moment
        states = sacct_states(env, job_ids)
        if states and not any(s in ("PENDING", "RUNNING", "COMPLETING") for s in states.values()):
            break
        time.sleep(1)
    return states


def test_the_fake_gpus_are_scheduled_bound_per_style_and_accounted(slurm_env, tmp_path):
    # slurm/cluster.sh gives each node two GPUs through GRES (dummy devices): sinfo shows them,
    # requests beyond them are refused, and the two binding styles sites use reach each task
    # as CUDA_VISIBLE_DEVICES under TaskPlugin=task/none: --gpus-per-node (every task sees the
    # node's GPUs) and --gpus-per-task=1 / --gpu-bind (each task sees its own). sacct records
    # gres/gpu in AllocTRES, which the GPU-hours read (hpc.state._units).
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=slurm_env, capture_output=True, text=True, cwd=tmp_path)

    sinfo = run("sinfo", "-h", "-N", "-o", "%N %G").stdout.split("\n")
    assert {line.strip() for line in sinfo if line.strip()} == {"node1 gpu:2", "node2 gpu:2"}
    refused = run("sbatch", "--gpus-per-node=3", "--wrap", "true")
    assert refused.returncode != 0 and "configuration is not available" in refused.stderr
    task = "srun bash -c 'echo $SLURMD_NODENAME $SLURM_LOCALID $CUDA_VISIBLE_DEVICES'"
    styles = {
        "node": ["--gpus-per-node=2"],
        "task": ["--gpus-per-task=1"],
        "bind": ["--gpus-per-node=2", "--gpu-bind=single:1"],
    }
    jobs = {}
    for style, flags in styles.items():
        out = run("sbatch", "--parsable", "-N2", "--ntasks-per-node=2", *flags, "-o",
                  f"{style}.out", "--wrap", task)  # fmt: skip
        assert out.returncode == 0, out.stderr
        jobs[style] = out.stdout.strip().split(";")[0]
    states = wait_for_jobs(slurm_env, list(jobs.values()), timeout=300)
    assert set(states.values()) == {"COMPLETED"}, states
    for style in styles:
        seen = sorted(
            tuple(line.split()) for line in (tmp_path / f"{style}.out").read_text().splitlines()
        )
        if style == "node":
            assert seen == [(n, r, "0,1") for n in ("node1", "node2") for r in "01"]
        else:  # rank r of a node alone with GPU r: distinct physical GPUs per node
            assert seen == [(n, r, r) for n in ("node1", "node2") for r in "01"]
    tres = run("sacct", "-X", "-n", "-P", "-o", "AllocTRES", "-j", ",".join(jobs.values()))
    assert [line for line in tres.stdout.split() if line] and all(
        "gres/gpu=4" in line for line in tres.stdout.split() if line
    ), tres.stdout


def test_a_gpu_task_without_cuda_fails_unless_told_cpu_and_gpu_hours_come_from_sacct(
    slurm_env, tmp_path
):
    # On the fake-GPU cluster a task gets GPUs that CUDA cannot use. The run left at
    # train.device=auto must fail at once, naming the host and CUDA_VISIBLE_DEVICES (never
    # train on the CPU for days); the run with train.device=cpu (and the evals, eval.device=cpu)
    # is the explicit fallback and completes. Status counts GPU-hours from sacct's gres/gpu.
    base = [f"root={tmp_path}", *PROFILE, *TINY, "sweep=single", "sweep.name=gpus",
            "cluster.gpus_per_node=1", "cluster.eval_gpus=1", "eval.device=cpu",
            "+cluster.env={NCCL_DEBUG:WARN}",
            "sweep.points=[{model.beta:1.0,train.device:cpu},{model.beta:2.0}]"]  # fmt: skip
    first = launch(slurm_env, *base)
    assert first.returncode == 0, first.stderr
    sweep_dir = tmp_path / "gpus"
    jobs = ledger(sweep_dir)
    states = wait_for_jobs(slurm_env, [j["job_id"] for j in jobs])
    train = jobs[0]["job_id"]
    assert states[f"{train}_0"] == "COMPLETED" and states[f"{train}_1"] == "FAILED", states
    bad = jobs[0]["tasks"][1]["runs"][0]
    out = launch(slurm_env, "sweep.name=gpus", f"root={tmp_path}", "mode=status").stdout
    (bad_row,) = [ln for ln in out.splitlines() if ln.startswith(bad)]
    assert "train failed" in bad_row and "NoGPUError" in bad_row, bad_row
    detail = launch(
        slurm_env, "sweep.name=gpus", f"root={tmp_path}", "mode=status", f"runs=[{bad}]"
    ).stdout
    assert re.search(r"on \S+ \(CUDA_VISIBLE_DEVICES='[01]'", detail), detail  # host, its GPU
    assert "  train: 1 task(s), CPU " in detail, detail  # its own task's efficiency
    assert "RuntimeError: " in detail and "set train.device=cpu" in detail, detail  # CUDA says why
    assert "efficiency of finished tasks (sacct)" in out and "  train: 2 task(s)" in out, out
    page = (sweep_dir / "summary" / "report.html").read_text()
    assert "Efficiency" in page and "NoGPUError: the train task was given GPUs" in page
    used = re.search(r"([0-9.]+) (GPU|CPU)-hours used", out)
    assert used and used.group(2) == "GPU" and float(used.group(1)) > 0, out
    tres = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "AllocTRES", "-j", train],
                          env=slurm_env, capture_output=True, text=True).stdout  # fmt: skip
    assert "gres/gpu=1" in tres, tres
    # The next plan costs its new run from this history (sacct's elapsed x gres/gpu), in
    # GPU-hours, and the budget refuses it on that figure.
    points = "sweep.points=[{model.beta:1.0,train.device:cpu},{model.beta:3.0,train.device:cpu}]"
    more = [*base[:-1], points, "replan=true", "mode=dry_run", "cluster.budget_gpu_hours=1e-9"]
    refused = launch(slurm_env, *more)
    assert refused.returncode == 2, refused.stdout
    assert re.search(
        r"estimated cost: train 1 run\(s\) [0-9.]+ GPU-hours \(history\)", refused.stdout
    )
    assert "cluster.budget_gpu_hours=1e-09: this plan costs" in refused.stderr, refused.stderr
    good = jobs[0]["tasks"][0]["runs"][0]
    (record,) = (sweep_dir / "runs" / good / "logs").glob("train_*_rank0.json")
    assert json.loads(record.read_text())["nccl_env"] == {"NCCL_DEBUG": "WARN"}  # cluster.env


@pytest.mark.parametrize("style", ["node", "task"])
def test_every_ddp_rank_asks_for_its_own_physical_gpu_under_each_binding(
    slurm_env, tmp_path, style
):
    # A 2-node x 2-GPU training task through launch.py (gloo on the CPU: the GPUs are fake).
    # Each of the 4 ranks records CUDA_VISIBLE_DEVICES and the CUDA device index it asks for;
    # the GPU that the pair names must be a different physical GPU for each rank of a node.
    # The cluster profile is a site's copy of slurm.yaml under its own name, outside the
    # checkout, given with -cd (README: Cluster profiles).
    site = tmp_path / "site" / "cluster"
    site.mkdir(parents=True)
    text = (REPO / "configs" / "cluster" / "slurm.yaml").read_text()
    text = text.replace("name: slurm ", "name: fakegpu ", 1)
    (site / "fakegpu.yaml").write_text(text.replace("gpus_per_node: 0 ", "gpus_per_node: 2 ", 1))
    profile = ["-cd", str(tmp_path / "site"), "cluster=fakegpu", *PROFILE[1:]]
    base = [*profile, f"root={tmp_path}", *TINY, "sweep=single", f"sweep.name=bind_{style}",
            "cluster.nodes=2", f"cluster.gpu_bind={style}",
            "train.device=cpu", "eval.device=cpu", "train.batch_size=100"]  # fmt: skip
    out = launch(slurm_env, *base)
    assert out.returncode == 0, out.stderr
    sweep_dir = tmp_path / f"bind_{style}"
    cluster = json.loads((sweep_dir / "plan.json").read_text())["cluster"]
    assert (cluster["name"], cluster["kind"], cluster["gpus_per_node"]) == ("fakegpu", "slurm", 2)
    jobs = ledger(sweep_dir)
    states = wait_for_jobs(slurm_env, [jobs[0]["job_id"]])
    assert set(states.values()) == {"COMPLETED"}, states
    run = jobs[0]["tasks"][0]["runs"][0]
    records = [
        json.loads(p.read_text())
        for p in (sweep_dir / "runs" / run / "logs").glob("train_*_rank*.json")
    ]
    assert sorted(r["rank"] for r in records) == [0, 1, 2, 3]
    by_node: dict[str, list[str]] = {}
    for r in records:
        assert r["gpu_bind"] == style and r["world_size"] == 4
        visible = r["cuda_visible_devices"].split(",")
        by_node.setdefault(r["slurmd_nodename"], []).append(visible[r["cuda_device_index"]])
    assert {n: sorted(g) for n, g in by_node.items()} == {"node1": ["0", "1"], "node2": ["0", "1"]}


def test_a_known_workload_gets_its_efficiency_right(slurm_env, tmp_path, monkeypatch):
    # A task that keeps 1 of its 2 allocated CPUs busy for 30 s is about 50% efficient, read
    # from sacct's job and step lines the way mode=status reads them (hpc.efficiency).

    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])  # sacct runs from this process
    busy = "import time\nt = time.time()\nwhile time.time() - t < 30: pass\n"
    (tmp_path / "busy.py").write_text(busy)
    out = subprocess.run(
        ["sbatch", "--parsable", "-c", "2", "--mem=1000M", "-o", str(tmp_path / "busy.out"),
         "--wrap", f"srun {sys.executable} {tmp_path / 'busy.py'}"],
        env=slurm_env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = out.stdout.strip().split(";")[0]
    assert wait_for_jobs(slurm_env, [job], timeout=300) == {job: "COMPLETED"}
    subs = [{"stage": "eval:x", "job_id": job, "tasks": [{}], "params": {"cpus_per_task": 2}}]
    for _ in range(10):  # the step lines reach the database a moment after the job line
        (use,) = E.stage_uses(subs, E.parse_steps(E.ask(subs).answer()))
        if use.mem_used_mb:
            break
        time.sleep(1)
    assert 0.42 < use.cpu_efficiency < 0.55, use  # 30 s of work in ~31-35 s of 2 CPUs
    assert use.cpus_used == pytest.approx(use.cpu_efficiency * 2) and use.mem_asked_mb == 1000
    assert 5 < use.mem_used_mb < 200, use  # a Python interpreter's RSS


def test_demo_sweep_trains_with_ddp_across_two_nodes_evaluates_and_aggregates(slurm_env, tmp_path):
    args = ["sweep=demo", f"root={tmp_path}", *PROFILE, "cluster.nodes=2"]
    first = launch(slurm_env, *args)
    assert first.returncode == 0, first.stderr
    assert "sbatch --test-only accepted all 6 array(s)" in first.stdout
    assert f"follow: python launch.py sweep.name=demo root={tmp_path} mode=status" in first.stdout
    sweep_dir = tmp_path / "demo"
    jobs = ledger(sweep_dir)
    assert [j["stage"] for j in jobs] == [
        "train",
        "eval:digits",
        "eval:digits-val",
        "eval:digits_heldout",
        "eval:digits_ood",
        "aggregate",
    ]
    assert jobs[1]["dependency"] == f"aftercorr:{jobs[0]['job_id']}"
    states = wait_for_jobs(slurm_env, [j["job_id"] for j in jobs])
    # 4 train tasks, 4 tasks in each of the 4 eval arrays (the vae's val task a no-op), 1 aggregate
    assert len(states) == 4 * 5 + 1 and set(states.values()) == {"COMPLETED"}, states

    summary = sweep_dir / "summary"
    assert (summary / "results.csv").exists() and (summary / "report.html").exists()
    rows = (summary / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    for run_dir in (sweep_dir / "runs").iterdir():
        assert run_dir.name in "\n".join(rows)
        records = [json.loads(p.read_text()) for p in (run_dir / "logs").glob("train_*_rank*.json")]
        assert {r["slurmd_nodename"] for r in records} == {"node1", "node2"}
        assert {r["world_size"] for r in records} == {2} and {r["rank"] for r in records} == {0, 1}
        assert all(r["slurm_array_job_id"] == jobs[0]["job_id"] for r in records)
        assert (run_dir / "checkpoints" / "final.pt").exists()

    status = launch(slurm_env, "sweep.name=demo", f"root={tmp_path}", "mode=status")
    assert status.returncode == 0 and "4 runs: 4 done; summary complete" in status.stdout
    # The profile asks for no GPU (cluster.gpus_per_node=0): hours are counted in CPU-hours.
    assert "CPU-h" in status.stdout and "GPU-h" not in status.stdout, status.stdout
    again = launch(slurm_env, *args)
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    assert len(ledger(sweep_dir)) == 6


def test_status_tells_each_stage_its_own_task_and_why_and_relaunch_acts_on_it(slurm_env, tmp_path):
    base = [f"root={tmp_path}", *PROFILE, *TINY, "sweep=single", "sweep.name=truth"]
    points = "sweep.points=[{model.beta:1.0},{model.beta:2.0,train.debug_nan_at_step:3}]"
    first = launch(slurm_env, *base, points)
    assert first.returncode == 0, first.stderr
    sweep_dir = tmp_path / "truth"
    jobs = ledger(sweep_dir)
    states = wait_for_jobs(slurm_env, [j["job_id"] for j in jobs])
    train, agg = jobs[0]["job_id"], jobs[-1]["job_id"]
    assert states[f"{train}_0"] == "COMPLETED" and states[f"{train}_1"] == "FAILED"
    for ev in jobs[1:-1]:
        assert states[f"{ev['job_id']}_1"] == "CANCELLED"
    assert states[agg] == "FAILED"  # ran (afterany) and reported the missing run
    bad = jobs[0]["tasks"][1]["runs"][0]
    out = launch(slurm_env, "sweep.name=truth", f"root={tmp_path}", "mode=status").stdout
    (bad_row,) = [ln for ln in out.splitlines() if ln.startswith(bad)]
    assert "train failed" in bad_row and "FAILED 1:0" in bad_row
    assert "exception: NonFiniteLossError: non-finite loss at step 3" in bad_row, bad_row
    log = bad_row.split()[-1]
    assert Path(log).exists() and log.endswith("_log.err")
    assert f"aggregate job {agg} FAILED" in out
    detail = launch(
        slurm_env, "sweep.name=truth", f"root={tmp_path}", "mode=status", f"runs=[{bad}]"
    ).stdout
    assert re.search(rf"^train\s+{train}_1\s", detail, re.M), detail
    assert "tail of" in detail, detail
    assert (
        "exception: dhm.training.monitor.NonFiniteLossError: non-finite loss at step 3" in detail
    ), detail
    rows = (sweep_dir / "summary" / "results.csv").read_text()
    assert "non-finite loss at step 3" in rows  # the summary's problem column: the same reason

    # A deterministic bug is not retried on relaunch ...
    again = launch(slurm_env, *base, points)
    assert again.returncode == 0 and "not retried" in again.stdout
    # The failed aggregate wrote its summary and manifest.json before it exited non-zero, so the
    # summary is complete: neither training nor the aggregate is submitted again.
    assert "nothing to submit" in again.stdout and len(ledger(sweep_dir)) == len(jobs), again.stdout
    # ... unless asked; then only that run goes again (its evals after it, and the aggregate).
    fixed = "sweep.points=[{model.beta:1.0},{model.beta:2.0}]"
    before = len(ledger(sweep_dir))
    retry = launch(slurm_env, *base, fixed, "retry_failed=true", "replace_summary=true")
    assert retry.returncode == 0, retry.stderr
    new = ledger(sweep_dir)[before:]
    assert [j["stage"] for j in new] == [
        "train",
        "eval:digits",
        "eval:digits-val",
        "eval:digits_ood",
        "aggregate",
    ]
    assert all([t.get("runs") for t in j["tasks"]] == [[bad]] for j in new[:-1]), new
    states = wait_for_jobs(slurm_env, [j["job_id"] for j in new])
    assert set(states.values()) == {"COMPLETED"}, states


def test_bad_input_is_refused_before_any_sbatch(slurm_env, tmp_path):
    for args, message in [
        ([*PROFILE, "cluster.partition=nosuch"], "not a partition sinfo knows: debug"),
        ([*PROFILE, "cluster.nodes=3", "train.batch_size=63"], "partition debug has 2 node(s)"),
        ([*PROFILE, "cluster.cpus_per_task=8"], "the largest node of partition debug has 2 CPUs"),
        ([*PROFILE, "cluster.mem=100G"], "at most 8000 MB"),
        ([*PROFILE, "cluster.time=soon"], "cluster.time='soon'"),
        ([*PROFILE, "+sweep.axes={model.bta:[1]}"], "model.bta"),
        (["cluster=nosuch"], "Could not find 'cluster/nosuch'"),
        ([*PROFILE, "cluster.python='python;touch pwned'"], "cluster.python"),
    ]:
        out = launch(slurm_env, "sweep=demo", f"root={tmp_path}", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr, (args, out.stderr)
    assert not (tmp_path / "demo").exists()


def test_an_sbatch_failure_cancels_what_the_launch_submitted(slurm_env, tmp_path):
    # A real sbatch that refuses its third call, as a full queue or a flaky controller might
    # after --test-only passed: the two arrays already queued are cancelled and recorded.
    shim = tmp_path / "bin"
    shim.mkdir()
    real = subprocess.run(
        ["bash", "-c", "command -v sbatch"], capture_output=True, text=True
    ).stdout.strip()
    count = tmp_path / "count"
    (shim / "sbatch").write_text(
        "#!/bin/bash\n"
        f'if [[ " $* " != *" --test-only "* ]]; then echo x >> {count};\n'
        f'  if [[ $(wc -l < {count}) -ge 3 ]]; then echo "sbatch: error: Batch job submission '
        'failed: the test says no" >&2; exit 1; fi; fi\n'
        f'exec {real} "$@"\n'
    )
    (shim / "sbatch").chmod(0o755)
    env = {**slurm_env, "PATH": f"{shim}:{slurm_env['PATH']}"}
    out = launch(env, "sweep=demo", f"root={tmp_path}", *PROFILE, *TINY, "sweep.name=half")
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "sbatch failed for the eval:digits-val array" in err[0]
    assert "cancelled the 2 array(s) it had submitted" in err[0] and "Traceback" not in out.stderr
    entries = [
        json.loads(ln) for ln in (tmp_path / "half" / "ledger.jsonl").read_text().splitlines()
    ]
    submitted = [e["job_id"] for e in entries if e.get("kind") == "submission"]
    cancel = [e for e in entries if e.get("kind") == "cancel"]
    assert len(submitted) == 2 and cancel and cancel[0]["job_ids"] == submitted
    states = wait_for_jobs(slurm_env, submitted, timeout=120)
    assert states and set(states.values()) == {"CANCELLED"}, states
    # The relaunch plans the same work again: plan.json counts each piece of it once (it had
    # grown by the whole estimate with every relaunch).
    plan = tmp_path / "half" / "plan.json"
    before = {r["run_id"]: r["estimated_hours"] for r in json.loads(plan.read_text())["runs"]}
    again = launch(slurm_env, "sweep=demo", f"root={tmp_path}", *PROFILE, *TINY, "sweep.name=half")
    assert again.returncode == 0, again.stderr
    launch(slurm_env, "sweep.name=half", f"root={tmp_path}", "mode=cancel")
    after = {r["run_id"]: r["estimated_hours"] for r in json.loads(plan.read_text())["runs"]}
    assert after == before and all(h > 0 for h in after.values()), (before, after)


def _train_job(sweep_dir: Path) -> str:
    return ledger(sweep_dir)[0]["job_id"]


def _run_dir(sweep_dir: Path) -> Path:
    """The first run's folder (the train task creates it when it starts)."""
    return sweep_dir / "runs" / ledger(sweep_dir)[0]["tasks"][0]["runs"][0]


def test_usr2_checkpoints_the_exact_position_and_the_requeued_run_is_bit_identical(
    slurm_env, tmp_path
):
    # checkpoint_every_steps=0: the only checkpoint that can exist mid-epoch is the one USR2
    # makes. The same run uninterrupted, in another sweep, on the same cluster and CPUs.
    args = [
        "sweep=single",
        *PROFILE,
        "model.width=8",
        "model.latent_dim=16",
        "train.epochs=3",
        "train.batch_size=50",
        "train.checkpoint_every_steps=0",
        "eval.ood_sets=[digits_ood]",
        "train.log_every_steps=1",
    ]
    ref = launch(slurm_env, *args, f"root={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr
    first = launch(slurm_env, *args, f"root={tmp_path}/cut")
    assert first.returncode == 0, first.stderr
    sweep_dir = tmp_path / "cut" / "single"
    train_job = _train_job(sweep_dir)
    run_dir = _run_dir(sweep_dir)
    metrics = run_dir / "logs" / "metrics.csv"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 25):
        assert time.time() < deadline, "training did not reach step 25 within 300 s"
        time.sleep(0.5)
    # What a preemption or an approaching time limit does: USR2 to the job's processes.
    subprocess.run(["scancel", "--signal=USR2", train_job], env=slurm_env, check=True)
    jobs = [j["job_id"] for j in ledger(sweep_dir)]
    states = wait_for_jobs(slurm_env, jobs)
    assert set(states.values()) == {"COMPLETED"}, states
    attempts = [
        json.loads(ln)
        for ln in (run_dir / "logs" / "train_attempts.jsonl").read_text().splitlines()
    ]
    stopped = [a for a in attempts if a["outcome"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] % 19 != 0  # mid-epoch: 19 steps an epoch
    assert attempts[-1]["outcome"] == "completed" and attempts[-1]["restart"] == 1
    records = list((run_dir / "logs").glob("train_*.*_rank0.json"))
    assert len(records) == 2  # one environment record per attempt, none overwritten
    (ref_dir,) = (tmp_path / "ref" / "single" / "runs").iterdir()
    a = torch.load(ref_dir / "checkpoints" / "final.pt", weights_only=True)["model"]
    b = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert ref_dir.name == run_dir.name and all(torch.equal(a[k], b[k]) for k in a)


def test_beyond_max_requeues_the_task_stops_and_the_next_launch_resumes(slurm_env, tmp_path):
    args = [
        "sweep=single",
        f"root={tmp_path}",
        *PROFILE,
        "model.width=8",
        "model.latent_dim=16",
        "train.epochs=3",
        "train.batch_size=50",
        "cluster.max_requeues=0",
        "eval.ood_sets=[digits_ood]",
    ]
    assert launch(slurm_env, *args).returncode == 0
    sweep_dir = tmp_path / "single"
    run_dir = _run_dir(sweep_dir)
    deadline = time.time() + 300
    while (
        not list((run_dir / "logs").glob("metrics.csv"))
        or len((run_dir / "logs" / "metrics.csv").read_text().splitlines()) < 5
    ):
        assert time.time() < deadline
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", _train_job(sweep_dir)], env=slurm_env, check=True)
    wait_for_jobs(slurm_env, [j["job_id"] for j in ledger(sweep_dir)])
    status = launch(slurm_env, "sweep.name=single", f"root={tmp_path}", "mode=status").stdout
    assert "RequeueLimitError: beyond cluster.max_requeues=0" in status, status
    one = launch(
        slurm_env, "sweep.name=single", f"root={tmp_path}", "mode=status", f"runs=[{run_dir.name}]"
    ).stdout
    assert "hpc.stages.RequeueLimitError: beyond cluster.max_requeues=0" in one, one
    again = launch(slurm_env, *args)
    assert again.returncode == 0 and "train: resume from step" in again.stdout
    assert "RequeueLimitError" in again.stdout
    states = wait_for_jobs(slurm_env, [j["job_id"] for j in ledger(sweep_dir)[-4:]])
    assert set(states.values()) == {"COMPLETED"}, states


def test_out_of_memory_is_relaunched_with_more_memory(slurm_env, tmp_path):
    # The cluster kills a step above its --mem. 300M is too little for a torch process; the
    # relaunch asks for 4x (cluster.oom_mem_factor) up to cluster.max_mem.
    args = [
        "sweep=single",
        f"root={tmp_path}",
        *PROFILE,
        *TINY,
        "cluster.mem=300M",
        "cluster.eval_mem=2000M",
        "cluster.oom_mem_factor=4",
        "cluster.max_mem=3000M",
    ]
    assert launch(slurm_env, *args).returncode == 0
    sweep_dir = tmp_path / "single"
    wait_for_jobs(slurm_env, [j["job_id"] for j in ledger(sweep_dir)])
    status = launch(slurm_env, "sweep.name=single", f"root={tmp_path}", "mode=status").stdout
    assert "out of memory (asked for 300M)" in status
    again = launch(slurm_env, *args)
    assert again.returncode == 0, again.stderr
    assert (
        "train: resubmit with mem=1200M (x4 after running out of memory with 300M" in again.stdout
    )
    new = ledger(sweep_dir)[-5:]
    assert new[0]["stage"] == "train" and new[0]["params"]["mem"] == "1200M"
    states = wait_for_jobs(slurm_env, [j["job_id"] for j in new])
    assert set(states.values()) == {"COMPLETED"}, states


def test_a_pending_reason_and_packed_runs_with_one_failing(slurm_env, tmp_path):
    # Two runs packed in one task, one made to fail: the other trains and is evaluated.
    args = [
        "sweep=single",
        f"root={tmp_path}",
        *PROFILE,
        *TINY,
        "cluster.runs_per_task=2",
        "cluster.cpus_per_task=2",
        "sweep.points=[{model.beta:1.0},{model.beta:2.0,train.debug_nan_at_step:2}]",
    ]
    out = launch(slurm_env, *args)
    assert out.returncode == 0 and "train: 1 task(s), 2 runs per task" in out.stdout
    sweep_dir = tmp_path / "single"
    jobs = ledger(sweep_dir)
    states = wait_for_jobs(slurm_env, [j["job_id"] for j in jobs])
    assert states[f"{jobs[0]['job_id']}"] == "COMPLETED", states
    good, bad = jobs[0]["tasks"][0]["runs"]
    assert (sweep_dir / "runs" / good / "checkpoints" / "final.pt").exists()
    assert list((sweep_dir / "runs" / good / "eval").glob("final-scores-*/digits__*.h5"))
    status = launch(slurm_env, "sweep.name=single", f"root={tmp_path}", "mode=status").stdout
    (bad_row,) = [ln for ln in status.splitlines() if ln.startswith(bad)]
    assert "train failed" in bad_row and "NonFiniteLossError" in bad_row
    # A job that cannot start yet shows Slurm's reason.
    later = launch(
        slurm_env,
        "sweep=single",
        f"root={tmp_path}/later",
        *PROFILE,
        *TINY,
        "+cluster.extra_sbatch={begin:now+1hour}",
    )
    assert later.returncode == 0, later.stderr
    time.sleep(6)
    st = launch(slurm_env, "sweep.name=single", f"root={tmp_path}/later", "mode=status").stdout
    assert "train pending" in st and "pending: BeginTime" in st
    assert (
        launch(slurm_env, "sweep.name=single", f"root={tmp_path}/later", "mode=cancel").returncode
        == 0
    )


def test_thirty_tiny_runs_in_chunks_every_shard_and_row_present(slurm_env, tmp_path):
    # The CI-sized version of docs/reliability.md's load measurement, packed two runs a task
    # to keep CI short: 15 tasks a stage, so MaxArraySize=11 splits each stage into 2 chunks;
    # every task completes and every run is summarised.
    seeds = ",".join(str(s) for s in range(30))
    args = [
        "sweep=single",
        f"root={tmp_path}",
        *PROFILE,
        *TINY,
        "sweep.points=[]",
        f"+sweep.axes={{train.seed:[{seeds}]}}",
        "eval.pgd_steps=0",
        "cluster.array_parallelism=4",
        "train.val_every_epochs=0",
        "cluster.runs_per_task=2",
        "cluster.cpus_per_task=2",
    ]
    start = time.time()
    out = launch(slurm_env, *args)
    assert out.returncode == 0, out.stderr
    sweep_dir = tmp_path / "single"
    jobs = ledger(sweep_dir)
    train = [j for j in jobs if j["stage"] == "train"]
    assert [len(j["tasks"]) for j in train] == [11, 4]
    assert all(len(t["runs"]) == 2 for j in train for t in j["tasks"])
    assert len(jobs) == 2 * (1 + 3) + 1  # train + 3 eval arrays per chunk, one aggregate
    states = wait_for_jobs(slurm_env, [j["job_id"] for j in jobs], timeout=1500)
    assert len(states) == 15 * 4 + 1 and set(states.values()) == {"COMPLETED"}, states
    rows = (sweep_dir / "summary" / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 30 and all(",ok," in r for r in rows)
    shards = list(sweep_dir.glob("runs/*/eval/*/*.h5"))
    assert len(shards) == 30 * (3 + 1)  # 3 sets' scores, the test set's attacks
    print(f"30 runs: {time.time() - start:.0f} s wall, {len(jobs)} sbatch calls")
