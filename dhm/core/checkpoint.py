"""Checkpoint files: cheap completeness checks, finding the newest, pruning, hashing.

A checkpoint is a plain dict of tensors, numbers and strings saved with ``torch.save`` and read
with ``torch.load(weights_only=True)``, so loading never runs pickled code. Files are written to
a temporary name in the same folder and renamed (``dhm.core.fsutil.atomic_path``), so a killed job
never leaves a partial file under a final name. Saving and loading (torch) are in
``dhm.model.checkpoint``; this module is torch-free, so the launcher can ask "is this run
trained?" without importing torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path

FINAL_NAME = "final.pt"
_STEP_RE = re.compile(r"^step_(\d{9})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another model; the message names the file."""


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record (22 bytes)
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes, just before the EOCD
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # 56 bytes
_CENTRAL_HEADER = b"PK\x01\x02"


def looks_complete(path: str | Path) -> bool:
    """True when ``path`` is a whole torch zip archive: its end-of-central-directory record
    (zip64 too) lies in the file's last 64 KiB, the central directory it points to lies inside
    the file, is made of at least as many records as it announces, and names a ``data.pkl``
    record.

    Reads the archive's last bytes and its directory, where ``zipfile`` parses every record, so
    the launcher can check thousands of runs (docs/performance.md: what it saves). A truncated
    file (a copy cut short, a full disk outside the atomic writer) loses the records at its end
    and fails; bytes appended after them are allowed, as ``zipfile`` and ``torch.load`` allow
    them. ``dhm.model.checkpoint.load`` is the full check.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # torch writes no archive comment: the end records are the file's last bytes
            window = min(size, _ZIP64_EOCD.size + _ZIP64_LOCATOR.size + _EOCD.size)
            f.seek(size - window)
            end = f.read(window)
            if end[-_EOCD.size : -_EOCD.size + 4] != b"PK\x05\x06":
                window = min(size, _EOCD.size + 0xFFFF)  # after a comment, or appended bytes
                f.seek(size - window)
                end = f.read(window)
            at = end.rfind(b"PK\x05\x06")
            if at < 0 or window - at < _EOCD.size:
                return False
            _, _, _, _, entries, cd_size, cd_offset, comment = _EOCD.unpack_from(end, at)
            if at + _EOCD.size + comment > window:
                return False  # a comment cut short
            eocd_pos = size - window + at
            if 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:
                loc = at - _ZIP64_LOCATOR.size
                if loc < 0 or end[loc : loc + 4] != b"PK\x06\x07":
                    return False
                record_at = _ZIP64_LOCATOR.unpack_from(end, loc)[2]
                f.seek(record_at)
                record = f.read(_ZIP64_EOCD.size)
                if len(record) != _ZIP64_EOCD.size or record[:4] != b"PK\x06\x06":
                    return False
                *_, entries, cd_size, cd_offset = _ZIP64_EOCD.unpack(record)
                eocd_pos = record_at
            if cd_offset + cd_size > eocd_pos or cd_size < entries * 46:
                return False  # 46: the fixed part of every record it announces
            f.seek(cd_offset)
            directory = f.read(cd_size)
    except (OSError, struct.error, ValueError):
        return False
    return (
        len(directory) == cd_size
        and directory.startswith(_CENTRAL_HEADER)
        and directory.count(_CENTRAL_HEADER) >= entries
        and b"/data.pkl" in directory
    )


def set_aside(path: str | Path, why: str) -> Path:
    """Rename an unusable checkpoint to ``<name>.<why>-<time>`` (kept for inspection); return it."""
    path = Path(path)
    target = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}")
    path.rename(target)
    return target


def step_path(checkpoint_dir: str | Path, global_step: int) -> Path:
    return Path(checkpoint_dir) / f"step_{global_step:09d}.pt"


def step_checkpoints(
    checkpoint_dir: str | Path, names: Iterable[str] | None = None
) -> list[tuple[int, Path]]:
    """(global_step, path) of the step checkpoints in a folder, oldest first; ``names``: the
    folder's listing, when the caller has it."""
    folder = Path(checkpoint_dir)
    if names is None:
        try:
            names = os.listdir(folder)
        except OSError:
            return []
    found = [(int(m.group(1)), folder / n) for n in names if (m := _STEP_RE.match(n))]
    return sorted(found)


def newest(checkpoint_dir: str | Path) -> Path | None:
    found = step_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def newest_complete(
    checkpoint_dir: str | Path,
    names: Iterable[str] | None = None,
    complete: Callable[[Path], bool] | None = None,
) -> tuple[int, Path] | None:
    """The newest step checkpoint that ``looks_complete`` (or ``complete``, a caller's kept
    verdicts), as (global_step, path)."""
    for step, path in reversed(step_checkpoints(checkpoint_dir, names)):
        if (complete or looks_complete)(path):
            return step, path
    return None


def prune(checkpoint_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest step checkpoints."""
    for _, path in step_checkpoints(checkpoint_dir)[: -keep if keep > 0 else None]:
        path.unlink(missing_ok=True)


def drop_step_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Delete every step checkpoint of a trained run (one whose ``final.pt`` is there, and
    whole); return the deleted paths. Nothing is deleted without a complete final.pt: the
    step checkpoints are then what training resumes from."""
    folder = Path(checkpoint_dir)
    if not looks_complete(folder / FINAL_NAME):
        return []
    steps = [path for _, path in step_checkpoints(folder)]
    for path in steps:
        path.unlink(missing_ok=True)
    return steps


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
