"""Small run configs built from the real schemas, shrunk for 2-core CPUs, and a free TCP port.

Imported by test modules and by tests/_ddp_worker.py (a subprocess, where conftest's fixtures
do not exist); conftest.py's ``small_cfg`` fixture builds on ``small_config``.
"""

from __future__ import annotations

import socket
from typing import Any

from dhm.core.config import run_config

SMALL = {
    "model.width": 4,
    "model.latent_dim": 8,
    "data.name": "digits",
    "train.epochs": 2,
    "train.batch_size": 50,
    "train.checkpoint_every_steps": 5,
    "train.log_every_steps": 2,
    "train.progress": False,
    "train.device": "cpu",
    "eval.batch_size": 100,
    "eval.iwae_k": [4],
}


def small_config(run_dir, **overrides: Any):
    """A RunConfig on digits with tiny nets; ``overrides`` use dotted keys."""
    return run_config(**{**SMALL, "run_dir": str(run_dir), **overrides})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a DDP rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
