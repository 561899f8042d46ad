"""What a launch will do: each run's state (disk and Slurm), an action per stage with its
reason, and the arrays to submit.

The next launch acts on why each task ended (docs/reliability.md):

* TIMEOUT, PREEMPTED, NODE_FAIL, BOOT_FAIL, DEADLINE, CANCELLED, a RequeueLimitError (more
  time-outs or preemptions than cluster.max_requeues) or a collective's error (a peer rank
  died): resume from the newest checkpoint. A node on which the same run failed twice
  (NODE_FAIL) is excluded for it.
* OUT_OF_MEMORY: resubmit with cluster.oom_mem_factor times the memory it had, up to
  cluster.max_mem; without a max_mem, or at it, refuse and say so.
* A Python exception (or another non-zero exit): not retried unless ``retry_failed=true``; a
  deterministic bug must not burn GPU-hours on every relaunch.

Runs that need the same resources (memory, excluded nodes) share arrays; an array holds at most
MaxArraySize tasks (a bigger stage is split into chunks, each eval chunk aftercorr on its own
train chunk); a task holds ``cluster.runs_per_task`` runs. The number of sbatch calls stays
constant per resource class and chunk, whatever the grid size.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dhm.core import checkpoint as ckpt_io
from dhm.core import layout
from hpc import ledger
from hpc.file_facts import FileFacts
from hpc.ledger import RESUME_STATES, Attempt
from hpc.schema import memory_mb, parse_time_minutes, runs_per_task
from hpc.slurm import ArraySpec, Resources, Yamls, stage_params, stage_resources
from hpc.sweep import Run, sweep_dir

# Exceptions that say the infrastructure failed, not the code: resumed like a node failure. A
# rank that died (killed, its node lost) surfaces in its peers as a collective's error.
RESUMABLE_EXCEPTIONS = (
    "RequeueLimitError",
    "DistBackendError",
    "DistNetworkError",
    "Connection closed by peer",
    "Connection reset by peer",
    "NCCL error",
    "ProcessGroupGloo",
    "ProcessGroupNCCL",
    "Gloo connectFullMesh failed",
)


@dataclass
class RunState:
    run: Run
    trained: bool
    final_problem: str | None  # final.pt exists but is truncated or corrupt
    resume_step: int | None  # newest complete step checkpoint (None when trained: no resume)
    bad_resume: Path | None  # the newest step checkpoint, when it is not complete
    eval_done: dict[str, bool]  # set name -> complete
    roles: dict[str, str]  # set name -> id | val | ood
    stale: dict[str, list[Path]] = field(default_factory=dict)  # set -> shards of old settings
    attempts: dict[tuple[str, str], list[Attempt]] = field(default_factory=dict)  # (stage, set)

    def last(self, stage: str, set_name: str = "") -> Attempt | None:
        found = self.attempts.get((stage, set_name))
        return found[-1] if found else None

    def active(self, stage: str, set_name: str | None = "") -> Attempt | None:
        """The attempt of ``stage`` (for ``set_name``; None: any set) that is in flight."""
        for (st, s), atts in self.attempts.items():
            if st == stage and set_name in (None, s) and atts[-1].active:
                return atts[-1]
        return None


def run_states(
    cfg: Any, runs: list[Run], query_slurm: bool, check_stale: bool = True
) -> list[RunState]:
    """Each run's state on disk (dhm answers: trained? evaluated?) and in Slurm (every attempt;
    sacct and squeue answer while the disk is read)."""
    return read_states(cfg, runs, query_slurm, check_stale)[0]


def read_states(
    cfg: Any, runs: list[Run], query_slurm: bool, check_stale: bool = True
) -> tuple[list[RunState], list[Attempt]]:
    """(``run_states``, every attempt the ledger lists: the aggregate job's too). A run's own
    attempts are attached on Slurm, or when Slurm is queried."""
    asked = ledger.ask(cfg) if query_slurm else None  # answering while the disk is read
    try:
        states = disk_states(cfg, runs, check_stale)
        everything = ledger.attempts(cfg, query=query_slurm, asked=asked)
    finally:
        if asked is not None:
            asked.close()
    attach(states, everything if query_slurm or cfg.cluster.name == "slurm" else [])
    return states, everything


def disk_states(cfg: Any, runs: list[Run], check_stale: bool = True) -> list[RunState]:
    """Each run's state on disk, without its Slurm attempts (``attach`` adds them)."""
    disk = layout.scan_runs([run.cfg.run_dir for run in runs])
    facts = FileFacts(sweep_dir(cfg))
    out = []
    for run in runs:
        files = disk[run.cfg.run_dir]
        ckpt_dir = os.path.join(run.cfg.run_dir, "checkpoints")
        final = os.path.join(ckpt_dir, ckpt_io.FINAL_NAME)
        has_final = ckpt_io.FINAL_NAME in files.checkpoints
        trained = has_final and facts.complete(final)
        good = bad = None
        if not trained and files.checkpoints:
            steps = ckpt_io.step_checkpoints(ckpt_dir, files.checkpoints)
            good = ckpt_io.newest_complete(ckpt_dir, files.checkpoints, facts.complete)
            bad = steps[-1][1] if steps and (good is None or steps[-1][0] != good[0]) else None
        sets = layout.eval_sets(run.cfg)
        eval_dir = os.path.join(run.cfg.run_dir, "eval")
        state = RunState(
            run=run,
            trained=trained,
            final_problem=None if trained or not has_final else "truncated or corrupt",
            resume_step=good[0] if good else None,
            bad_resume=bad,
            eval_done={
                name: bool(files.shards)
                and layout.set_complete(
                    eval_dir, name, layout.expected_size(run.cfg, name, role), files.shards
                )
                for name, role in sets
            },
            roles=dict(sets),
        )
        if check_stale and files.shards:
            current = layout.eval_id(run.cfg)
            for name, _ in sets:
                shards = layout.set_shards(eval_dir, name, files.shards)
                old = [path for *_, path in shards if facts.eval_id(path) != current]
                if old:
                    state.stale[name] = old
                    state.eval_done[name] = False
        out.append(state)
    facts.save()
    return out


def attach(states: list[RunState], atts: list[Attempt]) -> None:
    """Give each run state its attempts, by (stage, set), oldest first."""
    by_run: dict[str, dict[tuple[str, str], list[Attempt]]] = {}
    for a in atts:
        for rid in a.runs:
            by_run.setdefault(rid, {}).setdefault((a.stage, a.set_name), []).append(a)
    for st in states:
        st.attempts = by_run.get(st.run.run_id, {})


@dataclass
class Decision:
    go: bool  # submit this stage now
    line: str  # what and why, for the plan
    mem: str | None = None  # a raised memory request
    exclude: list[str] = field(default_factory=list)  # nodes to keep this run away from
    refused: bool = False  # needs the researcher (a failure not retried, OOM at its limit)


def _raised_memory(cfg: Any, a: Attempt, stage: str) -> Decision:
    c = cfg.cluster
    default = c.eval_mem if stage.startswith("eval") and c.eval_mem is not None else c.mem
    asked = a.params.get("mem") or default or (a.req_mem or "").rstrip("n").rstrip("c")
    if not asked:
        return Decision(
            False,
            f"{stage}: not resubmitted: ran out of memory (job {a.job_id}) "
            "and no memory request is known; set cluster.mem",
            refused=True,
        )
    have = memory_mb(asked, "cluster.mem")
    if c.max_mem is None:
        return Decision(
            False,
            f"{stage}: not resubmitted: ran out of memory with {asked} (job "
            f"{a.job_id}); set cluster.max_mem to let a relaunch raise it "
            f"x{c.oom_mem_factor:g}, or raise cluster.mem",
            refused=True,
        )
    cap = memory_mb(c.max_mem, "cluster.max_mem")
    new = min(int(have * c.oom_mem_factor), cap)
    if new <= have:
        return Decision(
            False,
            f"{stage}: not resubmitted: ran out of memory with {asked}, "
            f"already cluster.max_mem={c.max_mem}",
            refused=True,
        )
    return Decision(
        True,
        f"{stage}: resubmit with mem={new}M (x{c.oom_mem_factor:g} after "
        f"running out of memory with {asked} in job {a.job_id})",
        mem=f"{new}M",
    )


def _failed_nodes(atts: list[Attempt]) -> list[str]:
    """Nodes on which this run's train attempts (and their requeues) ended NODE_FAIL twice."""
    counts: dict[str, int] = {}
    for a in atts:
        for rec in [*a.history, a]:
            if rec.state == "NODE_FAIL" and rec.nodes:
                for node in re.split(r"[,\s]+", rec.nodes):
                    counts[node] = counts.get(node, 0) + 1
    return sorted(n for n, k in counts.items() if k >= 2 and n)


def decide(cfg: Any, st: RunState, stage: str, a: Attempt | None, start: str) -> Decision:
    """Whether to submit ``stage`` again after its last attempt ``a`` ended, and why."""
    if a is None or a.state in ("UNKNOWN", "COMPLETED"):
        why = "" if a is None else f"; job {a.job_id} ended {a.state}"
        return Decision(True, f"{stage}: {start}{why}")
    ended = f"job {a.job_id} ended {a.state}"
    if a.oom:
        return _raised_memory(cfg, a, stage)
    resumable = a.exception and any(name in a.reason for name in RESUMABLE_EXCEPTIONS)
    if a.state in RESUME_STATES or resumable:
        d = Decision(True, f"{stage}: {start} ({ended}: {a.reason})")
        if stage == "train":
            d.exclude = _failed_nodes(st.attempts.get(("train", ""), []))
            if d.exclude:
                d.line += f"; excluding node(s) {','.join(d.exclude)} (failed twice for it)"
        return d
    if cfg.retry_failed:
        return Decision(True, f"{stage}: {start}, retry_failed=true ({ended}: {a.reason})")
    return Decision(
        False,
        f"{stage}: not retried ({ended}: {a.reason}); fix the cause, or pass "
        "retry_failed=true to run it again",
        refused=True,
    )


@dataclass
class Plan:
    """What a launch will do: per run a list of lines, and the runs each stage takes."""

    states: list[RunState]
    actions: dict[str, list[str]] = field(default_factory=dict)  # run_id -> lines
    train: list[tuple[Run, Resources]] = field(default_factory=list)
    # (set, role) -> [(run, resources)]; a set can be in-distribution for some runs, OOD for others.
    eval_after_train: dict[tuple[str, str], list[Run]] = field(default_factory=dict)
    eval_now: dict[tuple[str, str], list[tuple[Run, Resources]]] = field(default_factory=dict)
    aggregate: bool = False
    aggregate_why: str = ""
    refused: list[str] = field(default_factory=list)  # run ids needing the researcher


def make_plan(
    cfg: Any, runs: list[Run], query_slurm: bool, all_runs: list[Run] | None = None
) -> Plan:
    """The plan for ``runs`` (a selection of ``all_runs``, the whole sweep, for the summary)."""
    states = run_states(cfg, runs, query_slurm=query_slurm)
    plan = Plan(states)
    train_r, eval_r = stage_resources(cfg, "train"), stage_resources(cfg, "eval")
    for st in states:
        rid, lines = st.run.run_id, []
        will_train = False
        if st.trained:
            lines.append("train: skip (checkpoints/final.pt exists)")
        elif (task := st.active("train")) is not None:
            lines.append(f"train: wait (job {task.job_id} is {task.state}: {task.reason})")
        else:
            start = (
                f"resume from step {st.resume_step}"
                if st.resume_step is not None
                else "from scratch (no checkpoint)"
            )
            if st.final_problem:
                start += " (checkpoints/final.pt is truncated or corrupt: it is set aside)"
            d = decide(cfg, st, "train", st.last("train"), start)
            lines.append(d.line)
            if d.go:
                will_train = True
                excl = ",".join(filter(None, [train_r.exclude, *d.exclude])) or None
                plan.train.append(
                    (
                        st.run,
                        Resources(
                            **{**train_r.__dict__, "mem": d.mem or train_r.mem, "exclude": excl}
                        ),
                    )
                )
            elif d.refused:
                plan.refused.append(rid)
        for set_name, done in st.eval_done.items():
            key = (set_name, st.roles[set_name])
            if set_name in st.stale and not st.active("eval", set_name):
                lines.append(
                    f"eval {set_name}: {len(st.stale[set_name])} shard(s) made with other "
                    "eval settings, moved to eval-stale/ before evaluating again"
                )
            if done:
                lines.append(f"eval {set_name}: skip (shards complete)")
            elif (task := st.active("eval", set_name)) is not None:
                lines.append(f"eval {set_name}: wait (job {task.job_id} is {task.state})")
            elif will_train:
                plan.eval_after_train.setdefault(key, []).append(st.run)
                lines.append(f"eval {set_name}: after its training task")
            elif st.trained:
                d = decide(
                    cfg,
                    st,
                    f"eval {set_name}",
                    st.last("eval", set_name),
                    "now (trained, shards missing)",
                )
                lines.append(d.line)
                if d.go:
                    r = Resources(**{**eval_r.__dict__, "mem": d.mem or eval_r.mem})
                    plan.eval_now.setdefault(key, []).append((st.run, r))
            else:
                lines.append(f"eval {set_name}: after training (relaunch then)")
        plan.actions[rid] = lines
    work = plan.train or plan.eval_after_train or plan.eval_now
    done, why = layout.summary_complete(sweep_dir(cfg), [r.run_id for r in (all_runs or runs)])
    plan.aggregate = bool(work) or not done
    plan.aggregate_why = "new results to aggregate" if work else why
    if not work and any(st.active("aggregate") for st in states):
        plan.aggregate = False
    return plan


def move_aside(run_dir: Path, paths: list[Path]) -> Path:
    """Move stale shards to ``<run_dir>/eval-stale/<time>/``: kept, but out of the merge."""
    import time

    target = run_dir / "eval-stale" / time.strftime("%Y%m%dT%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for path in paths:
        path.rename(target / path.name)
    return target


# ---------------------------------------------------------------------------- arrays


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or []


def _res_key(r: Resources) -> tuple:
    return (r.mem, r.exclude)


def _label(r: Resources, base: Resources, chunk: int, chunks: int) -> str:
    parts = []
    if r.mem != base.mem:
        parts.append(f"mem={r.mem}")
    if r.exclude != base.exclude:
        parts.append(f"exclude={r.exclude}")
    if chunks > 1:
        parts.append(f"chunk {chunk + 1}/{chunks}")
    return ", ".join(parts)


def _limits(cfg: Any) -> dict[str, Any]:
    c = cfg.cluster
    return {
        "time_min": parse_time_minutes(c.time, "cluster.time"),
        "signal_delay_s": c.signal_delay_s,
        "max_requeues": c.max_requeues,
    }


def arrays_for(cfg: Any, plan: Plan, max_array_size: int = 1001) -> list[ArraySpec]:
    """The sbatch calls of a plan (see the module docstring)."""
    from hpc.stages import AggregateStage, EvalStage, NoOp, TrainStage

    c = cfg.cluster
    per_task = runs_per_task(c)
    per_task = 1 if per_task == "auto" else per_task
    chunk = max(1, int(c.max_array_size or max_array_size))
    stage_to = c.scratch if c.stage_data else None
    base_train, base_eval = stage_resources(cfg, "train"), stage_resources(cfg, "eval")
    limits = _limits(cfg)  # each train task gets its own copy (submitit pickles each call)
    specs: list[ArraySpec] = []

    def name(set_name: str, role: str, groups: Any) -> str:
        both = sum(1 for s, _ in groups if s == set_name) > 1
        return f"eval:{set_name}:{role}" if both else f"eval:{set_name}"

    groups: dict[tuple, list[tuple[Run, Resources]]] = {}
    for run, r in plan.train:
        groups.setdefault(_res_key(r), []).append((run, r))
    for members in groups.values():
        r = members[0][1]
        tasks = _chunks([run for run, _ in members], per_task)
        parts = _chunks(tasks, chunk)
        for k, part in enumerate(parts):
            label = _label(r, base_train, k, len(parts))
            train_index = len(specs)
            specs.append(
                ArraySpec(
                    "train",
                    [_task(runs) for runs in part],
                    [(TrainStage(), Yamls(runs), stage_to, dict(limits)) for runs in part],
                    stage_params(cfg, "train", r, "train"),
                    group=label,
                )
            )
            for (set_name, role), evals in plan.eval_after_train.items():
                wanted = {x.run_id for x in evals}
                # aftercorr pairs eval task i with train task i: this array lists exactly the
                # train array's tasks, in its order; a task without this set gets a no-op.
                ev_tasks, ev_calls = [], []
                for runs in part:
                    mine = [x for x in runs if x.run_id in wanted]
                    ev_tasks.append(_task(mine, set_name) if mine else {"noop": True})
                    ev_calls.append(
                        (EvalStage(), Yamls(mine), set_name, role) if mine else (NoOp(),)
                    )
                specs.append(
                    ArraySpec(
                        name(set_name, role, plan.eval_after_train),
                        ev_tasks,
                        ev_calls,
                        stage_params(cfg, "eval", base_eval, f"eval-{set_name}"),
                        depends_on=train_index,
                        dependency_kind="aftercorr",
                        group=label,
                    )
                )
    for (set_name, role), members in plan.eval_now.items():
        by_res: dict[tuple, list[tuple[Run, Resources]]] = {}
        for run, r in members:
            by_res.setdefault(_res_key(r), []).append((run, r))
        for sub in by_res.values():
            r = sub[0][1]
            tasks = _chunks([run for run, _ in sub], per_task)
            parts = _chunks(tasks, chunk)
            for k, part in enumerate(parts):
                specs.append(
                    ArraySpec(
                        name(set_name, role, plan.eval_now),
                        [_task(runs, set_name) for runs in part],
                        [(EvalStage(), Yamls(runs), set_name, role) for runs in part],
                        stage_params(cfg, "eval", r, f"eval-{set_name}"),
                        group=_label(r, base_eval, k, len(parts)),
                    )
                )
    if plan.aggregate:
        from omegaconf import DictConfig, OmegaConf

        launch = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        waits = bool(specs)
        specs.append(
            ArraySpec(
                "aggregate",
                [{}],
                [
                    (
                        AggregateStage(),
                        str(sweep_dir(cfg)),
                        cfg.allow_partial,
                        cfg.replace_summary,
                        launch,
                    )
                ],
                stage_params(cfg, "aggregate", stage_resources(cfg, "aggregate"), "aggregate"),
                dependency_kind="afterany" if waits else None,
            )
        )
    return specs


def _task(runs: list[Run], set_name: str | None = None) -> dict[str, Any]:
    task: dict[str, Any] = {"runs": [r.run_id for r in runs]}
    if set_name is not None:
        task["set"] = set_name
    return task
