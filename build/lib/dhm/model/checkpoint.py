"""Save and load a model checkpoint: a plain dict of tensors, numbers and strings, written
atomically with ``torch.save`` and read with ``torch.load(weights_only=True)`` (never runs
pickled code). The file facts (names, completeness, newest) are in ``dhm.core.checkpoint``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dhm.core.checkpoint import CheckpointError
from dhm.core.fsutil import atomic_path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to ``path`` through a temporary file in the same folder, fsync and a rename."""
    with atomic_path(path, fsync=True) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
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
