"""How an artefact was made: git commit, uncommitted changes, package versions, host."""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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
    """HEAD's commit hash, or 'unknown' outside a git checkout."""
    out = _git("rev-parse", "HEAD")
    return out.strip() if out else "unknown"


@functools.lru_cache(maxsize=1)
def git_dirty_hash() -> str:
    """sha256 (16 hex) of `git diff HEAD`, '' when the tree has no uncommitted changes."""
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


def record() -> dict[str, object]:
    """Provenance fields shared by run dirs and HDF5 attributes."""
    return {
        "git_commit": git_commit(),
        "git_dirty_hash": git_dirty_hash(),
        "versions": package_versions(),
        "host": platform.node(),
    }
