"""Requested against used, per stage: CPU efficiency, memory and GPUs from sacct's job steps.

``sacct -X`` has job-level lines only, and MaxRSS is recorded per job step, so this asks sacct
for every line of the sweep's jobs (``-D`` not given: the latest attempt of each task). For a
finished task the job line's TotalCPU is the sum over its steps; its efficiency is
TotalCPU / (Elapsed x AllocCPUS), as Slurm's ``seff`` computes it. Memory is the largest step
MaxRSS (one task's) x the tasks a node runs, against the request per node (ReqMem). Running
and pending tasks are left out: sacct fills TotalCPU in when a step ends.

When a stage asks for far more than it uses, one line says what to set instead, naming the
key, as Snakemake's Slurm plugin's efficiency report does without the key: a CPU request
above twice what is used, or a memory request above four times (and above 1 GB).
``status`` prints the lines and writes ``<sweep>/efficiency.json``, which the HTML report shows.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dhm.core.fsutil import atomic_write_text
from hpc.ledger import Started
from hpc.state import _units

FIELDS = ("JobID", "State", "ElapsedRaw", "TotalCPU", "AllocCPUS", "MaxRSS", "ReqMem", "AllocTRES")
UNFINISHED = {"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "COMPLETING"}
EFFICIENCY_NAME = "efficiency.json"
# The keys a stage's request comes from: (CPUs per task, memory per node).
KEYS = {
    "train": ("cluster.cpus_per_task", "cluster.mem"),
    "eval": ("cluster.eval_cpus", "cluster.eval_mem"),
    "aggregate": ("cluster.cpus_per_task", "cluster.mem"),
}
_MB = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0**2, "": 1 / 1024**2}


def cpu_seconds(text: str) -> float:
    """sacct's TotalCPU ([D-][HH:]MM:SS[.mmm]) in seconds; 0 for an empty field."""
    if not text:
        return 0.0
    days, _, rest = text.rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    h, m, s = parts
    return (float(days) if days else 0.0) * 86400 + h * 3600 + m * 60 + s


def memory_mb(text: str) -> float:
    """sacct's MaxRSS / ReqMem ('13336K', '1000M', '1.5G', '2000Mn', bytes) in MB; 0 if empty."""
    m = re.match(r"^([0-9.]+)([KMGT]?)[nc]?$", (text or "").strip())
    return float(m.group(1)) * _MB[m.group(2)] if m else 0.0


@dataclass
class TaskUse:
    """One finished array task (its latest attempt), from its job line and step lines."""

    job_id: str
    elapsed_s: int
    cpu_s: float
    alloc_cpus: int
    max_rss_mb: float
    req_mem_mb: float
    gpus: int


def parse_steps(text: str) -> dict[str, TaskUse]:
    """``sacct -n -P -o FIELDS`` (job and step lines) -> {job or job_task: TaskUse} of the
    finished tasks."""
    jobs: dict[str, TaskUse] = {}
    rss: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < len(FIELDS):
            continue
        values = dict(zip(FIELDS, parts, strict=False))
        job, dot, _ = values["JobID"].partition(".")
        if dot:  # a step: its MaxRSS counts for its job
            rss[job] = max(rss.get(job, 0.0), memory_mb(values["MaxRSS"]))
            continue
        state = values["State"].split()[0] if values["State"] else ""
        elapsed = int(values["ElapsedRaw"]) if values["ElapsedRaw"].isdigit() else 0
        if state in UNFINISHED or not elapsed or "[" in job:
            continue
        gpus, unit = _units(values["AllocTRES"])
        jobs[job] = TaskUse(
            job,
            elapsed,
            cpu_seconds(values["TotalCPU"]),
            int(values["AllocCPUS"] or 0),
            0.0,
            memory_mb(values["ReqMem"]),
            int(gpus) if unit == "GPU" else 0,
        )
    for job, use in jobs.items():
        use.max_rss_mb = rss.get(job, 0.0)
    return jobs


@dataclass
class StageUse:
    """A stage's finished tasks together: what they asked for and what they used."""

    stage: str  # train | eval | aggregate
    tasks: int
    cpus_per_task: int  # asked
    tasks_per_node: int
    cpu_efficiency: float  # TotalCPU / (Elapsed x AllocCPUS) over the tasks
    cpus_used: float  # per task, on average while it ran
    mem_used_mb: float  # largest task's MaxRSS x tasks per node
    mem_asked_mb: float  # per node (0: the partition's default, not known)
    gpus: int  # per task (job), allocated
    advice: list[str]


def _advice(u: StageUse) -> list[str]:
    cpu_key, mem_key = KEYS.get(u.stage, KEYS["train"])
    out = []
    n = max(1, math.ceil(u.cpus_used * 1.25))  # what it uses, and a quarter to spare
    if u.stage != "aggregate" and u.cpus_used * 2 < u.cpus_per_task and n < u.cpus_per_task:
        out.append(
            f"{u.stage} asks {u.cpus_per_task} CPUs and uses {u.cpus_used:.1f}: set {cpu_key}={n}"
        )
    if u.stage != "aggregate" and u.mem_asked_mb > max(1024, 4 * u.mem_used_mb) > 0:
        gb = max(1, math.ceil(2 * u.mem_used_mb / 1024))
        out.append(
            f"{u.stage} asks {u.mem_asked_mb / 1024:.1f} GB and uses {u.mem_used_mb / 1024:.2f} "
            f"GB: set {mem_key}={gb}G"
        )
    return out


def stage_uses(
    subs: list[dict[str, Any]], tasks: dict[str, TaskUse], run_id: str | None = None
) -> list[StageUse]:
    """Per stage (train, eval, aggregate, in that order) over the ledger's submissions; with
    ``run_id``, over the tasks that held that run alone (a packed task's use is not one run's)."""
    grouped: dict[str, list[tuple[dict[str, Any], TaskUse]]] = {}
    for sub in subs:
        stage = sub["stage"].split(":")[0]
        n = len(sub.get("tasks") or [None])
        for i in range(n):
            if run_id is not None and (sub.get("tasks") or [{}])[i].get("runs") != [run_id]:
                continue
            # an array task, or a one-task submission sacct lists as a plain job
            use = tasks.get(f"{sub['job_id']}_{i}") or (
                tasks.get(sub["job_id"]) if n == 1 else None
            )
            if use is not None:
                grouped.setdefault(stage, []).append((sub.get("params") or {}, use))
    out = []
    for stage in ("train", "eval", "aggregate"):
        members = grouped.get(stage)
        if not members:
            continue
        params = members[-1][0]
        per_task = int(params.get("cpus_per_task") or members[-1][1].alloc_cpus or 1)
        per_node = int(params.get("ntasks_per_node") or 1)
        core_s = sum(u.elapsed_s * max(1, u.alloc_cpus) for _, u in members)
        cpu_s = sum(u.cpu_s for _, u in members)
        efficiency = cpu_s / core_s if core_s else 0.0
        use = StageUse(
            stage,
            len(members),
            per_task,
            per_node,
            efficiency,
            efficiency * per_task,
            max(u.max_rss_mb for _, u in members) * per_node,
            max(u.req_mem_mb for _, u in members),
            max(u.gpus for _, u in members),
            [],
        )
        use.advice = _advice(use)
        out.append(use)
    return out


def ask(subs: list[dict[str, Any]]) -> Started | None:
    """Start sacct for every line (job and steps) of the submissions' jobs."""
    ids = ",".join(sorted({s["job_id"] for s in subs}))
    if not ids:
        return None
    return Started(
        ["sacct", "-n", "-P", "-o", ",".join(FIELDS), "-j", ids], "reading job steps (sacct)"
    )


def lines(uses: list[StageUse]) -> list[str]:
    """What status prints: one line a stage, then the advice."""
    if not uses:
        return []
    out = ["efficiency of finished tasks (sacct): asked -> used"]
    for u in uses:
        mem = f"{u.mem_used_mb:.0f} MB of " + (
            f"{u.mem_asked_mb:.0f} MB" if u.mem_asked_mb else "the default"
        )
        out.append(
            f"  {u.stage}: {u.tasks} task(s), CPU {100 * u.cpu_efficiency:.0f}% of "
            f"{u.cpus_per_task} a task ({u.cpus_used:.1f} used), memory {mem} a node, "
            f"{u.gpus} GPU(s) a task"
        )
    out += [f"  {a}" for u in uses for a in u.advice]
    return out


def write(sweep: Path, uses: list[StageUse]) -> None:
    """``<sweep>/efficiency.json``: what the HTML report's efficiency table shows."""
    atomic_write_text(sweep / EFFICIENCY_NAME, json.dumps([asdict(u) for u in uses], indent=1))
