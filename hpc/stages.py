"""The submitit callables: each wraps one plain dhm function.

    TrainStage      dhm.training.train.train        (Checkpointable: requeued on USR2)
    EvalStage       dhm.evaluation.evaluate.evaluate_set
    AggregateStage  dhm.summary.aggregate.aggregate (+ the report, with the ledger's reasons)

The same objects run in this process for cluster=local. Inside a Slurm job they first turn
Slurm's environment into torch.distributed's (hpc.distributed) and record where they ran, one
record per attempt (a requeued task keeps its job id; the restart count tells attempts apart).

A task may hold several runs (``cluster.runs_per_task``): the train stage then trains them side
by side as child processes sharing the task's GPU or CPUs (``hpc.packed``), each with its own
checkpoints, failure and requeue; the eval stage evaluates them one after another.

Preemption and time limits: Slurm sends USR2 ``signal_delay_s`` before the limit (or when a
job is preempted). TrainStage replaces submitit's handler during training by one that asks the
loop to stop at the next step boundary (DDP ranks agree at the next log step); the loop writes
a checkpoint of its exact position, and only then does rank 0 hand over to submitit's handler,
which requeues the task (``checkpoint()`` resubmits the same call, which resumes from that
checkpoint). Time-outs and preemptions are counted separately per job, each bounded by
``cluster.max_requeues``; beyond it the task ends with RequeueLimitError and the next launch
resumes it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import submitit

from dhm.core import provenance
from dhm.core.config import from_yaml
from dhm.core.fsutil import atomic_write_text
from dhm.core.layout import ATTEMPTS_LOG
from hpc.distributed import export_torch_env, master_port
from hpc.state import run_reports

SLURM_KEYS = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURMD_NODENAME",
    "SLURM_JOB_NODELIST",
    "SLURM_RESTART_COUNT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_CPUS_PER_TASK",
)
STOPPED_EXIT = 3  # a packed child that checkpointed on request and wants its task requeued
_STARTED = time.time()  # this attempt's start (a requeued job starts a new process)


class RequeueLimitError(RuntimeError):
    """A train task stopped on USR2 more often than cluster.max_requeues allows; its exact
    checkpoint is kept and the next launch resumes it."""


def in_slurm_job() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def job_name() -> str:
    """This task's Slurm id (123_4 for array task 4 of 123), or 'local'."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID", "local")


def use_allocated_cpus(share: int = 1) -> int:
    """Run torch on the CPUs Slurm gave this task (split ``share`` ways), not on every core.

    Without it each rank starts one thread per physical core, and ranks sharing a node
    oversubscribe it (Accelerate only leaves the thread count alone when OMP_NUM_THREADS is set).
    Returns the thread count set (0: left alone).
    """
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if not cpus or ("OMP_NUM_THREADS" in os.environ and share == 1):
        return 0
    import torch

    threads = max(1, int(cpus) // share)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


def record_environment(run_dir: Path, stage: str) -> dict[str, Any]:
    """Write ``<run_dir>/logs/<stage>_<job>.<restart>_rank<r>.json``: host, Slurm ids, threads,
    provenance; one file per attempt (a requeue adds one, it never overwrites)."""
    import torch

    info: dict[str, Any] = {
        "stage": stage,
        "hostname": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **{k.lower(): os.environ[k] for k in SLURM_KEYS if k in os.environ},
        "rank": int(os.environ.get("RANK", 0)),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "torch_threads": torch.get_num_threads(),
        # The binding (cluster.gpu_bind), what this rank sees and the CUDA device index it asks
        # for (Accelerate: cuda:LOCAL_RANK), recorded even when it runs on the CPU.
        "gpu_bind": os.environ.get("DHM_GPU_BIND", ""),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_device_index": int(os.environ.get("LOCAL_RANK", 0)),
        # cluster.env's NCCL settings, as this rank saw them
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
        **provenance.record(),
    }
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    name = f"{stage}_{job_name()}.{restart}_rank{info['rank']}.json"
    atomic_write_text(run_dir / "logs" / name, json.dumps(info, indent=1))
    return info


def record_attempt(run_dir: Path, **fields: Any) -> None:
    """Append this attempt's outcome to ``<run_dir>/logs/train_attempts.jsonl`` (rank 0)."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    entry = {
        "job": job_name(),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        "host": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **fields,
    }
    path = run_dir / "logs" / ATTEMPTS_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def node_rank() -> int:
    """This task's index among the tasks of its node (Slurm's local id): whatever LOCAL_RANK
    the GPU binding set, staging data is once per node."""
    return int(os.environ.get("DHM_NODE_RANK", os.environ.get("SLURM_LOCALID", 0)))


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


def _requeue_kind(limits: dict[str, Any]) -> str:
    """'time-out' when USR2 came at the time limit (signal_delay_s before it), else 'preemption'."""
    elapsed = time.time() - _STARTED
    limit_s = 60 * limits.get("time_min", 0)
    due = limit_s - limits.get("signal_delay_s", 0) - 90
    return "time-out" if limit_s and elapsed >= due else "preemption"


def _count_requeue(run_dir: Path, kind: str, limits: dict[str, Any]) -> tuple[int, int]:
    """(this kind's count including now, the bound) for this job, kept beside the run."""
    path = run_dir / "logs" / f"requeues_{job_name()}.json"
    counts = json.loads(path.read_text()) if path.exists() else {}
    counts[kind] = counts.get(kind, 0) + 1
    atomic_write_text(path, json.dumps(counts))
    return counts[kind], int(limits.get("max_requeues", 3))


class _Stop:
    """Installs a USR2 handler that sets a StopRequest (and forwards the signal to children)."""

    def __init__(self, stop: Any, children: list[subprocess.Popen] | None = None) -> None:
        self.stop, self.children = stop, children if children is not None else []
        self.original = signal.getsignal(signal.SIGUSR2)

    def __enter__(self) -> _Stop:
        signal.signal(signal.SIGUSR2, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.stop.requested = True
        print(
            f"USR2 received on {socket.gethostname()}: stopping at the next step boundary to "
            "checkpoint",
            file=sys.stderr,
            flush=True,
        )
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGUSR2)

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGUSR2, self.original)

    def requeue(self, run_dir: Path, limits: dict[str, Any], step: Any) -> None:
        """Hand over to submitit's handler (rank 0 requeues the job); beyond the bound,
        RequeueLimitError. Other ranks wait to be killed by the requeue."""
        kind = _requeue_kind(limits)
        count, bound = _count_requeue(run_dir, kind, limits)
        if count > bound:
            raise RequeueLimitError(
                f"beyond cluster.max_requeues={bound}: {kind} number {count} of this job; the "
                f"checkpoint at step {step} is kept and the next launch resumes from it"
            )
        print(
            f"{kind} {count}/{bound}: checkpoint at step {step} written, requeueing",
            file=sys.stderr,
            flush=True,
        )
        if int(os.environ.get("SLURM_PROCID", 0)) == 0 and callable(self.original):
            self.original(signal.SIGUSR2, None)  # requeues and exits
            return
        time.sleep(300)  # not rank 0: the requeue ends this process
        raise RequeueLimitError("the requeue did not arrive within 5 minutes")


class NoGPUError(RuntimeError):
    """A task that Slurm gave GPUs found no usable CUDA device (and was not told to use the CPU)."""


def require_cuda(stage: str, cpu_key: str, device: str) -> None:
    """Fail at once when Slurm gave this task GPUs (SLURM_GPUS_ON_NODE) and CUDA cannot use
    any, unless ``device`` (the value of ``cpu_key``: train.device, eval.device) is "cpu": a
    GPU job must never train on the CPU for days by accident. The message names the host,
    CUDA_VISIBLE_DEVICES and CUDA's own error."""
    if device == "cpu" or not int(os.environ.get("SLURM_GPUS_ON_NODE", "0") or 0):
        return
    import torch

    try:
        torch.cuda.init()  # raises CUDA's reason (no driver, no device, ...)
        count = torch.cuda.device_count()
        error = "" if count else "torch.cuda.device_count() is 0"
    except Exception as err:
        error = f"{type(err).__name__}: {err}".splitlines()[0]
    if error:
        raise NoGPUError(
            f"{stage} task was given GPUs but CUDA finds none usable on {socket.gethostname()} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}, "
            f"SLURM_JOB_GPUS={os.environ.get('SLURM_JOB_GPUS', '')!r}): {error}. "
            f"To run on the CPU on purpose, set {cpu_key}=cpu"
        )


def train_one_run(
    run_yaml: str, stage_to: str | None, limits: dict[str, Any], threads_share: int = 1
) -> str:
    """Train one run in this process, with the USR2 handling above (the unpacked case)."""
    from dhm.training.train import StopRequest, TrainingStopped, train

    cfg = from_yaml(run_yaml)
    run_dir = Path(cfg.run_dir)
    slurm = in_slurm_job()
    if slurm:
        use_allocated_cpus(threads_share)
        export_torch_env(limits.get("gpu_bind", "node"))
    record_environment(run_dir, "train")
    if stage_to:
        cfg.data.root = stage_data(cfg.data.root, stage_to, node_rank())
    stop = StopRequest()
    handler = _Stop(stop)
    try:
        with handler if slurm else _NoContext():
            try:
                require_cuda("the train", "train.device", cfg.train.device)
                final = train(cfg, stop)
            except TrainingStopped as err:
                record_attempt(run_dir, outcome="stopped", step=err.step, seconds=_elapsed())
                handler.requeue(run_dir, limits, err.step)
                raise
            except BaseException as err:
                record_attempt(
                    run_dir,
                    outcome="failed",
                    seconds=_elapsed(),
                    exception=f"{type(err).__name__}: {err}".splitlines()[0],
                )
                raise
        record_attempt(run_dir, outcome="completed", seconds=_elapsed())
        return str(final)
    finally:
        if slurm:
            end_process_group()


def _elapsed() -> float:
    return round(time.time() - _STARTED, 1)


class _NoContext:
    def __enter__(self) -> _NoContext:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class TrainStage(submitit.helpers.Checkpointable):
    """Train the runs of one task (every DDP rank of them). On USR2 the loop checkpoints its
    exact position and the task is requeued (see the module docstring); ``checkpoint()``,
    inherited from Checkpointable, resubmits this same call, which resumes."""

    def __call__(
        self,
        run_yamls: str | list[str],
        stage_to: str | None = None,
        limits: dict[str, Any] | None = None,
    ) -> Any:
        limits = limits or {}
        if isinstance(run_yamls, str):
            return train_one_run(run_yamls, stage_to, limits)
        if len(run_yamls) == 1:
            return [train_one_run(run_yamls[0], stage_to, limits)]
        return train_packed(run_yamls, stage_to, limits)


def free_port() -> int:
    """A port the OS says is free on this host (outside Slurm: a local packed run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def train_packed(run_yamls: list[str], stage_to: str | None, limits: dict[str, Any]) -> list[str]:
    """Train several runs side by side as child processes (``hpc.packed``) sharing this task's
    CPUs (threads split evenly) and GPU. One failing run does not stop the others: its
    exception is in its own train_attempts.jsonl, and the task still completes so the evals of
    the others run. If any child stopped on USR2 (each checkpointed), the task is requeued."""
    n = len(run_yamls)
    env = dict(os.environ)
    cpus = int(env.get("SLURM_CPUS_PER_TASK", 0) or os.cpu_count() or n)
    env["OMP_NUM_THREADS"] = str(max(1, cpus // n))
    if in_slurm_job():
        env.update(export_torch_env(limits.get("gpu_bind", "node")))
    job_id = env.get("SLURM_JOB_ID")
    children: list[subprocess.Popen] = []
    files = []
    from dhm.training.train import StopRequest

    stop = StopRequest()
    with _Stop(stop, children) as handler:
        for i, text in enumerate(run_yamls):
            f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
            f.write(text)
            f.close()
            files.append(f.name)
            port = master_port(job_id, 1 + i) if job_id else free_port()
            child_env = {**env, "MASTER_PORT": str(port), "DHM_PACKED": "1"}
            # by path, from the tree this task imports (its snapshot on Slurm): ``-m`` would
            # put the working directory, usually the checkout, first on the child's sys.path
            cmd = [sys.executable, str(Path(__file__).with_name("packed.py")), f.name,
                   json.dumps(limits)]  # fmt: skip
            if stage_to:
                cmd.append(stage_to)
            children.append(subprocess.Popen(cmd, env=child_env))
        codes = [c.wait() for c in children]
    for path in files:
        Path(path).unlink(missing_ok=True)
    cfgs = [from_yaml(text) for text in run_yamls]
    stopped = [c for c, code in zip(cfgs, codes, strict=True) if code == STOPPED_EXIT]
    if stopped:
        handler.requeue(Path(stopped[0].run_dir), limits, "each run's own")
    failed = [
        Path(c.run_dir).name
        for c, code in zip(cfgs, codes, strict=True)
        if code not in (0, STOPPED_EXIT)
    ]
    if failed:
        print(
            f"packed runs that failed (see their logs/train_attempts.jsonl): {' '.join(failed)}",
            file=sys.stderr,
            flush=True,
        )
    return [str(Path(c.run_dir) / "checkpoints" / "final.pt") for c in cfgs]


class EvalStage:
    """Evaluate one set of the runs of one task into their shard files: ``parts`` (None: all
    the set has) at ``checkpoint`` (final, or an epoch the runs kept)."""

    def __call__(
        self,
        run_yamls: str | list[str],
        set_name: str,
        role: str,
        run_id: str | None = None,
        checkpoint: Any = "final",
        parts: tuple[str, ...] | None = None,
    ) -> list[str]:
        from dhm.core.variants import checkpoint_file
        from dhm.evaluation.evaluate import evaluate_set

        yamls = [run_yamls] if isinstance(run_yamls, str) else run_yamls
        if in_slurm_job():
            use_allocated_cpus()
        paths, errors = [], []
        for text in yamls:
            cfg = from_yaml(text)
            run_dir = Path(cfg.run_dir)
            weights = run_dir / "checkpoints" / checkpoint_file(checkpoint)
            if len(yamls) > 1 and not weights.exists():
                errors.append(f"{run_dir.name}: no {weights.name}")  # its training failed: skip it
                continue
            require_cuda("the eval", "eval.device", cfg.eval.device)
            env = record_environment(run_dir, f"eval-{set_name}")
            extra = {
                k: env[k]
                for k in ("slurm_job_id", "slurm_array_job_id", "slurm_array_task_id")
                if k in env
            }
            try:
                paths += evaluate_set(cfg, weights, set_name, role, run_dir.name, extra,
                                      parts, checkpoint)  # fmt: skip
            except Exception as err:
                if len(yamls) == 1:
                    raise
                errors.append(f"{run_dir.name}: {type(err).__name__}: {err}")
        if errors and not paths:
            raise RuntimeError("; ".join(errors))
        return [str(p) for p in paths]


class NoOp:
    """A task that does nothing: it keeps an eval array aligned with the train array (aftercorr)."""

    def __call__(self) -> None:
        return None


class AggregateStage:
    """Aggregate a sweep's shards into its summary and report, with the reasons the ledger
    gives for runs that did not finish; fails (non-zero) on missing runs unless allow_partial."""

    def __call__(
        self,
        sweep_dir: str,
        allow_partial: bool,
        replace_summary: bool = False,
        launch: dict[str, Any] | None = None,
        reasons: dict[str, str] | None = None,
        states: dict[str, dict] | None = None,
        run_ids: list[str] | None = None,
        summary_dir: str | Path | None = None,
    ) -> str:
        """Aggregate into ``summary_dir`` (default ``<sweep>/summary``); ``launch``: the launch
        config, whose ledger gives the reasons and states (on a node); else ``reasons`` and
        ``states`` as given (in this process). Returns the summary folder."""
        from dhm.summary.aggregate import aggregate

        if launch is not None:
            reasons, states = run_reports(launch)
        report = aggregate(
            sweep_dir,
            allow_partial=allow_partial,
            reasons=reasons,
            states=states,
            replace_fewer=replace_summary,
            run_ids=run_ids,
            summary_dir=summary_dir,
        )
        return str(report.summary_dir)


def calibrate_models(models: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    """{key: images/s, device (and on CUDA peak and total memory, MB)} of ``steps`` training
    steps (after ``warmup``) of each run config in ``models``, on this process's device."""
    import torch

    from dhm.training.train import make_optimizer, model_for, param_groups, training_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    out: dict[str, Any] = {}
    for key, cfg in models.items():
        model = model_for(cfg).to(device).train()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        opt = make_optimizer(param_groups(model, cfg.train), cfg.train)
        b = cfg.train.batch_size
        x = torch.rand(b, 3, 32, 32, device=device)
        y = torch.randint(0, 8, (b,), device=device)
        for i in range(warmup + steps):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            loss, _ = training_loss(model(x, k=cfg.model.importance_num), y, cfg.model, model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        out[key] = {"images_per_s": steps * b / (time.perf_counter() - start), "device": name}
        if cuda:
            out[key]["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            props = torch.cuda.get_device_properties(device)
            out[key]["device_mem_mb"] = props.total_memory / 2**20
        print(f"calibrated {key}: {out[key]['images_per_s']:.1f} images/s on {name}")
    return out


def check_warm_start(cfg: Any, path: str) -> None:
    """Load the warm-start checkpoint ``path`` into the model of run config ``cfg``
    (CheckpointError or ConfigError names the file when it does not fit)."""
    from dhm.training.train import apply_warm_start, model_for

    apply_warm_start(model_for(cfg), path)
