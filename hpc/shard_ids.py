"""The eval_id of every shard file a launch has read, kept for the next launch.

A launch that plans new work checks the eval_id of each shard (the eval settings it was written
with): shards of other settings are moved aside and their sets evaluated again. The id is an
attribute inside the HDF5 file, and reading it costs an open (~0.2 ms), after importing h5py
(~0.15 s): ~0.8 s of a relaunch of 1,000 runs with 2,400 shards. A shard is written once (to a
temporary name, then renamed) and never changed in place, so its inode, size and modification
time name its content: the id read once is kept under them, and a file whose ``stat`` differs
is read again. One JSON file per sweep, under the launcher's cache folder
(``hpc.compose_cache.root``); without a cache folder every shard is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hpc import compose_cache

FORMAT = 1


class ShardIds:
    """{shard path: (stat key, eval_id)} of one sweep's shards; ``get`` reads a file only when
    its stat is not the one kept, ``save`` writes what was read (atomically)."""

    def __init__(self, sweep_dir: str | Path) -> None:
        where = compose_cache.root()
        name = hashlib.sha256(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:20]
        self.path = None if where is None else where / "shard-ids" / f"{name}.json"
        self.kept: dict[str, list[Any]] = {}
        self.read = 0  # files opened by this instance
        if self.path is not None:
            try:
                with open(self.path) as f:
                    # another user's file could say a stale shard is current: not read
                    data = json.load(f) if compose_cache.private(os.fstat(f.fileno())) else {}
                if data.get("format") == FORMAT:
                    self.kept = data["shards"]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self.kept = {}

    def get(self, path: str | Path) -> str | None:
        """The eval_id of a shard file (None: unreadable, or written without one)."""
        path = str(path)
        try:
            st = os.stat(path)
        except OSError:
            return None
        stamp = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        entry = self.kept.get(path)
        if entry is None or entry[0] != stamp:
            from dhm.results import shard_eval_id  # h5py: only for files not seen before

            entry = self.kept[path] = [stamp, shard_eval_id(path)]
            self.read += 1
        return entry[1]

    def save(self) -> None:
        """Write the kept ids if any file was read (an unwritable cache folder is skipped).
        Entries of shards moved aside stay: one per shard ever written in the sweep."""
        if self.path is None or not self.read:
            return
        from dhm.fsutil import atomic_path

        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                os.fchmod(f.fileno(), 0o600)
                json.dump({"format": FORMAT, "shards": self.kept}, f)
        except OSError:
            return
