"""What a launch read inside a run's files, kept for the next launch: a shard's eval_id, and
whether a checkpoint is whole.

A launch that plans new work checks the eval_id of each shard (the eval settings it was written
with): shards of other settings are moved aside and their sets evaluated again. The id is an
attribute inside the HDF5 file, and reading it costs an open (~0.2 ms), after importing h5py
(~0.15 s): ~0.8 s of a relaunch of 1,000 runs with 2,400 shards. Every launch and status also
asks whether each run's final.pt is whole (``dhm.core.checkpoint.looks_complete``, ~50 us: 0.04 s
of the status of 1,000 runs). Shards and checkpoints are written once (to a temporary name,
then renamed) and never changed in place, so a file's inode, size and modification time name
its content: what was read once is kept under them, and a file whose ``stat`` differs is read
again. One JSON file per sweep, under the launcher's cache folder
(``hpc.compose_cache.root``), private to its user; without a cache folder every file is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hpc import compose_cache

FORMAT = 1


class FileFacts:
    """{kind:path: (stat key, fact)} of one sweep's files; a fact is read from the file only
    when its stat is not the one kept; ``save`` writes what was read (atomically)."""

    def __init__(self, sweep_dir: str | Path) -> None:
        where = compose_cache.root()
        name = hashlib.sha256(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:20]
        self.path = None if where is None else where / "file-facts" / f"{name}.json"
        self.kept: dict[str, list[Any]] = {}
        self.read = 0  # files opened by this instance
        if self.path is not None:
            try:
                with open(self.path) as f:
                    # another user's file could say a stale shard is current: not read
                    private = compose_cache.private(os.fstat(f.fileno()))
                    data = json.load(f) if private else {}
                if data.get("format") == FORMAT:
                    self.kept = data["facts"]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self.kept = {}

    def _fact(self, kind: str, path: str | Path, read: Any) -> Any:
        path = str(path)
        try:
            st = os.stat(path)
        except OSError:
            return None
        stamp = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        entry = self.kept.get(f"{kind}:{path}")
        if entry is None or entry[0] != stamp:
            entry = self.kept[f"{kind}:{path}"] = [stamp, read(path)]
            self.read += 1
        return entry[1]

    def eval_id(self, path: str | Path) -> str | None:
        """The eval_id a shard file was written with (None: unreadable, or written without)."""

        def read(p: str) -> str | None:
            from dhm.evaluation.results import shard_eval_id  # h5py: only for files not seen before

            return shard_eval_id(p)

        return self._fact("eval_id", path, read)

    def complete(self, path: str | Path) -> bool:
        """Whether a checkpoint file is a whole archive (``looks_complete``; False: missing)."""
        from dhm.core.checkpoint import looks_complete

        return bool(self._fact("complete", path, looks_complete))

    def save(self) -> None:
        """Write the kept facts if any file was read (an unwritable cache folder is skipped).
        Facts of files moved aside stay: one per file ever read in the sweep."""
        if self.path is None or not self.read:
            return
        data = json.dumps({"format": FORMAT, "facts": self.kept}).encode()
        try:
            compose_cache.write_private(self.path, data)
        except OSError:
            return
