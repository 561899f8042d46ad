"""Every job runs the code that was submitted, and no launch steps on another (hpc.snapshot,
hpc.lock, hpc.ledger's intents and adoption), through launch.py on the local Slurm cluster.

The launches run from a copy of the project's code (a "checkout" under tmp_path) that the tests
edit while jobs wait, as a researcher keeps working in the checkout the sweep was launched from.
The edit makes every provenance record (shard attributes, the environment record each task
writes) carry ``edited``: a task that imports the checkout shows it, one that imports its
snapshot does not.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import pytest
import torch

from hpc import snapshot
from tests.test_slurm_e2e import PROFILE, TINY, _cluster_env, ledger, wait_for_jobs

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]
EDIT = """

_unedited_record = record


def record():
    return {**_unedited_record(), "edited": "yes"}
"""


@pytest.fixture(scope="module")
def slurm_env():
    return _cluster_env()


def checkout(tmp_path: Path) -> Path:
    """A copy of the project's code, as a researcher's working tree."""
    co = tmp_path / "checkout"
    for part in snapshot.PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, co / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            co.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, co / part)
    return co


def edit(co: Path) -> None:
    path = co / "dhm" / "core" / "provenance.py"
    path.write_text(path.read_text() + EDIT)


def launch_from(co: Path, env: dict[str, str], *args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch.py", *args]
    out = subprocess.run(cmd, cwd=co, env=env, capture_output=True, text=True, timeout=600, **kw)
    print(out.stdout[-6000:], out.stderr[-3000:])
    return out


def records(sweep: Path) -> list[dict]:
    """Every environment record the sweep's tasks wrote (train ranks, packed children, evals)."""
    return [json.loads(p.read_text()) for p in sweep.glob("runs/*/logs/*_rank*.json")]


def shard_attrs(sweep: Path) -> list[dict]:
    out = []
    for path in sweep.glob("runs/*/eval/*/*.h5"):
        with h5py.File(path, "r") as f:
            out.append(dict(f.attrs))
    return out


def signalling_sbatch(tmp_path: Path, env: dict[str, str], signal_name: str) -> dict[str, str]:
    """``env`` with an sbatch first on PATH that runs the real one, then sends ``signal_name``
    to its caller (the launch): a launch killed, or Ctrl-C'd, right after an sbatch call."""
    shim = tmp_path / "bin"
    shim.mkdir()
    real = shutil.which("sbatch", path=env["PATH"])
    (shim / "sbatch").write_text(
        "#!/bin/bash\n"
        f'if [[ " $* " == *" --test-only "* ]]; then exec {real} "$@"; fi\n'
        f'{real} "$@"; rc=$?\nkill -{signal_name} $PPID\nexit $rc\n'
    )
    (shim / "sbatch").chmod(0o755)
    return {**env, "PATH": f"{shim}:{env['PATH']}"}


def scontrol(env: dict[str, str], *args: str) -> None:
    subprocess.run(["scontrol", *args], env=env, check=True, capture_output=True)


def train_tasks(env: dict[str, str], name: str) -> list[str]:
    """Every train array task of jobs named dhm-<name>-train, queued (squeue, held ones too)
    or ended (sacct), once each."""
    job = f"dhm-{name}-train"
    queued = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "--name", job], env=env,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    ended = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID", "--name", job, "-S", "now-2hours"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sorted({t for t in (queued + ended).split() if t})


def test_an_edit_in_the_checkout_does_not_reach_submitted_tasks(slurm_env, tmp_path):
    co = checkout(tmp_path)
    name = f"snap{uuid.uuid4().hex[:6]}"
    points = "sweep.points=[{model.beta:1.0},{model.beta:2.0}]"
    args = [f"root={tmp_path}/out", *PROFILE, *TINY, "sweep=single", points]
    first = launch_from(co, slurm_env, *args, f"sweep.name={name}", "cluster.runs_per_task=2",
                        "cluster.cpus_per_task=2",
                        "+cluster.extra_sbatch={hold:true}")  # fmt: skip
    assert first.returncode == 0, first.stderr
    sweep = tmp_path / "out" / name
    (code_dir,) = (sweep / "code").iterdir()
    assert not snapshot.problems(code_dir) and f"wrote snapshot {code_dir}" in first.stdout
    jobs = [j["job_id"] for j in ledger(sweep)]
    assert all(j["code"] == code_dir.name for j in ledger(sweep))
    edit(co)  # while every job waits (held)
    scontrol(slurm_env, "release", ",".join(jobs))
    states = wait_for_jobs(slurm_env, jobs)
    assert set(states.values()) == {"COMPLETED"}, states
    recs, attrs = records(sweep), shard_attrs(sweep)
    # packed: both runs trained in one task, each in its own child process
    assert {r["stage"] for r in recs} >= {"train", "eval-digits", "eval-digits_ood"}
    assert len({r["slurm_job_id"] for r in recs if r["stage"] == "train"}) == 1
    assert len(attrs) >= 6 and len(recs) >= 8
    assert all("edited" not in r and r["code"] == code_dir.name for r in recs), recs
    assert all("edited" not in a and a["code"] == code_dir.name for a in attrs)
    final = torch.load(next(sweep.glob("runs/*/checkpoints/final.pt")), weights_only=False)
    assert final["code"] == code_dir.name
    rows = (sweep / "summary" / "results.csv").read_text()
    assert code_dir.name in rows  # the summary names the runs' snapshot ...
    manifest = json.loads((sweep / "summary" / "manifest.json").read_text())
    assert manifest["code"] == code_dir.name  # ... and the aggregate job ran from it
    status = launch_from(co, slurm_env, f"sweep.name={name}", f"root={tmp_path}/out",
                         "mode=status")  # fmt: skip
    assert status.returncode == 0 and status.stdout.count(code_dir.name[:8]) >= 2, status.stdout

    # Positive control: a launch after the edit runs the edited code, from a new snapshot.
    again = launch_from(co, slurm_env, *args, f"sweep.name={name}b")
    assert again.returncode == 0, again.stderr
    sweep_b = tmp_path / "out" / f"{name}b"
    wait_for_jobs(slurm_env, [j["job_id"] for j in ledger(sweep_b)])
    (code_b,) = (sweep_b / "code").iterdir()
    assert code_b.name != code_dir.name
    assert all(r.get("edited") == "yes" and r["code"] == code_b.name for r in records(sweep_b))
    assert all(a.get("edited") == "yes" for a in shard_attrs(sweep_b))


def test_a_requeued_run_resumes_under_its_own_snapshot_bit_identical(slurm_env, tmp_path):
    # The edit lands while the first attempt trains; USR2 then requeues it. The second attempt
    # imports the snapshot (no edit) and ends bit-identical to an uninterrupted run.
    co = checkout(tmp_path)
    args = ["sweep=single", *PROFILE, "model.width=8", "model.latent_dim=16", "train.epochs=3",
            "train.batch_size=50", "train.checkpoint_every_steps=0",
            "eval.ood_sets=[digits_ood]", "train.log_every_steps=1"]  # fmt: skip
    ref = launch_from(co, slurm_env, *args, f"root={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr
    first = launch_from(co, slurm_env, *args, f"root={tmp_path}/cut")
    assert first.returncode == 0, first.stderr
    sweep = tmp_path / "cut" / "single"
    (train,) = [j["job_id"] for j in ledger(sweep) if j["stage"] == "train"]
    (run_dir,) = [sweep / "runs" / r for r in ledger(sweep)[0]["tasks"][0]["runs"]]
    metrics = run_dir / "logs" / "metrics.csv"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 25):
        assert time.time() < deadline, "training did not reach step 25 within 300 s"
        time.sleep(0.5)
    edit(co)
    subprocess.run(["scancel", "--signal=USR2", train], env=slurm_env, check=True)
    states = wait_for_jobs(slurm_env, [j["job_id"] for j in ledger(sweep)])
    assert set(states.values()) == {"COMPLETED"}, states
    (code_dir,) = (sweep / "code").iterdir()
    attempts = sorted(run_dir.glob("logs/train_*_rank0.json"))
    assert len(attempts) == 2  # the first attempt and its requeue
    assert all(json.loads(p.read_text())["code"] == code_dir.name for p in attempts)
    assert all("edited" not in json.loads(p.read_text()) for p in attempts)
    (ref_dir,) = (tmp_path / "ref" / "single" / "runs").iterdir()
    a = torch.load(ref_dir / "checkpoints" / "final.pt", weights_only=False)
    b = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)
    assert b["code"] == code_dir.name and ref_dir.name == run_dir.name
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_concurrent_launches_submit_every_training_once(slurm_env, tmp_path):
    for trial in range(2):
        name = f"conc{uuid.uuid4().hex[:6]}"
        args = [sys.executable, "launch.py", f"root={tmp_path}", *PROFILE, *TINY, "sweep=single",
                f"sweep.name={name}", "sweep.points=[{model.beta:1.0},{model.beta:2.0}]",
                "+cluster.extra_sbatch={hold:true}"]  # fmt: skip
        procs = [
            subprocess.Popen(
                args,
                cwd=REPO,
                env=slurm_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for _ in range(4)
        ]
        outs = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, outs
        jobs = [j["job_id"] for j in ledger(tmp_path / name)]
        try:
            tasks = train_tasks(slurm_env, name)
            assert sorted(t.split("_")[1] for t in tasks) == ["0", "1"], (trial, tasks, outs)
            assert sum("submitted train" in out for out, _ in outs) == 1
        finally:
            subprocess.run(["scancel", *jobs], env=slurm_env, check=False)


def test_a_killed_launch_leaves_jobs_the_next_command_adopts(slurm_env, tmp_path):
    # SIGKILL right after the first sbatch call answered: the train array is queued, the ledger
    # holds only its intent, and submitit never renamed the tasks' pickles.
    name = f"kill{uuid.uuid4().hex[:6]}"
    args = [f"root={tmp_path}", *PROFILE, *TINY, "sweep=single", f"sweep.name={name}",
            "sweep.points=[{model.beta:1.0},{model.beta:2.0}]"]  # fmt: skip
    env = signalling_sbatch(tmp_path, slurm_env, "KILL")
    killed = launch_from(REPO, env, *args)
    assert killed.returncode == -signal.SIGKILL
    sweep = tmp_path / name
    entries = [json.loads(x) for x in (sweep / "ledger.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["intent"] and not ledger(sweep)
    status = launch_from(REPO, slurm_env, f"sweep.name={name}", f"root={tmp_path}", "mode=status")
    assert status.returncode == 0 and "adopted 1 job(s)" in status.stdout
    assert "not started" not in status.stdout
    (adopted,) = ledger(sweep)
    assert adopted["adopted"] and adopted["stage"] == "train"
    again = launch_from(REPO, slurm_env, *args)
    assert again.returncode == 0, again.stderr
    assert "submitted train" not in again.stdout
    jobs = [j["job_id"] for j in ledger(sweep)]
    states = wait_for_jobs(slurm_env, jobs)
    # the orphaned tasks found their pickles themselves, trained, and trained once each
    assert states[f"{adopted['job_id']}_0"] == "COMPLETED", states
    assert sorted(t.split("_")[1] for t in train_tasks(slurm_env, name)) == ["0", "1"]
    assert len(list(sweep.glob("runs/*/checkpoints/final.pt"))) == 2


def test_ctrl_c_during_submission_cancels_what_was_submitted_in_one_line(slurm_env, tmp_path):
    name = f"intr{uuid.uuid4().hex[:6]}"
    env = signalling_sbatch(tmp_path, slurm_env, "INT")
    out = launch_from(REPO, env, f"root={tmp_path}", *PROFILE, *TINY, "sweep=single",
                      f"sweep.name={name}")  # fmt: skip
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "interrupted (SIGINT)" in err[0] and "Traceback" not in out.stderr
    (train,) = ledger(tmp_path / name)
    states = wait_for_jobs(slurm_env, [train["job_id"]], timeout=120)
    assert set(states.values()) == {"CANCELLED"}, states


def test_a_replan_leaves_dropped_runs_alone_and_status_lists_them(slurm_env, tmp_path):
    name = f"replan{uuid.uuid4().hex[:6]}"
    base = [f"root={tmp_path}", *PROFILE, *TINY, "sweep=single", f"sweep.name={name}",
            "+cluster.extra_sbatch={hold:true}"]  # fmt: skip
    two = launch_from(REPO, slurm_env, *base, "sweep.points=[{model.beta:1.0},{model.beta:2.0}]")
    assert two.returncode == 0, two.stderr
    sweep = tmp_path / name
    jobs = [j["job_id"] for j in ledger(sweep)]
    plan = json.loads((sweep / "plan.json").read_text())
    dropped = plan["runs"][1]["run_id"]
    try:
        one = launch_from(REPO, slurm_env, *base, "sweep.points=[{model.beta:1.0}]", "replan=true")
        assert one.returncode == 0, one.stderr
        status = launch_from(REPO, slurm_env, f"sweep.name={name}", f"root={tmp_path}",
                             "mode=status")  # fmt: skip
        assert status.returncode == 0
        text = status.stdout.split("outside the current grid")[1]
        # its held train task, as sacct has it by now or as just submitted: never "not started"
        row = re.search(rf"{dropped}  (train pending|training)  (PENDING|SUBMITTED)", text)
        assert row and "model.beta=2.0" in text, status.stdout
        assert train_tasks(slurm_env, name)  # still queued: nothing cancelled it
        squeue = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", jobs[0]], env=slurm_env,
                                capture_output=True, text=True).stdout.split()  # fmt: skip
        assert f"{jobs[0]}_1" in squeue
        cancel = launch_from(REPO, slurm_env, f"sweep.name={name}", f"root={tmp_path}",
                             "mode=cancel", f"runs=[{dropped}]")  # fmt: skip
        assert cancel.returncode == 0 and f"{jobs[0]}_1" in cancel.stdout, cancel.stdout
    finally:  # every held job of both launches
        everything = [j["job_id"] for j in ledger(sweep)]
        subprocess.run(["scancel", *everything], env=slurm_env, check=False)
