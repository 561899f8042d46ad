"""Typed schema of the launcher's config: the science groups plus sweep, cluster and mode.

Registered in Hydra's ConfigStore as ``base_config``; configs/config.yaml starts from it, so an
unknown key or a wrong type fails while composing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from dhm.config import RunSections

MODES = ("run", "dry_run", "status", "cancel", "aggregate")
CLUSTERS = ("local", "slurm")


@dataclass
class SweepConfig:
    """A grid: the cartesian product of ``axes`` plus explicit ``points`` (dotted overrides)."""

    name: str = "single"
    axes: dict[str, Any] = field(default_factory=dict)  # "model.beta": [0.001, 0.01]
    points: list[Any] = field(default_factory=list)  # [{"model.name": "resnet", ...}]


@dataclass
class ClusterConfig:
    """Where and how stages run. ``local``: in this process; ``slurm``: submitit arrays."""

    name: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"  # train task limit: [D-]HH:MM:SS, MM, MM:SS, D-HH, D-HH:MM
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # None: gpus_per_node (one rank per GPU), or 1 on CPU
    cpus_per_task: int = 2
    mem: str | None = None  # e.g. 32G
    constraint: str | None = None
    array_parallelism: int = 64
    eval_time: str = "01:00:00"
    eval_gpus: int = 0  # GPUs of one eval task
    eval_cpus: int = 2
    aggregate_time: str = "00:30:00"
    setup: list[str] = field(default_factory=list)  # lines run before each task
    extra_sbatch: dict[str, Any] = field(default_factory=dict)  # more sbatch options
    stage_data: bool = False  # copy data.root to node-local scratch before training
    scratch: str = "$TMPDIR"  # expanded on the compute node; /tmp if it names nothing
    python: str | None = None  # interpreter on the nodes; None: this one
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint + requeue
    max_requeues: int = 3


@dataclass
class LaunchConfig(RunSections):
    sweep: SweepConfig = field(default_factory=SweepConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    root: str = "outputs"
    mode: str = "run"  # run | dry_run | status | cancel | aggregate
    allow_partial: bool = False  # aggregation exits 0 even if some runs are missing


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=LaunchConfig)
