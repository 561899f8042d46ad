"""Slurm's environment -> torch.distributed's, in one place.

Inside an ``srun`` task Slurm sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE and SLURM_JOB_NODELIST. torch.distributed (and so
Accelerate) reads RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
MASTER_ADDR is the first host of the allocation; MASTER_PORT is derived from the job id (each
array task has its own), so two jobs (or two array tasks) sharing a node do not collide.

A task that trains packed runs (``cluster.runs_per_task``) needs one rendezvous port per run.
Each job id owns PORT_SLOTS consecutive slots: slot 0 for the task's own group, slot i for its
i-th packed run. The port is ``PORT_BASE + (job_id * PORT_SLOTS + slot) % PORT_SPAN``, so the
tasks of one array, whose job ids are consecutive, never share a port: two slots meet only for
job ids at least 606 apart (PORT_SLOTS = 33 is invertible modulo 20,000). Ports stay below
Linux's ephemeral range (32768+) only in part; a rendezvous that finds its port taken fails
with DistNetworkError, which the next launch resumes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

PORT_BASE, PORT_SPAN = 20000, 20000
MAX_RUNS_PER_TASK = 32
PORT_SLOTS = MAX_RUNS_PER_TASK + 1


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand Slurm's compressed host list: 'node[1-3,7],gpu[01-02]-ib' -> node1 ... gpu02-ib."""
    hosts: list[str] = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]*)(?:\[([^\]]+)\])?([^,\[]*),?", hostlist):
        if not (prefix or ranges or suffix):
            continue
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            hosts += [f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


def master_port(job_id: int | str, slot: int = 0) -> int:
    """The rendezvous port of this job id's ``slot`` (0: the task; i: its i-th packed run)."""
    if not 0 <= slot < PORT_SLOTS:
        raise ValueError(f"port slot {slot} is outside 0..{PORT_SLOTS - 1}")
    return PORT_BASE + (int(job_id) * PORT_SLOTS + slot) % PORT_SPAN


def _tasks_on_first_node(value: str) -> int:
    # SLURM_TASKS_PER_NODE looks like "2(x3),1": the first node's count comes first.
    return int(value.split("(")[0].split(",")[0])


def torch_env_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for this Slurm task (empty outside a Slurm step)."""
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    job_id = env.get("SLURM_JOB_ID", "0")
    hosts = expand_hostlist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost")))
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(_tasks_on_first_node(per_node)),
        "MASTER_ADDR": hosts[0],
        "MASTER_PORT": str(master_port(job_id)),
    }


def bind_device(env: Mapping[str, str], gpu_bind: str) -> dict[str, str]:
    """What the science reads to pick this rank's CUDA device, for ``cluster.gpu_bind``.

    Accelerate (training) takes ``cuda:LOCAL_RANK``; evaluation, one process, takes device 0.
    ``node``: every task sees the node's GPUs (CUDA_VISIBLE_DEVICES lists them all), so
    LOCAL_RANK = the task's local id picks its own. ``task``: each task sees only its own GPU
    (--gpus-per-task=1, --gpu-bind, or a device cgroup), which is device 0 of what it sees, so
    LOCAL_RANK = 0 (rank r would otherwise ask for cuda:r of one visible device).
    DHM_NODE_RANK keeps the task's local id for what is per node (staging data). Empty
    outside a Slurm step."""
    if "SLURM_PROCID" not in env:
        return {}
    local = env.get("SLURM_LOCALID", "0")
    device = "0" if gpu_bind == "task" else local
    return {"LOCAL_RANK": device, "DHM_NODE_RANK": local, "DHM_GPU_BIND": gpu_bind}


def export_torch_env(gpu_bind: str = "node") -> dict[str, str]:
    """Set the torch.distributed variables in os.environ from Slurm's, and this rank's device
    (``bind_device``); return what was set."""
    values = {**torch_env_from_slurm(os.environ), **bind_device(os.environ, gpu_bind)}
    os.environ.update(values)
    return values
