"""Shared fixtures: small configs built from the real schemas, shrunk for 2-core CPUs."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

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


@pytest.fixture(autouse=True, scope="session")
def compose_cache_dir(tmp_path_factory):
    """The launcher's compose cache (hpc.compose_cache) in a folder of this test session: tests
    neither read a user's entries nor leave theirs behind. launch.py subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("compose-cache")
    previous = os.environ.get("DHM_CACHE_DIR")
    os.environ["DHM_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DHM_CACHE_DIR", None)
    else:
        os.environ["DHM_CACHE_DIR"] = previous


def small_config(run_dir, **overrides: Any):
    """A RunConfig on digits with tiny nets; ``overrides`` use dotted keys."""
    return run_config(**{**SMALL, "run_dir": str(run_dir), **overrides})


@pytest.fixture
def small_cfg(tmp_path):
    def make(**overrides):
        return small_config(tmp_path / "run", **overrides)

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
