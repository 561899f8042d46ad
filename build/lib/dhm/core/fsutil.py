"""Files written whole or not at all, readable by collaborators, and cheap reads of log tails.

Every artefact of a run (checkpoints, shards, summaries, plots, plans, reports) goes through
``atomic_write``: the data is written to a temporary file in the destination folder and renamed
onto the final name only when complete, so a killed job or a full disk never leaves a partial
file under a final name. ``tempfile.mkstemp`` creates its file with mode 0600; the helper sets
the mode the user's umask gives an ordinary ``open()`` (0644 under umask 022, 0664 under 002),
so collaborators on a shared project folder can read the results.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def umask() -> int:
    """The process umask (read without changing it where /proc allows, else set and restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path next to ``path``; renamed onto it only if the block completes.

    The block writes the temporary file by name (h5py, matplotlib and torch want a name). On
    any exception, including KeyboardInterrupt and a full disk, the temporary file is removed
    and ``path`` is untouched. ``fsync`` flushes the data to disk before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        os.close(fd)
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def tail(path: str | Path | BinaryIO, lines: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last ``lines`` lines of a text file (a path, or a file open in binary mode),
    reading at most ``max_bytes`` from its end.

    Returns [] for a missing or unreadable file; cost does not grow with the file's size.
    """
    try:
        if isinstance(path, str | Path):
            with open(path, "rb") as f:
                return tail(f, lines, max_bytes)
        f = path
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    out = text.splitlines()
    if size > max_bytes and out:
        out = out[1:]  # the first line read is probably cut
    return out[-lines:] if lines > 0 else []
