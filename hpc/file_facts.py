"""What a launch read inside a run's files, kept for the next launch: a shard's eval_id, and
whether a checkpoint is whole.

A launch reads the eval_id of each shard of the layout before variants (in eval/ itself, one
id over every eval setting) to know which variant it belongs to (``dhm.core.variants``). The id
is an attribute inside the HDF5 file, and reading it costs importing h5py and an open per
shard; a relaunch of a 1,000-run sweep in flight reads thousands (docs/performance.md has the
figures that keep this layer). Status opens no shard (``open_shards=False``): an id not kept yet
reads as None, which counts the shard for every variant until a launch has read it. Every
launch and status also asks whether each run's final.pt is whole
(``dhm.core.checkpoint.looks_complete``). Shards and checkpoints are written once (to a
temporary name, then renamed) and never changed in place, so a file's inode, size and
modification time name its content: what was read once is kept under them, and a file whose
``stat`` differs is read again. One JSON file per sweep, ``<sweep>/file_facts.json``: whoever
can write it can write the shards it describes, and a sweep folder this user cannot write is
read every time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dhm.core.checkpoint import looks_complete
from dhm.core.fsutil import atomic_write_text

FORMAT = 1
NAME = "file_facts.json"


class FileFacts:
    """{kind:path: (stat key, fact)} of one sweep's files; a fact is read from the file only
    when its stat is not the one kept; ``save`` writes what was read (atomically)."""

    def __init__(self, sweep_dir: str | Path, open_shards: bool = True) -> None:
        self.path = Path(sweep_dir) / NAME
        self.open_shards = open_shards
        self.kept: dict[str, list[Any]] = {}
        self.read = 0  # files opened by this instance
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") == FORMAT:
                self.kept = data["facts"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.kept = {}

    def _fact(self, kind: str, path: str | Path, read: Any) -> Any:
        path = str(path)
        try:
            st = os.stat(path)
        except OSError:  # gone (moved aside, removed): its fact goes too
            self.kept.pop(f"{kind}:{path}", None)
            return None
        stamp = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        entry = self.kept.get(f"{kind}:{path}")
        if entry is None or entry[0] != stamp:
            if read is None:  # not to be opened: unknown, and nothing kept
                return None
            entry = self.kept[f"{kind}:{path}"] = [stamp, read(path)]
            self.read += 1
        return entry[1]

    def eval_id(self, path: str | Path) -> str | None:
        """The eval_id a shard file was written with (None: unreadable, or written without)."""

        def read(p: str) -> str | None:
            from dhm.core.shard_attrs import shard_eval_id  # h5py: only for files not seen before

            return shard_eval_id(p)

        return self._fact("eval_id", path, read if self.open_shards else None)

    def complete(self, path: str | Path) -> bool:
        """Whether a checkpoint file is a whole archive (``looks_complete``; False: missing)."""
        return bool(self._fact("complete", path, looks_complete))

    def save(self) -> None:
        """Write the kept facts if any file was read and the sweep folder exists (an unwritable
        one is skipped). A file looked up and found gone is dropped; others are not checked
        (a stat each, on every save: slow on a parallel file system)."""
        if not self.read or not self.path.parent.is_dir():
            return
        try:
            atomic_write_text(self.path, json.dumps({"format": FORMAT, "facts": self.kept}))
        except OSError:
            return
