"""Checkpoint files: atomic writes, safe loads, cheap completeness checks, finding the newest.

A checkpoint is a plain dict of tensors, numbers and strings saved with ``torch.save`` and read
with ``torch.load(weights_only=True)``, so loading never runs pickled code. Files are written to
a temporary name in the same folder and renamed (``dhm.fsutil.atomic_path``), so a killed job
never leaves a partial file under a final name. torch is imported only by the functions that
save or load, so the launcher can ask "is this run trained?" without importing it.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import zipfile
from pathlib import Path
from typing import Any

from dhm.fsutil import atomic_path

FINAL_NAME = "final.pt"
_STEP_RE = re.compile(r"^step_(\d{9})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another model; the message names the file."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to ``path`` through a temporary file in the same folder, fsync and a rename."""
    import torch

    with atomic_path(path, fsync=True) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only); CheckpointError names the file on failure."""
    import torch

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


def looks_complete(path: str | Path) -> bool:
    """True when ``path`` is a whole torch zip archive: a central directory that names a
    ``data.pkl`` record and every record inside the file's length.

    Reads only the archive's directory (microseconds, not the weights), so the launcher can
    check thousands of runs; a truncated file (a copy cut short, a full disk outside the atomic
    writer) loses the directory at its end and fails. ``load`` is the full check.
    """
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    return any(i.filename.endswith("/data.pkl") for i in infos) and all(
        i.header_offset + i.compress_size <= size for i in infos
    )


def set_aside(path: str | Path, why: str) -> Path:
    """Rename an unusable checkpoint to ``<name>.<why>-<time>`` (kept for inspection); return it."""
    path = Path(path)
    target = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}")
    path.rename(target)
    return target


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


def newest_complete(checkpoint_dir: str | Path) -> tuple[int, Path] | None:
    """The newest step checkpoint that ``looks_complete``, as (global_step, path)."""
    for step, path in reversed(step_checkpoints(checkpoint_dir)):
        if looks_complete(path):
            return step, path
    return None


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
