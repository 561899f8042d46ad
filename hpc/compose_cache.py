"""Composed launch configs, kept under a key that hashes everything they are composed from.

Hydra composes this project's config in ~0.1 s (the defaults tree, Hydra's own ``hydra`` node,
the structured-config merges): more than the rest of ``mode=status`` and half of a 1,000-run
dry run. The same inputs always compose to the same config, so the launcher keeps each
composition (pickled, ~15 KB, ~1 ms to load) under a SHA-256 of its inputs:

* the command line: config name, ``-m``, and the overrides in their order;
* every ``.yaml`` file under each config folder of the search path (``configs/`` or ``-cp``,
  and ``-cd``; linked folders followed, as Hydra does): its relative path and bytes;
* the source of the modules that define the schema and the composition (``SOURCES``);
* the versions of Python, Hydra and OmegaConf, and the installed Hydra plugins (which may add
  config folders).

A change to any of them composes anew; a config file that extends Hydra's search path
(``hydra.searchpath``) turns the cache off for that command line. Composition does not resolve
interpolations (``${oc.env:...}`` is read when a run's config is resolved, after this), so the
environment is not an input. Only compositions that succeeded are kept; a failing command line
composes (and fails) every time. An entry that cannot be read is a miss; an entry that cannot
be written is skipped (a read-only home works, uncached).

Where: ``compose/`` in the launcher's cache folder, ``$DHM_CACHE_DIR``, else
``$XDG_CACHE_HOME/dhm-grid``, else ``~/.cache/dhm-grid`` (``DHM_CACHE_DIR=off``: no cache; the
folder also holds ``hpc.file_facts``). At most ``MAX_ENTRIES`` entries are kept, the least
recently used pruned first. Entries are private (0600 in a 0700 folder), and one that another
user owns or could have written is never loaded: a pickle can run code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

FORMAT = 1  # bump when what an entry holds changes
MAX_ENTRIES = 256
# Modules whose code decides what a command line composes to.
SOURCES = ("hpc.schema", "hpc.cli", "hpc.compose_cache", "dhm.core.config", "dhm.core.datasets")


def root() -> Path | None:
    """The launcher's cache folder (None: caching is off)."""
    chosen = os.environ.get("DHM_CACHE_DIR")
    if chosen:
        return None if chosen.lower() in ("off", "0", "no", "false") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dhm-grid"


def folder() -> Path | None:
    """Where compositions are kept (None: caching is off)."""
    where = root()
    return None if where is None else where / "compose"


def _plugins() -> list[str]:
    """Names in the folders of the ``hydra_plugins`` namespace package, if any is installed."""
    spec = importlib.util.find_spec("hydra_plugins")
    if spec is None:
        return []
    names = []
    for path in spec.submodule_search_locations or []:
        try:
            names += [os.path.join(path, n) for n in sorted(os.listdir(path))]
        except OSError:
            continue
    return names


MAX_CONFIG_ENTRIES = 5000  # a config folder bigger than this (e.g. -cd .): not cached


def key(
    config_name: str, overrides: list[str], multirun: bool, config_dirs: list[Path]
) -> str | None:
    """The SHA-256 of everything a composition depends on (see the module docstring); None
    (composed every time) when the cache is off, when a config file extends Hydra's search path
    (``hydra.searchpath``: folders this key would not cover) or when a config folder holds
    more than MAX_CONFIG_ENTRIES files and folders."""
    if folder() is None:
        return None
    import hydra
    import omegaconf

    h = hashlib.sha256()
    head = [FORMAT, sys.version, hydra.__version__, omegaconf.__version__, _plugins()]
    h.update(json.dumps([head, config_name, multirun, list(overrides)]).encode())
    for module in SOURCES:  # located, not imported (a hit needs none of them but hpc.schema)
        h.update(b"\0module\0" + module.encode())
        h.update(Path(importlib.util.find_spec(module).origin).read_bytes())
    for top in config_dirs:
        h.update(b"\0folder\0" + str(top).encode())
        configs = _config_files(top)
        if configs is None:
            return None
        for relative, path in configs:
            h.update(b"\0file\0" + relative.encode() + b"\0")
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as err:  # a dangling link, an unreadable file: Hydra's problem
                data = f"unreadable: {err.strerror}".encode()
            if b"searchpath" in data:
                return None
            h.update(data)
    return h.hexdigest()


def _config_files(top: Path) -> list[tuple[str, str]] | None:
    """(relative path, path) of every .yaml file Hydra could read under ``top``, following
    linked folders as Hydra does (each real folder once); None past MAX_CONFIG_ENTRIES."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    entries = 0
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        entries += len(dirnames) + len(filenames)
        if entries > MAX_CONFIG_ENTRIES:
            return None
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".yaml"):
                path = os.path.join(dirpath, name)
                out.append((os.path.relpath(path, top), path))
    return out


def load(digest: str | None) -> Any | None:
    """The composed config kept under ``digest`` (None: not kept, or unreadable)."""
    where = folder()
    if where is None or digest is None:
        return None
    path = where / f"{digest}.pkl"
    try:
        with open(path, "rb") as f:
            if not private(os.fstat(f.fileno())):
                return None
            cfg = pickle.load(f)
        os.utime(path)  # recently used: pruned last
    except Exception:  # missing, truncated, or written by other versions of the classes
        return None
    return cfg


def write_private(path: Path, data: bytes) -> None:
    """Write a cache file atomically, readable by this user only (0600 in a 0700 folder)."""
    from dhm.core.fsutil import atomic_path

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def private(st: os.stat_result) -> bool:
    """An entry is loaded (unpickled: it could run code) only if this user owns it and no
    one else can write it: a cache folder shared with others is read as empty."""
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def store(digest: str | None, cfg: Any) -> None:
    """Keep ``cfg`` under ``digest`` (atomically), then prune beyond MAX_ENTRIES."""
    where = folder()
    if where is None or digest is None:
        return
    try:
        write_private(where / f"{digest}.pkl", pickle.dumps(cfg, pickle.HIGHEST_PROTOCOL))
        entries = sorted(where.glob("*.pkl"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-MAX_ENTRIES]:
            old.unlink(missing_ok=True)
    except Exception:  # an unwritable folder, a full disk: compose every time instead
        return
