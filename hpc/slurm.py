"""Slurm through submitit: what the cluster offers, arrays with dependencies, checks before the
first sbatch call, submission that never leaves a launch half done.

Before anything is submitted, in ``mode=run`` and ``mode=dry_run`` alike: the partition and
its nodes (sinfo: node count, CPUs, memory and GPUs per node, time limit) against every
stage's resources, the array size against MaxArraySize, the task count against MaxSubmitJobs,
and ``sbatch --test-only`` on each array's own script. If an sbatch call fails anyway, the
arrays this launch already submitted are cancelled and the ledger says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from omegaconf import OmegaConf
from submitit.slurm.slurm import _make_sbatch_string  # the script submitit writes

from dhm.core.config import ConfigError
from hpc import ledger
from hpc.ledger import SlurmError, Started, run_slurm
from hpc.schema import memory_mb, parse_time_minutes, ranks_per_node

__all__ = ["ArraySpec", "ClusterInfo", "SlurmError", "cluster_info", "submit_all"]


@dataclass
class Partition:
    name: str
    default: bool
    time_minutes: int | None  # None: infinite
    nodes: list[str] = field(default_factory=list)
    cpus: dict[str, int] = field(default_factory=dict)  # node -> CPUs
    mem_mb: dict[str, int] = field(default_factory=dict)
    gpu_types: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> type -> count

    @property
    def gpus(self) -> dict[str, int]:
        """node -> GPUs of any type."""
        return {node: sum(types.values()) for node, types in self.gpu_types.items()}


@dataclass
class ClusterInfo:
    partitions: dict[str, Partition]
    max_array_size: int
    max_submit: int | None  # MaxSubmitJobs of the user's association or QOS (None: no limit)

    def partition(self, name: str | None) -> Partition:
        if name is None:
            return next(
                (p for p in self.partitions.values() if p.default),
                next(iter(self.partitions.values())),
            )
        return self.partitions[name]


def _gpu_types(gres: str) -> dict[str, int]:
    """sinfo's Gres ('gpu:a100:4(S:0-1),gpu:2') -> {type: count}; '' for untyped GPUs."""
    out: dict[str, int] = {}
    for item in gres.split(","):
        m = re.match(r"^gpu(?::([^:(]+))?:(\d+)", item.strip())
        if m:
            out[m.group(1) or ""] = out.get(m.group(1) or "", 0) + int(m.group(2))
    return out


def _time(text: str) -> int | None:
    if text in ("infinite", "UNLIMITED", ""):
        return None
    try:
        return parse_time_minutes(text, "MaxTime")
    except ConfigError:
        return None


class AskedCluster:
    """The questions ``cluster_info`` asks, started when this is made (four round trips to the
    controller and the accounting database, at once), answered by ``info()``: a launch
    expands its grid meanwhile."""

    def __init__(self) -> None:
        self.sbatch = shutil.which("sbatch") is not None
        if not self.sbatch:
            return
        self.partitions = Started(["sinfo", "-h", "-o", "%P|%l"], "reading partitions")
        self.nodes = Started(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%m|%G"], "reading nodes")
        self.config = Started(["scontrol", "show", "config"], "reading the Slurm config")
        self.assoc = Started(
            [
                "sacctmgr", "-n", "-P", "show", "assoc", f"user={getpass.getuser()}",
                "format=maxsubmit,qos",
            ],
            "reading limits",
        )  # fmt: skip

    def close(self) -> None:
        """Reap the commands whose answers were not read (a launch refused before)."""
        if self.sbatch:
            for started in (self.partitions, self.nodes, self.config, self.assoc):
                started.close()

    def info(self) -> ClusterInfo:
        """Partitions and their nodes (sinfo), MaxArraySize (scontrol), submit limits
        (sacctmgr); ConfigError when this is no Slurm login node."""
        if not self.sbatch:
            raise ConfigError(
                "cluster=slurm but sbatch is not on PATH (is this a Slurm login node?)"
            )
        parts: dict[str, Partition] = {}
        for line in self.partitions.answer().splitlines():
            name, limit = line.split("|")[:2]
            parts[name.rstrip("*")] = Partition(name.rstrip("*"), name.endswith("*"), _time(limit))
        for line in self.nodes.answer().splitlines():
            node, part, cpus, mem, gres = (line.split("|") + [""] * 5)[:5]
            p = parts.get(part.rstrip("*"))
            if p is None:
                continue
            if node not in p.nodes:
                p.nodes.append(node)
            p.cpus[node] = int(cpus) if cpus.isdigit() else 0
            p.mem_mb[node] = int(mem) if mem.isdigit() else 0
            p.gpu_types[node] = _gpu_types(gres)
        m = re.search(r"^MaxArraySize\s*=\s*(\d+)", self.config.answer(), re.M)
        max_array = int(m.group(1)) if m else 1001
        return ClusterInfo(parts, max_array, self._max_submit())

    def _max_submit(self) -> int | None:
        """The smallest MaxSubmitJobs of this user's associations and their QOS (None: none
        set, or sacctmgr cannot say)."""
        limits = []
        try:
            qos_names = set()
            for line in self.assoc.answer().splitlines():
                value, _, qos = line.partition("|")
                if value.isdigit():
                    limits.append(int(value))
                qos_names.update(q for q in qos.split(",") if q)
            if qos_names:
                qos = run_slurm(
                    [
                        "sacctmgr", "-n", "-P", "show", "qos", f"names={','.join(qos_names)}",
                        "format=maxsubmitpu",
                    ],
                    "reading limits",
                )  # fmt: skip
                limits += [int(v) for v in qos.split() if v.isdigit()]
        except SlurmError:
            return None
        return min(limits) if limits else None


def cluster_info() -> ClusterInfo:
    """What the cluster offers and allows (see ``AskedCluster.info``)."""
    asked = AskedCluster()
    try:
        return asked.info()
    finally:
        asked.close()


@dataclass
class Resources:
    """What one task of a stage asks for."""

    nodes: int
    ntasks: int  # per node
    cpus: int  # per task
    gpus: int  # per node
    mem: str | None  # per node
    time: int  # minutes
    exclude: str | None = None


def stage_resources(cfg: Any, stage: str) -> Resources:
    c = cfg.cluster
    if stage == "train":
        return Resources(
            c.nodes,
            ranks_per_node(c),
            c.cpus_per_task,
            c.gpus_per_node,
            c.mem,
            parse_time_minutes(c.time, "cluster.time"),
            c.exclude,
        )
    if stage == "eval":
        return Resources(
            1,
            1,
            c.eval_cpus,
            c.eval_gpus,
            c.eval_mem if c.eval_mem is not None else c.mem,
            parse_time_minutes(c.eval_time, "cluster.eval_time"),
            c.exclude,
        )
    return Resources(
        1, 1, 1, 0, None, parse_time_minutes(c.aggregate_time, "cluster.aggregate_time"), c.exclude
    )


def check_resources(cfg: Any, info: ClusterInfo, stages: dict[str, Resources]) -> None:
    """ConfigError naming the key when a stage asks for more than the partition's nodes have
    (nodes, CPUs, GPUs, memory per node, time): such a job would pend forever."""
    c = cfg.cluster
    names = str(c.partition).split(",") if c.partition is not None else [None]
    for name in names:
        if name is not None and name not in info.partitions:
            raise ConfigError(
                f"cluster.partition={c.partition!r}: {name} is not a partition sinfo knows: "
                f"{', '.join(info.partitions) or '(none)'}"
            )
    parts = [info.partition(n) for n in names]
    for stage, r in stages.items():
        keys = {
            "train": ("nodes", "cpus_per_task", "gpus_per_node", "time"),
            "eval": ("nodes", "eval_cpus", "eval_gpus", "eval_time"),
            "aggregate": ("nodes", "cpus_per_task", "gpus_per_node", "aggregate_time"),
        }[stage]
        for p in parts:
            where = f"partition {p.name}"
            if r.nodes > len(p.nodes):
                raise ConfigError(
                    f"cluster.nodes={r.nodes} is not allowed: {where} has "
                    f"{len(p.nodes)} node(s) ({', '.join(p.nodes)})"
                )
            cpus = sorted(p.cpus.values())
            need = r.ntasks * r.cpus
            if cpus and need > cpus[-1]:
                raise ConfigError(
                    f"cluster.{keys[1]}={r.cpus} x {r.ntasks} task(s) per node = {need} CPUs is "
                    f"not allowed for the {stage} stage: the largest node of {where} has "
                    f"{cpus[-1]} CPUs"
                )
            if r.gpus and c.gpu_type is not None:
                have = {n: t.get(c.gpu_type, 0) for n, t in p.gpu_types.items()}
                if not any(have.values()):
                    offered = sorted({t or "(untyped)" for ts in p.gpu_types.values() for t in ts})
                    raise ConfigError(
                        f"cluster.gpu_type={c.gpu_type!r} is not allowed: no node of {where} has "
                        f"GPUs of that type; its GPUs: {', '.join(offered) or 'none'}"
                    )
                only = {n: {c.gpu_type: k} for n, k in have.items()}
                p = dataclasses.replace(p, gpu_types=only)  # only that type counts below
            gpus = max(p.gpus.values(), default=0)
            if r.gpus > gpus:
                raise ConfigError(
                    f"cluster.{keys[2]}={r.gpus} is not allowed: nodes of {where} "
                    f"have at most {gpus} GPU(s)"
                )
            big = sorted(p.cpus, key=lambda n: p.cpus[n], reverse=True)
            fits = [n for n in big if p.cpus[n] >= need and p.gpus.get(n, 0) >= r.gpus]
            if len(fits) < r.nodes:
                raise ConfigError(
                    f"cluster.nodes={r.nodes} with {need} CPUs and {r.gpus} GPU(s) per node is "
                    f"not allowed: only {len(fits)} node(s) of {where} have that much"
                )
            mem = max(p.mem_mb.values(), default=0)
            if r.mem is not None and mem and memory_mb(r.mem, "cluster.mem") > mem:
                raise ConfigError(
                    f"cluster.mem={r.mem} is not allowed: nodes of {where} have at most {mem} MB"
                )
            if p.time_minutes is not None and r.time > p.time_minutes:
                raise ConfigError(
                    f"cluster.{keys[3]} ({r.time} min) is not allowed: {where} "
                    f"allows at most {p.time_minutes} min"
                )


# ---------------------------------------------------------------------------- arrays


class Yamls:
    """The configs of one task's runs, dumped to YAML only when the task is submitted: a dry
    run, which prints the arrays, never needs them."""

    def __init__(self, runs: Any, stored: dict[str, str] | None = None) -> None:
        self.runs = list(runs)
        self.stored = stored or {}  # run id -> the config a resuming run's own code wrote

    def __len__(self) -> int:
        return len(self.runs)

    def resolve(self) -> list[str]:
        return [self.stored.get(run.run_id, run.yaml) for run in self.runs]


def _resolved(call: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.resolve() if isinstance(a, Yamls) else a for a in call)


@dataclass
class ArraySpec:
    """One sbatch call: a stage over several tasks, with its Slurm parameters."""

    stage: str  # train | eval:<set>[:<role>] | aggregate
    tasks: list[dict[str, Any]]  # what each task does ({runs: [...], set: ...}): the ledger
    calls: list[tuple[Any, ...]]  # (callable, *args) per task; run configs as Yamls
    params: dict[str, Any]  # submitit SlurmExecutor parameters
    depends_on: int | None = None  # index of the spec (a train array) this one pairs with
    dependency_kind: str | None = None  # aftercorr | afterany
    group: str = ""  # resource class / chunk label, shown in the plan
    code: Path | None = None  # the code snapshot its tasks import from (hpc.snapshot)


def base_params(cfg: Any, name: str) -> dict[str, Any]:
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": f"dhm-{cfg.sweep.name}-{name}",
        "array_parallelism": c.array_parallelism,
        "signal_delay_s": c.signal_delay_s,
        "setup": [f"export {k}={shlex.quote(str(v))}" for k, v in (c.env or {}).items()]
        + list(c.setup or []),
        "additional_parameters": dict(OmegaConf.to_container(c.extra_sbatch) or {})
        if not isinstance(c.extra_sbatch, dict)
        else dict(c.extra_sbatch),
    }
    for key in ("partition", "account", "qos", "constraint"):
        if c[key] is not None:
            params[key] = c[key]
    return params


def stage_params(cfg: Any, stage: str, r: Resources, name: str) -> dict[str, Any]:
    """submitit parameters of one stage with resources ``r``."""
    params = base_params(cfg, name)
    params.update(time=r.time, nodes=r.nodes, ntasks_per_node=r.ntasks, cpus_per_task=r.cpus)
    kind = f"{cfg.cluster.gpu_type}:" if cfg.cluster.gpu_type else ""
    if r.gpus and stage == "train" and cfg.cluster.gpu_bind == "task":
        params["gpus_per_task"] = f"{kind}{r.gpus // r.ntasks}"  # one a rank (ntasks == gpus)
    elif r.gpus:
        params["gpus_per_node"] = f"{kind}{r.gpus}" if kind else r.gpus
    if r.mem is not None:
        params["mem"] = r.mem
    if r.exclude:
        params["exclude"] = r.exclude
    if stage == "train":
        params["additional_parameters"].setdefault("requeue", True)
    return params


def dependency_string(kind: str, job_ids: list[str], single_task: bool) -> str:
    # aftercorr pairs array task i with task i; a job that is not an array has no task ids,
    # so a one-task stage waits with afterok instead.
    if kind == "aftercorr" and single_task:
        kind = "afterok"
    return f"{kind}:" + ":".join(job_ids)


# More than enough to never stop a requeue: TrainStage bounds time-outs and preemptions itself
# (submitit counts every USR2 as a time-out when the limit is under 10 minutes).
SUBMITIT_MAX_TIMEOUTS = 10_000


def task_command(cfg: Any, folder: Path, code: Path | None) -> str:
    """What every task of an array runs: the snapshot's ``hpc/task.py`` by path (it puts the
    snapshot first on sys.path, see ``hpc.task``), never ``-m`` from the working directory."""
    python = cfg.cluster.python or shlex.quote(sys.executable)
    here = Path(__file__).parent if code is None else Path(code).resolve() / "hpc"
    entry = here / "task.py"
    return f"{python} -u {shlex.quote(str(entry))} {shlex.quote(str(folder))}"


class _Executor(submitit.SlurmExecutor):
    """submitit's executor with this launcher's task command, and the tasks' pickles written
    under names a task can find without the launch (``pending_<token>_<i>.pkl``): a launch
    killed after sbatch returned leaves jobs that still run (``hpc.task.claim_pickle``)."""

    def __init__(self, folder: Path, command: str, token: str) -> None:
        super().__init__(folder=folder, max_num_timeout=SUBMITIT_MAX_TIMEOUTS)
        self.command, self.token = command, token

    @property
    def _submitit_command_str(self) -> str:
        return self.command

    def _internal_process_submissions(self, delayed: list[Any]) -> list[Any]:
        folder = submitit.core.utils.JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        pickles = []
        for i, d in enumerate(delayed):
            d.set_timeout(self.parameters.get("time", 5), self.max_num_timeout)
            pickles.append(folder / f"pending_{self.token}_{i}.pkl")
            d.dump(pickles[-1])
        submitter = submitit.SlurmExecutor(self.folder, self.max_num_timeout)
        submitter.update_parameters(**self.parameters)
        if len(delayed) > 1:
            submitter.parameters["map_count"] = len(delayed)
        first = submitter._submit_command(self.command)
        names = (
            [f"{first.job_id}_{i}" for i in range(len(delayed))]
            if len(delayed) > 1
            else [first.job_id]
        )
        jobs = []
        for name, path in zip(names, pickles, strict=True):
            job = submitit.SlurmJob(
                folder=self.folder, job_id=name, tasks=list(range(first.num_tasks))
            )
            with contextlib.suppress(FileNotFoundError):  # a started task renamed it first
                job.paths.move_temporary_file(path, "submitted_pickle")
            jobs.append(job)
        return jobs


def render_script(cfg: Any, folder: Path, params: dict[str, Any], n_tasks: int,
                  code: Path | None = None) -> str:  # fmt: skip
    """The sbatch script submitit would write for this array (dry runs, --test-only)."""
    extra = {"map_count": n_tasks} if n_tasks > 1 else {}
    command = task_command(cfg, folder, code)
    return _make_sbatch_string(command=command, folder=folder, **params, **extra)


_JOB_NAME_LINE = re.compile(r"^#SBATCH --job-name=.*$", re.M)


def test_only(cfg: Any, folder: Path, specs: list[ArraySpec]) -> None:
    """``sbatch --test-only`` on every array's script (without its dependency, whose job does
    not exist yet): Slurm's own verdict on the resources, before anything is submitted. Arrays
    whose scripts differ only in their job name (the eval arrays of several sets, chunks of one
    size) get one call, and the calls run concurrently (each is a round trip to slurmctld); the
    first refusal, in plan order, is raised."""
    scripts = []
    for spec in specs:
        params = {k: v for k, v in spec.params.items() if k != "dependency"}
        scripts.append(render_script(cfg, folder, params, len(spec.tasks), spec.code))
    first: dict[str, int] = {}  # the script without its job name -> its first array
    for i, text in enumerate(scripts):
        first.setdefault(_JOB_NAME_LINE.sub("", text), i)
    paths, procs = [], {}
    try:
        for i in first.values():
            with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
                f.write(scripts[i])
            paths.append(f.name)
            procs[i] = subprocess.Popen(
                ["sbatch", "--test-only", f.name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        results = {i: p.communicate(timeout=60) + (p.returncode,) for i, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for path in paths:
            Path(path).unlink(missing_ok=True)
    for spec, text in zip(specs, scripts, strict=True):
        stdout, stderr, code = results[first[_JOB_NAME_LINE.sub("", text)]]
        if code != 0:
            message = (stderr or stdout).strip().splitlines()
            raise SlurmError(
                f"sbatch --test-only refused the {spec.stage} array "
                f"({len(spec.tasks)} tasks{', ' + spec.group if spec.group else ''}): "
                f"{message[-1] if message else 'no reason given'}"
            )


@contextlib.contextmanager
def _stderr_to(sink: Any) -> Any:
    """Point fd 2 at ``sink`` (a file) for the block: sbatch writes its errors straight to the
    terminal, and the launch's own one-line message already says what it said."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def submit_array(cfg: Any, folder: Path, spec: ArraySpec, dependency: str | None,
                 token: str) -> str:  # fmt: skip
    """Submit one stage as one sbatch call; return the Slurm job id (array master id). The job
    carries ``--comment=dhm:<token>:<sweep folder>`` (``ledger.adopt`` finds it by that) and
    its tasks import from ``spec.code``."""
    params = dict(spec.params)
    extra = {**params["additional_parameters"], "comment": ledger.job_comment(cfg, token)}
    if dependency:
        params["dependency"] = dependency
        extra["kill-on-invalid-dep"] = "yes"
    params["additional_parameters"] = extra
    params["setup"] = [*params.get("setup", []), f"export DHM_TOKEN={token}"]
    executor = _Executor(folder, task_command(cfg, folder, spec.code), token)
    executor.update_parameters(**params)
    with tempfile.TemporaryFile("w+") as sink:
        try:
            with _stderr_to(sink), executor.batch():
                jobs = [executor.submit(*_resolved(call)) for call in spec.calls]
        except BaseException:  # nothing was queued: its pickles are not needed
            for path in folder.glob(f"pending_{token}_*.pkl"):
                path.unlink(missing_ok=True)
            raise
        sink.seek(0)
        sys.stderr.write(sink.read())  # warnings of a successful sbatch call
    return jobs[0].job_id.split("_")[0]


RECORDED_PARAMS = ("mem", "exclude", "nodes", "ntasks_per_node", "cpus_per_task",
                   "gpus_per_node", "gpus_per_task")  # fmt: skip


_SHIELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _shielded() -> Any:
    """SIGINT and SIGTERM held back for the block: blocked, so the children it starts (sbatch,
    squeue, scancel) inherit the mask too. A Ctrl-C at the terminal reaches the whole process
    group and must not kill an sbatch call half way; ``_interrupted`` reads what arrived."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SHIELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _interrupted() -> str | None:
    """The name of a SIGINT or SIGTERM held back by ``_shielded`` (taken: it is not delivered
    again when the block ends), or None."""
    pending = signal.sigpending() & _SHIELD
    return signal.Signals(signal.sigwait(pending)).name if pending else None


def _cancel_launch(cfg: Any, ids: list[str], tokens: list[str], why: str) -> tuple[list[str], str]:
    """scancel what this launch submitted: the recorded ids and any job carrying one of its
    tokens that the ledger did not record. (the ids cancelled, a note when the queue could not
    be searched: then the unrecorded intents stay for the next command to adopt)."""
    note = ""
    try:
        found = ledger.jobs_by_token(cfg, tokens)
        settled = list(tokens)  # searched: a token without a job was never submitted
    except SlurmError as err:
        found, settled, note = {}, [], f" (the queue could not be searched: {err})"
    ids = list(dict.fromkeys([*ids, *(j for t in tokens for j in found.get(t, []))]))
    ledger.scancel(ids)
    ledger.record_cancel(cfg, ids, why, settled)
    return ids, note


def submit_all(cfg: Any, folder: Path, specs: list[ArraySpec], in_flight: list[str]) -> list[str]:
    """Submit the arrays in order, wiring dependencies; record each in the ledger.

    An eval array waits (aftercorr) for the train array it pairs with; the aggregate job for
    every array of this launch and the tasks of earlier launches still in flight. Before each
    sbatch call the ledger records the intent (its token, stage and tasks), so a launch killed
    at any point leaves jobs the next command finds (``ledger.adopt``). If a call fails, or
    Ctrl-C or SIGTERM arrives (held back while sbatch runs, see ``_shielded``), the arrays
    already submitted are cancelled, the ledger records it, and SlurmError says what happened
    in one line.
    """
    ids: list[str] = []
    tokens: list[str] = []
    with _shielded():
        for spec in specs:
            dependency = None
            if spec.dependency_kind == "aftercorr" and spec.depends_on is not None:
                single = len(spec.tasks) == 1
                dependency = dependency_string("aftercorr", [ids[spec.depends_on]], single)
            elif spec.stage == "aggregate" and (ids or in_flight):
                dependency = dependency_string(
                    "afterany", list(dict.fromkeys([*ids, *in_flight])), False
                )
            params = {k: spec.params[k] for k in RECORDED_PARAMS if spec.params.get(k) is not None}
            code = spec.code.name if spec.code is not None else ""
            try:
                tokens.append(ledger.record_intent(cfg, spec.stage, spec.tasks, dependency,
                                                   params, code))  # fmt: skip
                job_id = submit_array(cfg, folder, spec, dependency, tokens[-1])
                ids.append(job_id)
                ledger.record_submission(cfg, spec.stage, job_id, spec.tasks, dependency, params,
                                         token=tokens[-1], code=code)  # fmt: skip
            except Exception as err:  # submitit's FailedJobError and friends: sbatch said no
                lines = str(err).strip().splitlines()
                reason = next(
                    (ln for ln in reversed(lines) if "error" in ln.lower()),
                    lines[-1] if lines else type(err).__name__,
                ).strip()
                done, note = _cancel_launch(cfg, ids, tokens, f"sbatch failed for {spec.stage}: "
                                            f"{reason}")  # fmt: skip
                cancelled = (
                    f"; cancelled the {len(done)} array(s) it had submitted ({' '.join(done)})"
                )
                raise SlurmError(
                    f"sbatch failed for the {spec.stage} array: {reason}"
                    f"{cancelled if done else ''}; nothing of this launch is queued{note}"
                ) from None
            print(f"submitted {spec.stage}: job {job_id} ({len(spec.tasks)} task(s))", flush=True)
            name = _interrupted()
            if name is not None:
                done, note = _cancel_launch(cfg, ids, tokens, f"launch interrupted ({name})")
                raise SlurmError(
                    f"interrupted ({name}) while submitting: cancelled the {len(done)} array(s) "
                    f"this launch had submitted ({' '.join(done)}); nothing of it is queued{note}"
                )
    return ids
