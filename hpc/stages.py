"""The submitit callables: each wraps one plain dhm function.

    TrainStage      dhm.train.train           (Checkpointable: requeued on USR2 / time limit)
    EvalStage       dhm.evaluate.evaluate_set
    AggregateStage  dhm.aggregate.aggregate

The same objects run in this process for cluster=local. Inside a Slurm job they first turn
Slurm's environment into torch.distributed's (hpc.distributed) and record where they ran.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import submitit

from dhm import provenance
from dhm.config import from_yaml
from hpc.distributed import export_torch_env

SLURM_KEYS = (
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURMD_NODENAME",
    "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT", "SLURM_PROCID", "SLURM_NTASKS",
)  # fmt: skip


def in_slurm_job() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def use_allocated_cpus() -> None:
    """Run torch on the CPUs Slurm gave this task, not on every core of the node.

    Without it each rank starts one thread per physical core, and ranks sharing a node
    oversubscribe it (Accelerate only leaves the thread count alone when OMP_NUM_THREADS is set).
    """
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        import torch

        os.environ["OMP_NUM_THREADS"] = cpus
        torch.set_num_threads(int(cpus))


def record_environment(run_dir: Path, stage: str) -> dict[str, Any]:
    """Write ``<run_dir>/logs/<stage>_<job>_rank<r>.json``: host, Slurm ids, provenance."""
    info: dict[str, Any] = {
        "stage": stage,
        "hostname": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **{k.lower(): os.environ[k] for k in SLURM_KEYS if k in os.environ},
        "rank": int(os.environ.get("RANK", 0)),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        **provenance.record(),
    }
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    job = os.environ.get("SLURM_JOB_ID", "local")
    (log_dir / f"{stage}_{job}_rank{info['rank']}.json").write_text(json.dumps(info, indent=1))
    return info


def stage_data(root: str, scratch: str, local_rank: int) -> str:
    """Copy a dataset folder to node-local scratch once per node; return the new root.

    Local rank 0 copies into a temporary folder and renames it; the other ranks of the node
    wait for the rename, so nobody reads a half-copied dataset.
    """
    # Expanded here, on the compute node: $TMPDIR is the job's node-local folder.
    scratch = os.path.expandvars(scratch)
    if "$" in scratch or not scratch:
        scratch = "/tmp"
    target = Path(scratch) / f"dhm-data-{os.environ.get('SLURM_JOB_ID', 'local')}"
    if local_rank == 0 and not target.exists():
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(root, tmp)
        tmp.rename(target)
    deadline = time.time() + 3600
    while not target.exists():
        if time.time() > deadline:
            raise TimeoutError(f"data staging to {target} did not finish within an hour")
        time.sleep(1)
    return str(target)


def end_process_group() -> None:
    """Tear down this task's torch.distributed group before the interpreter exits.

    Left to interpreter shutdown, gloo's threads were destroyed while still joinable: a rank
    that had finished and reported success then aborted ("terminate called without an active
    exception"), and Slurm marked the whole task FAILED.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class TrainStage(submitit.helpers.Checkpointable):
    """Train one run (every DDP rank of it). On USR2 / time limit submitit calls checkpoint(),
    inherited from Checkpointable: it resubmits this same call, which resumes from the newest
    step checkpoint (written every train.checkpoint_every_steps and at epoch ends)."""

    def __call__(self, run_yaml: str, stage_to: str | None = None) -> str:
        from dhm.train import train

        cfg = from_yaml(run_yaml)
        if in_slurm_job():
            use_allocated_cpus()
            export_torch_env()
        record_environment(Path(cfg.run_dir), "train")
        if stage_to:
            cfg.data.root = stage_data(
                cfg.data.root, stage_to, int(os.environ.get("LOCAL_RANK", 0))
            )
        try:
            return str(train(cfg))
        finally:
            if in_slurm_job():
                end_process_group()


class EvalStage:
    """Evaluate one set of one trained run into its shard files."""

    def __call__(self, run_yaml: str, set_name: str, role: str, run_id: str) -> list[str]:
        from dhm.evaluate import evaluate_set

        cfg = from_yaml(run_yaml)
        if in_slurm_job():
            use_allocated_cpus()
        env = record_environment(Path(cfg.run_dir), f"eval-{set_name}")
        final = Path(cfg.run_dir) / "checkpoints" / "final.pt"
        extra = {k: env[k] for k in ("slurm_job_id", "slurm_array_job_id", "slurm_array_task_id")
                 if k in env}  # fmt: skip
        paths = evaluate_set(cfg, final, set_name, role, run_id=run_id, extra_attrs=extra)
        return [str(p) for p in paths]


class NoOp:
    """A task that does nothing: it keeps an eval array aligned with the train array (aftercorr)."""

    def __call__(self) -> None:
        return None


class AggregateStage:
    """Aggregate a sweep's shards into its summary; fails (non-zero) on missing runs unless
    allow_partial."""

    def __call__(self, sweep_dir: str, allow_partial: bool) -> str:
        from dhm.aggregate import aggregate

        report = aggregate(sweep_dir, allow_partial=allow_partial)
        return str(report.summary_dir)
