"""Checkpoint files: atomic writes, safe loads, and finding the newest one.

A checkpoint is a plain dict of tensors, numbers and strings saved with ``torch.save`` and read
with ``torch.load(weights_only=True)``, so loading never runs pickled code. Files are written to
a temporary name in the same folder and renamed, so a killed job never leaves a partial file
under a final name.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

FINAL_NAME = "final.pt"
_STEP_RE = re.compile(r"^step_(\d{9})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another model; the message names the file."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only); CheckpointError names the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, corrupt or not a torch file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config_yaml" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no model/config_yaml)")
    return ckpt


def step_path(checkpoint_dir: str | Path, global_step: int) -> Path:
    return Path(checkpoint_dir) / f"step_{global_step:09d}.pt"


def step_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """(global_step, path) of the step checkpoints in a folder, oldest first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name))]
    return sorted(found)


def newest(checkpoint_dir: str | Path) -> Path | None:
    found = step_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def prune(checkpoint_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest step checkpoints."""
    for _, path in step_checkpoints(checkpoint_dir)[: -keep if keep > 0 else None]:
        path.unlink(missing_ok=True)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
