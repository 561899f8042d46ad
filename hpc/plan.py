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

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dhm.core import layout
from dhm.core import variants as V
from hpc.file_facts import FileFacts
from hpc.ledger import RESUME_STATES, Attempt
from hpc.schema import memory_mb
from hpc.slurm import Resources, stage_resources
from hpc.state import RunState, read_states
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


@dataclass(frozen=True)
class EvalWork:
    """What one eval task does for its runs: a set in one role, at one checkpoint, the parts to
    compute (dhm.core.variants); ``label`` names it in the ledger and status."""

    label: str
    set_name: str
    role: str
    checkpoint: Any = V.FINAL
    parts: tuple[str, ...] | None = None  # None: all of each run's parts


@dataclass
class Plan:
    """What a launch will do: per run a list of lines, and the runs each stage takes."""

    states: list[RunState]
    actions: dict[str, list[str]] = field(default_factory=dict)  # run_id -> lines
    train: list[tuple[Run, Resources]] = field(default_factory=list)
    # work -> runs; a set can be in-distribution for some runs, OOD for others.
    eval_after_train: dict[EvalWork, list[Run]] = field(default_factory=dict)
    eval_now: dict[EvalWork, list[tuple[Run, Resources]]] = field(default_factory=dict)
    aggregate: bool = False
    aggregate_why: str = ""
    refused: list[str] = field(default_factory=list)  # run ids needing the researcher
    facts: FileFacts | None = None  # what planning read inside files: saved once checks pass
    code: Path | None = None  # the snapshot of this launch: new runs, evals, the aggregate
    resume_code: dict[str, Path] = field(default_factory=dict)  # run id -> its own snapshot
    resume_yaml: dict[str, str] = field(default_factory=dict)  # run id -> config its code reads
    attempts: list[Attempt] = field(default_factory=list)  # every task of the sweep (ledger)
    variant: V.Variant | None = None  # the evaluation variant of the launch

    def code_of(self, run: Run) -> Path | None:
        """The snapshot a run's training imports: its own when it resumes, else the launch's."""
        return self.resume_code.get(run.run_id, self.code)


def _train_lines(cfg: Any, st: RunState, plan: Plan, base: Resources) -> bool:
    """Decide the run's training; True when it is to be trained now."""
    if st.trained:
        plan.actions[st.run.run_id].append("train: skip (checkpoints/final.pt exists)")
        return False
    if (task := st.active("train")) is not None:
        line = f"train: wait (job {task.job_id} is {task.state}: {task.reason})"
        plan.actions[st.run.run_id].append(line)
        return False
    start = (
        f"resume from step {st.resume_step}"
        if st.resume_step is not None
        else "from scratch (no checkpoint)"
    )
    if st.final_problem:
        start += " (checkpoints/final.pt is truncated or corrupt: it is set aside)"
    d = decide(cfg, st, "train", st.last("train"), start)
    plan.actions[st.run.run_id].append(d.line)
    if d.go:
        excl = ",".join(filter(None, [base.exclude, *d.exclude])) or None
        r = Resources(**{**base.__dict__, "mem": d.mem or base.mem, "exclude": excl})
        plan.train.append((st.run, r))
    elif d.refused:
        plan.refused.append(st.run.run_id)
    return d.go


def _parts_line(p: V.SetParts) -> str:
    """Which of a set's parts are reused and which computed, with their folders."""
    if p.legacy:
        return "reuse its shards of the layout before variants"
    said = [f"reuse {k} ({p.folders[k]})" for k in p.folders if k in p.done]
    said += [f"compute {k} ({p.folders[k]})" for k in p.todo]
    return "; ".join(said)


def _eval_lines(cfg: Any, st: RunState, plan: Plan, base: Resources, will_train: bool) -> None:
    """Decide each set's evaluation of the run (at each checkpoint of its variant)."""
    lines = plan.actions[st.run.run_id]
    for label, done in st.eval_done.items():
        p = st.parts[label]
        # Every part to compute: None, so that runs with other parts (a VAE has no attacks)
        # share one array; only a variant reusing some parts names the rest.
        todo = None if set(p.todo) == set(p.folders) else p.todo
        work = EvalWork(label, p.set_name, p.role, p.checkpoint, todo)
        if done:
            lines.append(f"eval {label}: skip ({_parts_line(p)})")
        elif (task := st.active("eval", label)) is not None:
            lines.append(f"eval {label}: wait (job {task.job_id} is {task.state})")
        elif will_train:
            plan.eval_after_train.setdefault(work, []).append(st.run)
            lines.append(f"eval {label}: after its training task: {_parts_line(p)}")
        elif st.trained:
            now = f"now (trained): {_parts_line(p)}"
            d = decide(cfg, st, f"eval {label}", st.last("eval", label), now)
            lines.append(d.line)
            if d.go:
                r = Resources(**{**base.__dict__, "mem": d.mem or base.mem})
                plan.eval_now.setdefault(work, []).append((st.run, r))
        else:
            lines.append(f"eval {label}: after training (relaunch then)")


def make_plan(
    cfg: Any,
    runs: list[Run],
    query_slurm: bool,
    all_runs: list[Run] | None = None,
    train: bool = True,
) -> Plan:
    """The plan for ``runs`` (a selection of ``all_runs``, the whole sweep, for the summary);
    ``train`` False (mode=evaluate): evaluations of trained runs only."""
    facts = FileFacts(sweep_dir(cfg))
    states, everything = read_states(cfg, runs, query_slurm, facts=facts)
    plan = Plan(states, facts=facts, attempts=everything)
    train_r, eval_r = stage_resources(cfg, "train"), stage_resources(cfg, "eval")
    for st in plan.states:
        plan.actions[st.run.run_id] = []
        if train:
            will_train = _train_lines(cfg, st, plan, train_r)
        else:
            will_train = False
            if not st.trained:
                plan.actions[st.run.run_id].append(
                    "train: not trained (mode=evaluate trains nothing)"
                )
        _eval_lines(cfg, st, plan, eval_r, will_train)
    work = plan.train or plan.eval_after_train or plan.eval_now
    done, why = layout.summary_complete(sweep_dir(cfg), [r.run_id for r in (all_runs or runs)])
    plan.aggregate = bool(work) or not done
    plan.aggregate_why = "new results to aggregate" if work else why
    if not work and any(a.stage == "aggregate" and a.active for a in everything):
        plan.aggregate = False
    return plan
