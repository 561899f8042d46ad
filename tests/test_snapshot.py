"""The code snapshot, the sweep lock and the orphan-safe pickles, without a cluster (the
cluster tests are tests/test_launch_safety.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dhm.core.config import ConfigError
from hpc import ledger, lock, snapshot
from hpc.cli import compose_config
from hpc.launcher import _adopt, _assign_code
from hpc.plan import Plan
from hpc.slurm import render_script
from hpc.task import claim_pickle
from tests.helpers.fake_slurm import install
from tests.test_launch_safety import checkout

REPO = Path(__file__).resolve().parents[1]


def test_snapshot_is_by_content_reused_and_damage_is_named(tmp_path):
    co = checkout(tmp_path)
    code = snapshot.read(co)
    assert code.id == snapshot.read(REPO).id  # the same files, the same id
    path, new = code.write(tmp_path / "sweep", co)
    assert new and not snapshot.problems(path)
    assert code.write(tmp_path / "sweep", co) == (path, False)
    assert not list(path.rglob("__pycache__")) and (path / "configs").is_dir()
    info = json.loads((path / "code.json").read_text())
    assert info["id"] == code.id and set(info["files"]) == set(code.files)
    (co / "hpc" / "new_module.py").write_text("X = 1\n")  # an untracked source file counts
    assert snapshot.read(co).id != code.id
    (path / "hpc" / "lock.py").write_text("# changed\n")
    assert "hpc/lock.py was changed" in snapshot.problems(path)
    with pytest.raises(Exception, match="code=latest runs=\\[abc\\]"):
        snapshot.check_resumable(tmp_path / "sweep", "abc", code.id)


def test_the_sweep_lock_keeps_a_second_command_out_and_names_the_holder(tmp_path):
    sweep = tmp_path / "root" / "s"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from hpc import lock\n"
         f"with lock.held(Path({str(sweep)!r}), 'launch.py mode=run', 5):\n"
         "    print('held', flush=True); time.sleep(3)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(lock.SweepLocked, match=r"busy: launch.py mode=run \(pid \d+"):
        with lock.held(sweep, "second", 0.5):
            pass
    start = time.monotonic()
    with lock.held(sweep, "third", 10):  # waits for the holder to let go (it sleeps 3 s)
        assert time.monotonic() - start > 1.5
    holder.wait()
    # a folder the lock had to create, left empty, goes again: a refused first launch
    fresh = tmp_path / "new" / "sweep"
    with lock.held(fresh, "x", 1):
        assert fresh.is_dir()
    assert not (tmp_path / "new").exists()


def test_a_task_claims_its_pending_pickle_when_the_launch_did_not(tmp_path):
    (tmp_path / "pending_tok_3.pkl").write_text("x")
    env = {"DHM_TOKEN": "tok", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}
    claim_pickle(str(tmp_path), env)
    assert (tmp_path / "77_3_submitted.pkl").read_text() == "x"
    claim_pickle(str(tmp_path), env)  # already claimed (another rank): nothing happens
    (tmp_path / "pending_tok_0.pkl").write_text("y")
    claim_pickle(str(tmp_path), {"DHM_TOKEN": "tok", "SLURM_JOB_ID": "78"})
    assert (tmp_path / "78_submitted.pkl").read_text() == "y"


def test_sbatch_scripts_start_tasks_from_the_snapshot_by_path(tmp_path):
    cfg = compose_config(["cluster=slurm", f"root={tmp_path}"])
    text = render_script(cfg, tmp_path / "slurm", {"job_name": "x"}, 2, tmp_path / "code" / "ab")
    assert f"-u {tmp_path}/code/ab/hpc/task.py {tmp_path}/slurm" in text
    assert "-m submitit" not in text


def test_code_must_be_launched_or_latest(tmp_path):
    out = subprocess.run([sys.executable, "launch.py", "code=newest", f"root={tmp_path}"],
                         cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "code='newest' is not allowed: launched or latest" in out.stderr
    assert not list(tmp_path.iterdir())


def _resuming(tmp_path: Path, code_id: str):
    """A plan in which one run resumes (its last attempt ran under ``code_id``) and one is new."""
    sweep = tmp_path / "sweep"
    runs, states = [], []
    for rid, step, code in (("aaa", 40, code_id), ("bbb", None, "")):
        run_dir = sweep / "runs" / rid
        (run_dir / "logs").mkdir(parents=True)
        if code:
            record = run_dir / "logs" / "train_7_0.0_rank0.json"
            record.write_text(json.dumps({"code": code}))
            (run_dir / "config.yaml").write_text("written by the old code\n")
        run = SimpleNamespace(run_id=rid, run_dir=run_dir)
        runs.append(run)
        states.append(SimpleNamespace(run=run, resume_step=step))
    plan = Plan(states=states, actions={"aaa": [], "bbb": []}, train=[(r, None) for r in runs])
    return sweep, plan


def test_a_resuming_run_keeps_its_snapshot_unless_told_and_a_lost_one_is_named(tmp_path):
    co = checkout(tmp_path)
    old = snapshot.read(co)
    (co / "hpc" / "extra.py").write_text("Y = 2\n")  # the checkout moved on
    new = snapshot.read(co)
    sweep, plan = _resuming(tmp_path, old.id)
    old.write(sweep, co)
    cfg = SimpleNamespace(root=str(tmp_path), sweep=SimpleNamespace(name="sweep"), code="launched")
    _assign_code(cfg, plan, new)
    assert plan.code_of(plan.train[0][0]) == sweep / "code" / old.id  # resumes under its own
    assert plan.code_of(plan.train[1][0]) == sweep / "code" / new.id  # a new run: the launch's
    assert f"resumes under its snapshot {old.id}" in plan.actions["aaa"][0]
    # it gets the config its own code wrote (a key added since would not load there)
    assert plan.resume_yaml == {"aaa": "written by the old code\n"}
    # code=latest moves it
    sweep, plan = _resuming(tmp_path / "b", old.id)
    old.write(sweep, co)
    _assign_code(SimpleNamespace(**{**vars(cfg), "root": str(tmp_path / "b"), "code": "latest"}),
                 plan, new)  # fmt: skip
    assert plan.code_of(plan.train[0][0]) == sweep / "code" / new.id
    assert f"moves from snapshot {old.id} to {new.id}" in plan.actions["aaa"][0]
    # a lost snapshot is named with the fix
    sweep, plan = _resuming(tmp_path / "c", old.id)
    with pytest.raises(ConfigError, match=rf"run aaa resumes under its code snapshot {old.id}.*"
                       r"code=latest runs=\[aaa\]"):  # fmt: skip
        _assign_code(SimpleNamespace(**{**vars(cfg), "root": str(tmp_path / "c")}), plan, new)


def test_an_unrecorded_sbatch_call_is_waited_for_then_settled(tmp_path, monkeypatch):
    # A launch killed during sbatch left an intent; the queue shows no job of it (yet). A
    # launch refuses while that sbatch call may still be answering, and once it is old enough
    # the intent is settled, so later commands stop searching for it.
    fakes = tmp_path / "bin"
    fakes.mkdir()
    monkeypatch.setenv("PATH", f"{install(fakes)}:{os.environ['PATH']}")
    cfg = SimpleNamespace(root=str(tmp_path), sweep=SimpleNamespace(name="s"))
    ledger.record_intent(cfg, "train", [{"runs": ["aaa"]}], None, {}, "")
    with pytest.raises(ledger.SlurmError, match="stopped .* during its sbatch call for the train"):
        _adopt(cfg)
    path = ledger.ledger_path(cfg)
    old = json.loads(path.read_text())
    old["time"] = "2020-01-01T00:00:00"
    path.write_text(json.dumps(old) + "\n" + '{"kind": "submission", "job_i')  # and a cut line
    _adopt(cfg)  # nothing found, old: settled
    assert ledger.unrecorded_intents(cfg) == [] and ledger.submissions(cfg) == []
    assert [e["kind"] for e in ledger.entries(cfg)] == ["intent", "intent_closed"]
