"""How an artefact was made: the code snapshot, git commit, uncommitted changes, package
versions, host.

A Slurm task imports the code from its launch's snapshot (``<sweep>/code/<id>/``, written by
``hpc.snapshot``), which is no git checkout: the snapshot's ``code.json`` holds the commit and
the dirty flag as the launch read them from its checkout. Outside a snapshot (``cluster=local``,
tests) they are read from git here, and ``code`` is ``""``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CODE_FILE = "code.json"  # at the root of a snapshot: {id, git_commit, git_dirty_hash, ...}
NO_SNAPSHOT = "none"  # how results.md and the report show the snapshot id "" (no snapshot)


@functools.lru_cache(maxsize=1)
def snapshot() -> dict[str, object]:
    """This process's code snapshot as its launch recorded it ({} outside a snapshot)."""
    try:
        return dict(json.loads((REPO / CODE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


PACKAGES = ("torch", "torchvision", "accelerate", "numpy", "h5py", "hydra-core", "submitit")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD's commit hash (the launch's, in a snapshot), or 'unknown' outside a git checkout."""
    if snapshot():
        return str(snapshot().get("git_commit", "unknown"))
    out = _git("rev-parse", "HEAD")
    return out.strip() if out else "unknown"


@functools.lru_cache(maxsize=1)
def git_dirty_hash() -> str:
    """sha256 (16 hex) of `git diff HEAD`, '' when the tree has no uncommitted changes (the
    launch's, in a snapshot)."""
    if snapshot():
        return str(snapshot().get("git_dirty_hash", ""))
    out = _git("diff", "HEAD")
    return hashlib.sha256(out.encode()).hexdigest()[:16] if out else ""


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def code_ids(value: object) -> list[str]:
    """The snapshot ids of a ``code`` cell ("a+b" -> [a, b]; "" -> [""]; None -> [])."""
    return [] if value is None else str(value).split("+")


def code_text(value: object) -> str:
    """A ``code`` cell as a reader sees it: its ids joined by "+", "" shown as ``none``."""
    return "+".join(i or NO_SNAPSHOT for i in code_ids(value))


def record() -> dict[str, object]:
    """Provenance fields shared by run dirs and HDF5 attributes."""
    return {
        "code": str(snapshot().get("id", "")),  # the snapshot id; "" outside one
        "git_commit": git_commit(),
        "git_dirty_hash": git_dirty_hash(),
        "versions": package_versions(),
        "host": platform.node(),
    }
