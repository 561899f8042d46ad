"""Slurm through submitit: profile checks, executors, arrays with dependencies, sacct states.

Every check here runs before any sbatch call; a failed check raises ConfigError naming the key.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dhm.config import ConfigError

ACTIVE_STATES = {
    "SUBMITTED",  # ours: in the ledger for under 10 minutes, not yet in sacct
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING",
    "COMPLETING", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING",
}  # fmt: skip
# A value that goes into an #SBATCH line: no whitespace, quotes or shell syntax.
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:=+@%/\-\[\]]*$")
_TIME_FORMS = (
    (re.compile(r"^(\d+)$"), ("m",)),
    (re.compile(r"^(\d+):(\d{1,2})$"), ("m", "s")),
    (re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})$"), ("h", "m", "s")),
    (re.compile(r"^(\d+)-(\d+)$"), ("d", "h")),
    (re.compile(r"^(\d+)-(\d+):(\d{1,2})$"), ("d", "h", "m")),
    (re.compile(r"^(\d+)-(\d+):(\d{1,2}):(\d{1,2})$"), ("d", "h", "m", "s")),
)
_MINUTES = {"d": 1440.0, "h": 60.0, "m": 1.0, "s": 1 / 60}


class SlurmError(RuntimeError):
    """A Slurm command failed (not a usage error): the message says which and why."""


def parse_time_minutes(value: str, key: str) -> int:
    """Slurm time limit -> whole minutes (rounded up); ConfigError naming ``key`` if unparsable."""
    text = str(value).strip()
    for pattern, units in _TIME_FORMS:
        m = pattern.match(text)
        if m:
            minutes = sum(int(g) * _MINUTES[u] for g, u in zip(m.groups(), units, strict=True))
            if minutes <= 0:
                break
            return max(1, int(-(-minutes // 1)))
    raise ConfigError(
        f"{key}={value!r} is not a Slurm time limit: use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM "
        "or D-HH:MM:SS (e.g. 04:00:00, 1-12:00:00)"
    )


def ranks_per_node(cluster: Any) -> int:
    if cluster.tasks_per_node is not None:
        return int(cluster.tasks_per_node)
    return max(1, int(cluster.gpus_per_node))


def check_batch_split(cluster: Any, batch_size: int, where: str) -> None:
    """The global batch must split evenly over the DDP ranks of a train task."""
    world = cluster.nodes * ranks_per_node(cluster)
    if batch_size % world:
        raise ConfigError(
            f"{where}train.batch_size={batch_size} does not split over {world} DDP ranks "
            f"(cluster.nodes={cluster.nodes} x {ranks_per_node(cluster)} per node): "
            f"use a multiple of {world}"
        )


def known_partitions() -> list[str]:
    """Partitions that sinfo knows (the default one without its '*')."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise ConfigError(f"cluster=slurm but sinfo failed: {out.stderr.strip()}")
    return [p.rstrip("*") for p in out.stdout.split()]


def check_cluster(cfg: Any, *, query_slurm: bool = True) -> None:
    """Validate the cluster profile before anything is submitted (ConfigError names the key)."""
    c = cfg.cluster
    if c.name not in ("local", "slurm"):
        raise ConfigError(f"cluster.name={c.name!r} is not allowed: local or slurm")
    for key in ("nodes", "cpus_per_task", "eval_cpus", "array_parallelism"):
        if c[key] < 1:
            raise ConfigError(f"cluster.{key}={c[key]} is not allowed: an integer >= 1")
    for key in ("gpus_per_node", "eval_gpus", "max_requeues", "signal_delay_s"):
        if c[key] < 0:
            raise ConfigError(f"cluster.{key}={c[key]} is not allowed: an integer >= 0")
    if c.tasks_per_node is not None and c.tasks_per_node < 1:
        raise ConfigError(f"cluster.tasks_per_node={c.tasks_per_node} is not allowed: >= 1 or null")
    if c.gpus_per_node and c.tasks_per_node not in (None, c.gpus_per_node):
        raise ConfigError(
            f"cluster.tasks_per_node={c.tasks_per_node} with cluster.gpus_per_node="
            f"{c.gpus_per_node}: one DDP rank per GPU, so tasks_per_node must equal gpus_per_node"
        )
    check_batch_split(c, cfg.train.batch_size, "")
    for key in ("time", "eval_time", "aggregate_time"):
        parse_time_minutes(c[key], f"cluster.{key}")
    if c.signal_delay_s >= 60 * parse_time_minutes(c.time, "cluster.time"):
        raise ConfigError(
            f"cluster.signal_delay_s={c.signal_delay_s} is not allowed: it must be shorter than "
            f"the train time limit cluster.time={c.time}"
        )
    for key in ("partition", "account", "qos", "mem", "constraint"):
        value = c[key]
        if value is not None and not _SAFE_VALUE.match(str(value)):
            raise ConfigError(
                f"cluster.{key}={value!r} is not allowed in an sbatch script: letters, digits "
                "and _ . , : = + @ % / - [ ] only"
            )
    for key, value in (c.extra_sbatch or {}).items():
        if not re.match(r"^[a-z][a-z0-9-]*$", str(key)) or not _SAFE_VALUE.match(str(value)):
            raise ConfigError(
                f"cluster.extra_sbatch.{key}={value!r} is not allowed: option names are lowercase "
                "sbatch long options, values letters, digits and _ . , : = + @ % / - [ ] only"
            )
    for i, line in enumerate(c.setup or []):
        if "\n" in str(line) or "\r" in str(line):
            raise ConfigError(f"cluster.setup[{i}] contains a newline: give one command per entry")
    if c.name == "slurm" and query_slurm:
        if shutil.which("sbatch") is None:
            raise ConfigError(
                "cluster=slurm but sbatch is not on PATH (is this a Slurm login node?)"
            )
        if c.partition is not None:
            partitions = known_partitions()
            unknown = [p for p in str(c.partition).split(",") if p not in partitions]
            if unknown:
                raise ConfigError(
                    f"cluster.partition={c.partition!r}: {', '.join(unknown)} is not a partition "
                    f"sinfo knows: {', '.join(partitions) or '(none)'}"
                )


@dataclass
class ArraySpec:
    """One sbatch call: a stage over several tasks, with its Slurm parameters."""

    stage: str  # train | eval:<set> | aggregate
    tasks: list[dict[str, Any]]  # what each task does (run_id, set, ...): for the ledger
    calls: list[tuple[Any, ...]]  # (callable, *args) per task
    params: dict[str, Any]  # submitit SlurmExecutor parameters
    depends_on: str | None = None  # stage name of the array this one waits for
    dependency_kind: str | None = None  # aftercorr | afterany


def base_params(cfg: Any, name: str) -> dict[str, Any]:
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": f"dhm-{cfg.sweep.name}-{name}",
        "array_parallelism": c.array_parallelism,
        "signal_delay_s": c.signal_delay_s,
        "setup": list(c.setup or []),
        "additional_parameters": dict(OmegaConf.to_container(c.extra_sbatch) or {}),
    }
    for key in ("partition", "account", "qos", "constraint"):
        if c[key] is not None:
            params[key] = c[key]
    return params


def _stage_params(
    cfg: Any, name: str, time_key: str, *, nodes: int, ntasks: int, cpus: int, gpus: int
) -> dict[str, Any]:
    c = cfg.cluster
    params = base_params(cfg, name)
    params.update(
        time=parse_time_minutes(c[time_key], f"cluster.{time_key}"),
        nodes=nodes,
        ntasks_per_node=ntasks,
        cpus_per_task=cpus,
    )
    if gpus:
        params["gpus_per_node"] = gpus
    if c.mem is not None:
        params["mem"] = c.mem
    return params


def train_params(cfg: Any) -> dict[str, Any]:
    """One train task: nodes x ranks_per_node DDP ranks; requeued on USR2 / timeout."""
    c = cfg.cluster
    params = _stage_params(
        cfg, "train", "time", nodes=c.nodes, ntasks=ranks_per_node(c), cpus=c.cpus_per_task,
        gpus=c.gpus_per_node,
    )  # fmt: skip
    params["additional_parameters"].setdefault("requeue", True)
    return params


def eval_params(cfg: Any, set_name: str) -> dict[str, Any]:
    c = cfg.cluster
    return _stage_params(
        cfg, f"eval-{set_name}", "eval_time", nodes=1, ntasks=1, cpus=c.eval_cpus,
        gpus=c.eval_gpus,
    )  # fmt: skip


def aggregate_params(cfg: Any) -> dict[str, Any]:
    return _stage_params(cfg, "aggregate", "aggregate_time", nodes=1, ntasks=1, cpus=1, gpus=0)


def dependency_string(kind: str, job_ids: list[str], single_task: bool) -> str:
    # aftercorr pairs array task i with task i; a job that is not an array has no task ids,
    # so a one-task stage waits with afterok instead.
    if kind == "aftercorr" and single_task:
        kind = "afterok"
    return f"{kind}:" + ":".join(job_ids)


def make_executor(cfg: Any, folder: Path, params: dict[str, Any]) -> Any:
    import submitit

    executor = submitit.SlurmExecutor(
        folder=folder, max_num_timeout=cfg.cluster.max_requeues, python=cfg.cluster.python
    )
    executor.update_parameters(**params)
    return executor


def render_script(cfg: Any, folder: Path, params: dict[str, Any], n_tasks: int) -> str:
    """The sbatch script submitit would write for this array (for dry runs)."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = cfg.cluster.python or sys.executable
    command = f"{python} -u -m submitit.core._submit {folder}"
    extra = {"map_count": n_tasks} if n_tasks > 1 else {}
    return _make_sbatch_string(command=command, folder=folder, **params, **extra)


def submit_array(cfg: Any, folder: Path, spec: ArraySpec, dependency: str | None) -> str:
    """Submit one stage as one sbatch call; return the Slurm job id (array master id)."""
    params = dict(spec.params)
    if dependency:
        params["dependency"] = dependency
        params["additional_parameters"] = {
            **params["additional_parameters"],
            "kill-on-invalid-dep": "yes",
        }
    executor = make_executor(cfg, folder, params)
    with executor.batch():
        jobs = [executor.submit(*call) for call in spec.calls]
    return jobs[0].job_id.split("_")[0]


_ARRAY_ID = re.compile(r"^(\d+)(?:_(\d+|\[[^\]]*\]))?$")


def _expand_task_field(field: str) -> list[int] | None:
    """'[0-3,5%2]' -> [0, 1, 2, 3, 5]; '4' -> [4]; None for a non-array job."""
    if field is None:
        return None
    if not field.startswith("["):
        return [int(field)]
    body = field.strip("[]").split("%")[0]
    out: list[int] = []
    for part in body.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def parse_sacct(text: str) -> dict[tuple[str, int | None], str]:
    """sacct -P -o JobID,State lines -> {(job id, array task or None): state}.

    A range record such as ``107_[0-1%2]`` stands for the tasks not yet split off (e.g. pending
    ones that got cancelled together); a task's own record (``107_0``) always wins over it.
    """
    states: dict[tuple[str, int | None], str] = {}
    from_range: dict[tuple[str, int | None], str] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2:
            continue
        m = _ARRAY_ID.match(parts[0])
        if not m:
            continue  # job steps such as 123.batch
        state = parts[1].split()[0] if parts[1] else "UNKNOWN"
        field = m.group(2)
        tasks = _expand_task_field(field)
        target = from_range if field is not None and field.startswith("[") else states
        for task in tasks if tasks is not None else [None]:
            target[(m.group(1), task)] = state
    return {**from_range, **states}


def job_states(job_ids: list[str]) -> dict[tuple[str, int | None], str]:
    """Slurm states of jobs and their array tasks, from sacct (the accounting database)."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SlurmError(f"sacct failed ({out.stderr.strip()}): is slurmdbd running?")
    return parse_sacct(out.stdout)


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=True, timeout=60)
