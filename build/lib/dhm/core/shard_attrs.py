"""A shard file's attributes (eval_id, set_size, ...), read without reading its datasets.

The launcher needs a few attributes of shards it has not seen before (which eval settings made
it; how big its set is when the dataset does not say). Only this module of ``dhm.core`` imports
h5py, and the launcher imports it only when such a file must be opened. The shard format itself
is ``dhm.evaluation.results``'.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

_TEXT = h5py.string_dtype()
_SCALAR_TYPES = (  # attributes: (type in the file, type to read it as, numpy dtype)
    (h5py.h5t.STD_I64LE, h5py.h5t.NATIVE_INT64, np.dtype(np.int64)),
    (h5py.h5t.py_create(_TEXT, logical=True), h5py.h5t.py_create(_TEXT), _TEXT),
)


def read_attr(fid: Any, name: str) -> Any:
    """One attribute as ``h5py.File.attrs[name]`` gives it (text decoded), None when absent.

    Scalar int64 and UTF-8 text (what ``write_shard`` stores) take a short path past h5py's general
    one, which costs several times the read itself (docs/performance.md).
    """
    try:
        attr = h5py.h5a.open(fid, name.encode())
    except KeyError:
        return None
    ftype = attr.get_type()
    for file_type, mem_type, dtype in _SCALAR_TYPES:
        if ftype == file_type and attr.shape == ():
            arr = np.empty((), dtype)
            attr.read(arr, mtype=mem_type)
            value = arr[()]
            return value.decode() if isinstance(value, bytes) else value
    value = h5py.File(fid).attrs[name]  # anything else: h5py's general path
    return value.decode() if isinstance(value, bytes) else value


def open_readonly(path: Path) -> Any:
    """A read-only low-level file id; the file closes when it and the ids opened in it are gone."""
    return h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY)


def read_attrs(path: str | Path, names: Iterable[str]) -> dict[str, Any]:
    """Some file attributes of a shard (absent ones left out), as ``h5py.File.attrs`` gives them.

    Raises what h5py raises for an unreadable file (OSError, KeyError, ValueError).
    """
    fid = open_readonly(Path(path))
    try:
        return {k: v for k, v in ((k, read_attr(fid, k)) for k in names) if v is not None}
    finally:
        fid.close()


def shard_eval_id(path: str | Path) -> str | None:
    """The eval_id a shard file was written with (None if unreadable or absent)."""
    try:
        value = read_attrs(path, ["eval_id"]).get("eval_id")
    except (OSError, KeyError, ValueError):
        return None
    return value.decode() if isinstance(value, bytes) else value


def shard_set_size(path: str | Path) -> int | None:
    """The set_size attribute of one shard (None: unreadable)."""
    try:
        return int(read_attrs(path, ["set_size"])["set_size"])
    except (OSError, KeyError, ValueError):
        return None
