"""One command at a time per sweep.

A launch, relaunch, cancel and ``mode=aggregate`` hold an exclusive POSIX record lock
(``fcntl.lockf``: fcntl's F_SETLK) on ``<sweep>/.lock`` from before they read the ledger until
they have recorded what they submitted, so two of them never both see a run as not submitted.
Another command waits up to ``lock_wait_s`` seconds (saying who holds it), then exits 1 naming
the holder. The kernel drops the lock when its process dies (SIGKILL included), so a killed
launch never leaves the sweep locked.

POSIX locks work across machines on NFSv3 (lockd) and NFSv4, on Lustre mounted with ``flock``
(not ``localflock``: that is per client), GPFS, BeeGFS, CephFS and local disks. Where the
filesystem refuses them (Lustre without ``flock``, some FUSE mounts), the command stops with a
message saying so rather than run unprotected.

``mode=status`` and the aggregate job take no lock: they write only whole files by atomic
rename (report.html, efficiency.json, the summary's files), so a reader beside a launch sees an
old file or a new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"
POLL_S = 0.2


class SweepLocked(RuntimeError):
    """Another command holds the sweep's lock (or the filesystem offers none)."""


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another command"
    except OSError:
        return "another command"


@contextlib.contextmanager
def held(sweep: Path, what: str, wait_s: float, quiet: bool = False) -> Iterator[None]:
    """Hold ``<sweep>/.lock`` for the block (``what``: the command, shown to whoever waits).
    A sweep folder this call had to create, and that holds nothing else afterwards, is
    removed again: a refused first launch leaves nothing behind."""
    sweep = Path(sweep).resolve()
    path = sweep / LOCK_FILE
    deadline = time.monotonic() + wait_s
    told = False
    made: list[Path] = []  # folders this call created
    while True:
        made += [d for d in (sweep, *sweep.parents) if not d.exists()]
        sweep.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a refused first launch removed the folder just now
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise SweepLocked(
                    f"{path}: this filesystem refuses POSIX locks ({os.strerror(err.errno)}), "
                    "so concurrent launches could not be kept apart; put root on a filesystem "
                    "with locking (NFS, Lustre mounted with flock, GPFS, a local disk)"
                ) from None
            if time.monotonic() >= deadline:
                raise SweepLocked(
                    f"{sweep} is busy: {_holder(path)} holds its lock; waited "
                    f"{wait_s:g} s (lock_wait_s). Run this again when it is done"
                ) from None
            if not told and not quiet:
                print(f"waiting for {_holder(path)} (up to lock_wait_s={wait_s:g} s)",
                      file=sys.stderr, flush=True)  # fmt: skip
                told = True
            time.sleep(POLL_S)
            continue
        try:  # the file may have been removed by a holder that created it: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.write(fd, f"{what} (pid {os.getpid()} on {socket.gethostname()}, {stamp})\n".encode())
        yield
    finally:
        if made and {p.name for p in sweep.iterdir()} == {LOCK_FILE}:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                for folder in made:  # innermost first; stops at one that is not empty
                    folder.rmdir()
        os.close(fd)  # releases the lock
