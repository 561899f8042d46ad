"""Typed schema of the launcher's config (the science groups plus sweep, cluster, mode and the
selection of runs) and its value checks, in one place.

Registered in Hydra's ConfigStore as ``base_config``; configs/config.yaml starts from it, so an
unknown key or a wrong type fails while composing (``check_launch`` also refuses keys added
with ``+``). Every value that reaches an sbatch script, a job name or a path is checked here,
before anything is written or submitted; what only Slurm can answer (partitions, node sizes,
array limits) is checked in ``hpc.slurm``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from dhm.core.config import ConfigError, RunSections, check_known_keys
from hpc.distributed import MAX_RUNS_PER_TASK

MODES = ("run", "dry_run", "evaluate", "status", "cancel", "aggregate", "report", "calibrate")
# Modes that read a stored sweep without planning or submitting (hpc.stored).
STORED_MODES = ("status", "cancel", "report")
CLUSTERS = ("local", "slurm")
CODES = ("launched", "latest")  # code=
GPU_BINDS = ("node", "task")  # cluster.gpu_bind
# A value that goes into an #SBATCH line: no whitespace, quotes or shell syntax.
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:=+@%/\-\[\]]*$")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./~+@%,:=\-]+$")  # root: no spaces, quotes or shell syntax
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")  # sweep.name: one folder name
_SAFE_PROGRAM = re.compile(r"^[A-Za-z0-9_./+\-]+$")  # cluster.python: a path or a command name
_MEMORY = re.compile(r"^(\d+)([KMGT]?)$")
_MEMORY_MB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}


@dataclass
class SweepConfig:
    """A grid: the cartesian product of ``axes`` plus explicit ``points`` (dotted overrides),
    each point repeated for ``seeds`` values of train.seed, and crossed with the dimensions
    ``-m``/``--multirun`` turned its comma lists and ranges into (``multirun``)."""

    name: str = "single"
    axes: dict[str, Any] = field(default_factory=dict)  # "model.beta": [0.001, 0.01]
    points: list[Any] = field(default_factory=list)  # [{"model.name": "resnet", ...}]
    seeds: int | None = None  # n: every point with train.seed = its seed + 0 .. n-1
    multirun: list[Any] = field(default_factory=list)  # written by -m: [[{key: value}, ...], ...]


@dataclass
class ClusterConfig:
    """Where and how stages run: ``kind`` local (in this process) or slurm (submitit arrays);
    ``name`` is the profile's own (a site's copy of slurm.yaml names itself)."""

    name: str = "local"
    kind: str | None = None  # local | slurm; null: the name's, for the shipped local and slurm
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"  # train task limit: [D-]HH:MM:SS, MM, MM:SS, D-HH, D-HH:MM
    nodes: int = 1
    gpus_per_node: int = 0
    # How a train task's ranks find their GPU: node (--gpus-per-node: every task sees the node's
    # GPUs, rank r uses local index r) or task (--gpus-per-task=1: each task sees only its own
    # and uses device 0). hpc.distributed.bind_device sets what the science reads.
    gpu_bind: str = "node"
    gpu_type: str | None = None  # a GRES type (a100, h100, ...): --gpus-per-node=<type>:<n>
    tasks_per_node: int | None = None  # None: gpus_per_node (one rank per GPU), or 1 on CPU
    cpus_per_task: int = 2
    mem: str | None = None  # per node, e.g. 32G
    eval_mem: str | None = None  # per eval task; None: as mem
    constraint: str | None = None
    exclude: str | None = None  # nodes never to use, e.g. node[3-4]
    array_parallelism: int = 64
    max_array_size: int | None = None  # None: Slurm's MaxArraySize (scontrol show config)
    runs_per_task: Any = 1  # runs trained side by side in one array task (an int, or "auto")
    eval_time: str = "01:00:00"
    eval_gpus: int = 0  # GPUs of one eval task
    eval_cpus: int = 2
    aggregate_time: str = "00:30:00"
    setup: list[str] = field(default_factory=list)  # shell lines run before each task
    # Environment of every task, exported (quoted) before it starts: NCCL_SOCKET_IFNAME,
    # NCCL_DEBUG, ... Names are shell variable names; values any text on one line.
    env: dict[str, str] = field(default_factory=dict)
    extra_sbatch: dict[str, Any] = field(default_factory=dict)  # more sbatch options
    stage_data: bool = False  # copy data.root to node-local scratch before training
    scratch: str = "$TMPDIR"  # expanded on the compute node; /tmp if it names nothing
    python: str | None = None  # interpreter on the nodes; None: this one
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint + requeue
    max_requeues: int = 3  # requeues after time-outs, and separately after preemptions
    oom_mem_factor: float = 2.0  # relaunch after OUT_OF_MEMORY with mem x this ...
    max_mem: str | None = None  # ... up to this (None: refuse to guess, say so)
    budget_gpu_hours: float | None = None  # refuse a plan estimated above this
    disk_quota_gb: float | None = None  # refuse a plan whose disk estimate is above this


@dataclass
class LaunchConfig(RunSections):
    sweep: SweepConfig = field(default_factory=SweepConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    root: str = "outputs"
    mode: str = "run"  # run | dry_run | evaluate | status | cancel | aggregate | report | calibrate
    runs: list[str] | None = None  # act on these run ids (or unique prefixes) only
    where: dict[str, Any] = field(default_factory=dict)  # ... and on runs with these settings
    retry_failed: bool = False  # relaunch runs whose task raised a Python exception
    replan: bool = False  # accept a plan whose runs differ from the stored one (kept aside)
    replace_summary: bool = False  # replace a summary with one that has fewer complete runs
    allow_partial: bool = False  # aggregation exits 0 even if some runs are missing
    # The code a resuming run's training imports: launched (the snapshot it started under) or
    # latest (this launch's; with runs=[...] to move only those runs). hpc.snapshot.
    code: str = "launched"
    lock_wait_s: float = 60.0  # how long a command waits for another one's lock on the sweep


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=LaunchConfig)


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def memory_mb(value: str, key: str) -> int:
    """Slurm memory ('500', '500M', '32G', '1T'; default unit MB) -> MB; ConfigError otherwise."""
    m = _MEMORY.match(str(value).strip().upper())
    if not m:
        _fail(key, value, "a Slurm memory size such as 4000, 500M, 32G or 1T")
    return int(int(m.group(1)) * _MEMORY_MB[m.group(2)])


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


_TIME_FORMS = (
    (re.compile(r"^(\d+)$"), ("m",)),
    (re.compile(r"^(\d+):(\d{1,2})$"), ("m", "s")),
    (re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})$"), ("h", "m", "s")),
    (re.compile(r"^(\d+)-(\d+)$"), ("d", "h")),
    (re.compile(r"^(\d+)-(\d+):(\d{1,2})$"), ("d", "h", "m")),
    (re.compile(r"^(\d+)-(\d+):(\d{1,2}):(\d{1,2})$"), ("d", "h", "m", "s")),
)
_MINUTES = {"d": 1440.0, "h": 60.0, "m": 1.0, "s": 1 / 60}


def ranks_per_node(cluster: Any) -> int:
    if cluster.tasks_per_node is not None:
        return int(cluster.tasks_per_node)
    return max(1, int(cluster.gpus_per_node))


def runs_per_task(cluster: Any) -> int | str:
    value = cluster.runs_per_task
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or not 1 <= n <= MAX_RUNS_PER_TASK or str(n) != str(value).strip():
        _fail("cluster.runs_per_task", value, f"an integer in 1..{MAX_RUNS_PER_TASK}, or auto")
    return n


def check_batch_split(cluster: Any, batch_size: int, where: str) -> None:
    """The global batch must split evenly over the DDP ranks of a train task."""
    world = cluster.nodes * ranks_per_node(cluster)
    if batch_size % world:
        raise ConfigError(
            f"{where}train.batch_size={batch_size} does not split over {world} DDP ranks "
            f"(cluster.nodes={cluster.nodes} x {ranks_per_node(cluster)} per node): "
            f"use a multiple of {world}"
        )


def _check_text(key: str, value: Any, pattern: re.Pattern, allowed: str) -> None:
    if value is not None and not pattern.match(str(value)):
        _fail(key, value, allowed)


def cluster_kind(c: Any) -> str:
    """local or slurm: the profile's ``kind``, or for a profile without one its name's (the
    shipped ``local`` and ``slurm``; a site profile must say). ConfigError otherwise."""
    kind = c.kind if c.kind is not None else c.name
    if kind not in CLUSTERS:
        if c.kind is None:
            raise ConfigError(
                f"cluster.kind is missing in profile {c.name!r}: a site profile says what kind "
                f"of cluster it is (kind: slurm or kind: local), as configs/cluster/slurm.yaml does"
            )
        _fail("cluster.kind", c.kind, " or ".join(CLUSTERS))
    return kind


def on_slurm(cfg: Any) -> bool:
    """Whether this launch's stages go to Slurm (cluster.kind slurm)."""
    return cluster_kind(cfg.cluster) == "slurm"


def check_cluster(c: Any) -> None:
    """Value checks of a cluster profile (no Slurm query); ConfigError names the key."""
    cluster_kind(c)
    _check_text(
        "cluster.name", c.name, _SAFE_NAME, "a profile name: letters, digits and _ . - only"
    )
    for key in ("nodes", "cpus_per_task", "eval_cpus", "array_parallelism"):
        if c[key] < 1:
            _fail(f"cluster.{key}", c[key], "an integer >= 1")
    for key in ("gpus_per_node", "eval_gpus", "max_requeues", "signal_delay_s"):
        if c[key] < 0:
            _fail(f"cluster.{key}", c[key], "an integer >= 0")
    if c.max_array_size is not None and c.max_array_size < 2:
        _fail("cluster.max_array_size", c.max_array_size, "an integer >= 2, or null")
    if c.tasks_per_node is not None and c.tasks_per_node < 1:
        _fail("cluster.tasks_per_node", c.tasks_per_node, "an integer >= 1, or null")
    if c.gpus_per_node and c.tasks_per_node not in (None, c.gpus_per_node):
        raise ConfigError(
            f"cluster.tasks_per_node={c.tasks_per_node} with cluster.gpus_per_node="
            f"{c.gpus_per_node}: one DDP rank per GPU, so tasks_per_node must equal gpus_per_node"
        )
    if c.gpu_bind not in GPU_BINDS:
        _fail("cluster.gpu_bind", c.gpu_bind, " or ".join(GPU_BINDS))
    runs_per_task(c)
    if not c.oom_mem_factor > 1:
        _fail("cluster.oom_mem_factor", c.oom_mem_factor, "a factor > 1")
    if c.budget_gpu_hours is not None and not c.budget_gpu_hours > 0:
        _fail("cluster.budget_gpu_hours", c.budget_gpu_hours, "a number of hours > 0, or null")
    if c.disk_quota_gb is not None and not c.disk_quota_gb > 0:
        _fail("cluster.disk_quota_gb", c.disk_quota_gb, "a number of GB > 0, or null")
    for key in ("time", "eval_time", "aggregate_time"):
        parse_time_minutes(c[key], f"cluster.{key}")
    if c.signal_delay_s >= 60 * parse_time_minutes(c.time, "cluster.time"):
        raise ConfigError(
            f"cluster.signal_delay_s={c.signal_delay_s} is not allowed: it must be shorter than "
            f"the train time limit cluster.time={c.time}"
        )
    _check_cluster_text(c)


def _check_cluster_text(c: Any) -> None:
    """The cluster profile's text that reaches an sbatch line or a job script: sbatch-safe
    characters, parseable memory sizes, one command per setup line; ConfigError names the key."""
    sbatch_chars = "letters, digits and _ . , : = + @ % / - [ ] only (it goes into an sbatch line)"
    for key in (
        "partition",
        "account",
        "qos",
        "mem",
        "eval_mem",
        "constraint",
        "exclude",
        "max_mem",
        "gpu_type",
    ):
        _check_text(f"cluster.{key}", c[key], SAFE_VALUE, sbatch_chars)
    for key in ("mem", "eval_mem", "max_mem"):
        if c[key] is not None:
            memory_mb(c[key], f"cluster.{key}")
    for key, value in (c.extra_sbatch or {}).items():
        if not re.match(r"^[a-z][a-z0-9-]*$", str(key)) or not SAFE_VALUE.match(str(value)):
            raise ConfigError(
                f"cluster.extra_sbatch.{key}={value!r} is not allowed: option names are lowercase "
                "sbatch long options, values letters, digits and _ . , : = + @ % / - [ ] only"
            )
        if key in ("comment", "array", "job-name", "output", "error"):
            raise ConfigError(
                f"cluster.extra_sbatch.{key} is not allowed: the launcher sets --{key} itself "
                "(--comment marks each job with its sweep folder, so that a launch that died "
                "before recording its jobs cannot submit them twice)"
            )
    for i, line in enumerate(c.setup or []):
        if any(ch in str(line) for ch in "\n\r\0"):
            raise ConfigError(f"cluster.setup[{i}] contains a newline: give one command per entry")
    for key, value in (c.env or {}).items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(key)):
            _fail(f"cluster.env.{key}", value, "a variable name: letters, digits and _ only")
        if value is None or any(ch in str(value) for ch in "\n\r\0"):
            _fail(f"cluster.env.{key}", value, "text on one line")
    _check_text(
        "cluster.python",
        c.python,
        _SAFE_PROGRAM,
        "a path or a command name (letters, digits and _ . / + - only; it is written "
        "into the job script unquoted)",
    )
    if any(ch in str(c.scratch) for ch in "\n\r\0"):
        _fail("cluster.scratch", c.scratch, "one path without control characters")


def check_launch(cfg: Any, schema: type = LaunchConfig) -> None:
    """Every launcher value check: known keys, mode, root, sweep name, selection, cluster."""
    check_known_keys(cfg, schema)
    if cfg.mode not in MODES:
        _fail("mode", cfg.mode, ", ".join(MODES))
    _check_text(
        "root",
        cfg.root,
        _SAFE_PATH,
        "a path of letters, digits and _ . / ~ + @ % , : = - (no spaces, quotes, "
        "newlines or shell syntax: it is written into job scripts)",
    )
    name = cfg.sweep.name
    if not _SAFE_NAME.match(str(name)) or name in (".", ".."):
        _fail(
            "sweep.name",
            name,
            "one folder name under root: letters, digits and _ . - (no /, no .., no spaces "
            "or control characters; it also names the Slurm jobs)",
        )
    if cfg.sweep.seeds is not None and cfg.sweep.seeds < 1:
        _fail("sweep.seeds", cfg.sweep.seeds, "an integer >= 1, or null")
    if cfg.code not in CODES:
        _fail("code", cfg.code, " or ".join(CODES))
    if cfg.lock_wait_s < 0:
        _fail("lock_wait_s", cfg.lock_wait_s, "seconds >= 0")
    for rid in cfg.runs or []:
        _check_text(
            "runs", rid, re.compile(r"^[0-9a-f]{1,10}$"), "run ids or prefixes of them (hex digits)"
        )
    check_cluster(cfg.cluster)
    check_batch_split(cfg.cluster, cfg.train.batch_size, "")
