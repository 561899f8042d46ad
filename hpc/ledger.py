"""What exists for a sweep, on disk and in Slurm, and so what is left to do.

On disk: a run is trained when ``checkpoints/final.pt`` exists, resumable from its newest
``step_*.pt``; a set is evaluated when its shard files cover every image. In Slurm: the
sweep's ``ledger.jsonl`` records every submitted array (stage, job id, what each task does);
sacct says what each task is doing, so a relaunch never submits a second copy of a pending or
running task.
"""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py

from dhm import checkpoint as ckpt_io
from dhm.evaluate import eval_id, eval_sets, shard_eval_id
from hpc.slurm import ACTIVE_STATES, job_states
from hpc.sweep import Run, sweep_dir

_SHARD_RE = re.compile(r"^(?P<set>.+)__(?P<start>\d{7})-(?P<stop>\d{7})\.h5$")


def ledger_path(cfg: Any) -> Path:
    return sweep_dir(cfg) / "ledger.jsonl"


def record_submission(
    cfg: Any, stage: str, job_id: str, tasks: list[dict[str, Any]], dependency: str | None
) -> None:
    path = ledger_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stage": stage, "job_id": job_id,
             "tasks": tasks, "dependency": dependency}  # fmt: skip
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def submissions(cfg: Any) -> list[dict[str, Any]]:
    path = ledger_path(cfg)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class TaskRecord:
    job_id: str  # e.g. 123_4 for array task 4 of job 123
    state: str  # sacct state, or UNKNOWN
    log: str  # submitit's stdout file


def latest_tasks(cfg: Any, query: bool = True) -> dict[tuple[str, str, str], TaskRecord]:
    """{(stage, run_id, set or ''): the newest task that did it}, with its Slurm state."""
    subs = submissions(cfg)
    states = job_states([s["job_id"] for s in subs]) if (subs and query) else {}
    folder = sweep_dir(cfg) / "slurm"
    latest: dict[tuple[str, str, str], TaskRecord] = {}
    now = datetime.now()
    for sub in subs:
        array = len(sub["tasks"]) > 1
        age = (now - datetime.fromisoformat(sub["time"])).total_seconds()
        # sacct lags a fresh submission (and slurmdbd may be slow): a job it does not know yet
        # counts as in flight for 10 minutes, so a quick relaunch cannot submit it twice.
        unknown = "SUBMITTED" if query and age < 600 else "UNKNOWN"
        for i, task in enumerate(sub["tasks"]):
            if task.get("noop"):
                continue
            key = (sub["stage"].split(":")[0], task.get("run_id", ""), task.get("set", ""))
            task_id = i if array else None
            state = states.get((sub["job_id"], task_id), unknown)
            name = f"{sub['job_id']}_{i}" if array else sub["job_id"]
            latest[key] = TaskRecord(name, state, str(folder / f"{name}_0_log.out"))
    return latest


def set_shards(eval_dir: Path, set_name: str) -> list[Path]:
    return [
        p
        for p in sorted(eval_dir.glob(f"{set_name}__*.h5"))
        if (m := _SHARD_RE.match(p.name)) and m["set"] == set_name
    ]


def stale_shards(eval_dir: Path, set_name: str, current_eval_id: str) -> list[Path]:
    """Shards of a set written with other eval settings (another k, epsilon grid, split...)."""
    return [p for p in set_shards(eval_dir, set_name) if shard_eval_id(p) != current_eval_id]


def move_aside(run_dir: Path, paths: list[Path]) -> Path:
    """Move stale shards to ``<run_dir>/eval-stale/<time>/``: kept, but out of the merge."""
    target = run_dir / "eval-stale" / time.strftime("%Y%m%dT%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for path in paths:
        path.rename(target / path.name)
    return target


def set_complete(eval_dir: Path, set_name: str) -> bool:
    """True when the shard files of a set cover [0, set_size) without gaps."""
    spans = sorted(
        (int(m["start"]), int(m["stop"]), p)
        for p in eval_dir.glob(f"{set_name}__*.h5")
        if (m := _SHARD_RE.match(p.name)) and m["set"] == set_name
    )
    if not spans:
        return False
    try:
        with h5py.File(spans[0][2], "r") as f:
            size = int(f.attrs["set_size"])
    except (OSError, KeyError):
        return False
    covered = 0
    for start, stop, _ in spans:
        if start != covered:
            return False
        covered = stop
    return covered == size


@dataclass
class RunState:
    run: Run
    trained: bool
    resume_step: int | None
    eval_done: dict[str, bool]  # set name -> complete
    roles: dict[str, str]  # set name -> id | ood
    stale: dict[str, list[Path]] = field(default_factory=dict)  # set -> shards of old settings
    tasks: dict[tuple[str, str], TaskRecord] = field(default_factory=dict)  # (stage, set)

    def active(self, stage: str, set_name: str | None = "") -> TaskRecord | None:
        """The task of ``stage`` (for ``set_name``; None: any set) that is in flight, if any."""
        for (task_stage, task_set), task in self.tasks.items():
            if task_stage == stage and set_name in (None, task_set):
                if task.state in ACTIVE_STATES:
                    return task
        return None

    def newest_task(self) -> TaskRecord | None:
        """The most recently submitted task of this run (highest job id)."""
        return max(self.tasks.values(), key=lambda t: int(t.job_id.split("_")[0]), default=None)


def run_states(cfg: Any, runs: list[Run], query_slurm: bool) -> list[RunState]:
    tasks = latest_tasks(cfg, query=query_slurm)
    out = []
    for run in runs:
        ckpt_dir = run.run_dir / "checkpoints"
        newest = ckpt_io.step_checkpoints(ckpt_dir)
        sets = eval_sets(run.cfg)
        state = RunState(
            run=run,
            trained=(ckpt_dir / ckpt_io.FINAL_NAME).exists(),
            resume_step=newest[-1][0] if newest else None,
            eval_done={name: set_complete(run.run_dir / "eval", name) for name, _ in sets},
            roles=dict(sets),
        )
        current = eval_id(run.cfg)
        for name, _ in sets:
            old = stale_shards(run.run_dir / "eval", name, current)
            if old:
                state.stale[name] = old
                state.eval_done[name] = False
        for (stage, run_id, set_name), task in tasks.items():
            if run_id == run.run_id:
                state.tasks[(stage, set_name)] = task
        out.append(state)
    return out


def progress(run_dir: Path) -> tuple[str, str]:
    """(epoch/step reached, last loss) from the run's metrics.csv, '-' when there is none."""
    path = run_dir / "logs" / "metrics.csv"
    if not path.exists():
        return "-", "-"
    last = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            last = row
    if last is None:
        return "-", "-"
    return f"{last['epoch']}/{last['step']}", f"{float(last['loss']):.4g}"
