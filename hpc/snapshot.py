"""A launch's code snapshot: the code every task of the launch imports.

Without it a task imports the checkout as it is when the task starts (``-m`` puts the working
directory first on ``sys.path``, and the editable install maps the packages there too), so an
edit made while jobs wait in the queue reaches them, and a requeued run resumes under new code.

Before its first sbatch call a launch copies what the installed packages and their configs need
into the sweep folder, stored by content hash (a relaunch with unchanged code reuses it)::

    <sweep>/code/<id>/{dhm/, hpc/, configs/, launch.py, pyproject.toml, code.json, diff.patch}

``code.json`` holds the id, every file's sha256 and the provenance read from the checkout at
launch: the git commit, whether the tree was dirty, the untracked source files, and the hash of
the diff (``diff.patch`` holds the diff itself, untracked files included). Never outputs, data,
``.venv`` or caches. The files hashed are the bytes written: nothing is read twice.

Every task runs ``python <snapshot>/hpc/task.py <folder>`` (``hpc.slurm``); running a file puts
its folder first on ``sys.path``, and ``task.py`` replaces it by the snapshot's root, so the
snapshot wins over the checkout and the editable install (whose finder comes after sys.path).
Packed children start the same way (``hpc/packed.py`` by path, from the parent's tree).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dhm.core.config import ConfigError
from dhm.core.provenance import CODE_FILE

SOURCE = Path(__file__).resolve().parents[1]  # the tree this launch imports from
PARTS = ("dhm", "hpc", "configs", "launch.py", "pyproject.toml")
CODE_DIR = "code"
ID_LENGTH = 12


def _listing(source: Path) -> list[str]:
    """The snapshot's files, relative to ``source``: the packages and configs, sorted; never
    caches (``__pycache__``, ``*.pyc``) or hidden files."""
    out = []
    for part in PARTS:
        path = source / part
        if path.is_file():
            out.append(part)
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and d[0] != ".")
                for name in filenames:
                    if name[0] != "." and not name.endswith((".pyc", ".pyo")):
                        out.append(os.path.relpath(os.path.join(dirpath, name), source))
    return sorted(out)


def _content_id(hashes: dict[str, str]) -> str:
    text = "".join(f"{rel}\0{h}\n" for rel, h in sorted(hashes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:ID_LENGTH]


def _git(source: Path, *args: str) -> tuple[int, str]:
    try:
        out = subprocess.run(
            ["git", "-C", str(source), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return 128, ""
    return out.returncode, out.stdout


@dataclass
class Code:
    """The code a launch would snapshot: every file's bytes, read once, and their id."""

    id: str
    files: dict[str, bytes]
    hashes: dict[str, str]

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())

    def path(self, sweep: Path) -> Path:
        return code_dir(sweep, self.id)

    def write(self, sweep: Path, source: Path = SOURCE) -> tuple[Path, bool]:
        """Write the snapshot into ``sweep`` (kept when one with this id is there and intact);
        (its folder, whether it was written now). OSError when it cannot be written."""
        target = self.path(sweep)
        if target.exists() and not problems(target):
            return target, False
        tmp = target.with_name(f".{self.id}.{os.getpid()}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for rel, data in self.files.items():
                path = tmp / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            info, diff = _provenance(source, self.files)
            (tmp / "diff.patch").write_text(diff)
            info = {"id": self.id, **info, "files": self.hashes}
            (tmp / CODE_FILE).write_text(json.dumps(info, indent=1))
            if target.exists():  # a damaged copy: kept aside, never deleted
                target.rename(target.with_name(f"{self.id}.damaged-{int(time.time())}"))
            try:
                tmp.rename(target)
            except OSError:
                if not target.exists() or problems(target):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # a concurrent writer was first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target, True


def read(source: Path = SOURCE) -> Code:
    """The code under ``source`` as a launch would snapshot it (nothing is written)."""
    files = {rel: (source / rel).read_bytes() for rel in _listing(source)}
    hashes = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    return Code(_content_id(hashes), files, hashes)


def _provenance(source: Path, files: dict[str, bytes]) -> tuple[dict[str, object], str]:
    """(git commit, dirty flag, diff hash and untracked source files; the diff, untracked
    files included) of the checkout at ``source``, for the snapshot's paths."""
    code, head = _git(source, "rev-parse", "HEAD")
    if code != 0:
        return {"git_commit": "unknown", "git_dirty": None, "git_dirty_hash": ""}, ""
    paths = ["--", *PARTS]
    _, diff = _git(source, "diff", "HEAD", *paths)
    _, untracked = _git(source, "ls-files", "--others", "--exclude-standard", *paths)
    new = [rel for rel in untracked.split("\n") if rel in files]
    for rel in new:  # an untracked source file counts: its whole text is in the diff
        _, text = _git(source, "diff", "--no-index", "--", "/dev/null", rel)
        diff += text
    info = {
        "git_commit": head.strip(),
        "git_dirty": bool(diff),
        "git_dirty_hash": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else "",
        "untracked": new,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return info, diff


def code_dir(sweep: Path, code_id: str) -> Path:
    return Path(sweep) / CODE_DIR / code_id


def problems(path: Path) -> str:
    """Why the snapshot at ``path`` cannot be used ("" when every file is there, unchanged)."""
    try:
        info = json.loads((path / CODE_FILE).read_text())
        hashes = dict(info["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path / CODE_FILE} is missing or unreadable"
    if _content_id(hashes) != path.name:
        return f"{path / CODE_FILE} lists files of another snapshot"
    for rel, digest in hashes.items():
        try:
            data = (path / rel).read_bytes()
        except OSError:
            return f"{path / rel} is missing"
        if hashlib.sha256(data).hexdigest() != digest:
            return f"{path / rel} was changed after the launch wrote it"
    return ""


def run_code(run_dir: Path) -> str:
    """The snapshot id the run's newest training attempt ran from ("" when it ran outside one,
    or never started): each attempt records its provenance when it starts."""
    logs = Path(run_dir) / "logs"
    try:
        records = [p for p in logs.iterdir() if p.name.startswith("train_")]
    except OSError:
        return ""
    records = [p for p in records if p.name.endswith("_rank0.json")]
    for path in sorted(records, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return str(json.loads(path.read_text()).get("code", ""))
        except (OSError, ValueError):
            continue
    return ""


def check_resumable(sweep: Path, run_id: str, code_id: str) -> None:
    """ConfigError naming the run, the snapshot and the fix when the snapshot a run must
    resume under is missing or damaged."""
    why = problems(code_dir(sweep, code_id))
    if why:
        raise ConfigError(
            f"run {run_id} resumes under its code snapshot {code_id}, which cannot be used: "
            f"{why}. To resume it under the code of this launch instead, relaunch with "
            f"code=latest runs=[{run_id}]"
        )
