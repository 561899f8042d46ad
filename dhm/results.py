"""The HDF5 record of an evaluation: one file per shard, merged per run by sample index.

A shard file ``<run_dir>/eval/<set>__<start>-<stop>.h5`` holds one group named after the set
(e.g. ``/digits``, ``/svhn``) with datasets keyed by sample index (see docs/results.md):

    indices [N] int64          positions in the full set (the merge key)
    labels [N] int64           class labels (in-distribution set)
    logits [N, C] float32      models with a classifier
    neg_elbo [N] float32       -ELBO in nats per image (beta = 1), models with a VAE
    neg_iwae_k<K> [N] float32  -IWAE bound with K samples, nats
    fgsm/eps [E] float32       epsilons in [0, 1] pixel units (in-distribution set)
    fgsm/pred [E, N] int16     prediction of every image at every epsilon
    fgsm/accuracy [E] float64  accuracy over this shard's images

File attributes carry provenance: schema_version, run_id, set, role (id | ood), set_size,
start, stop, config_yaml, checkpoint, checkpoint_sha256, git_commit, versions (JSON), device,
created. Files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

SCHEMA_VERSION = 1
ROLES = ("id", "ood")
_PER_SAMPLE_PREFIXES = ("indices", "labels", "logits", "neg_elbo", "neg_iwae_k", "fgsm/pred")


class ShardError(ValueError):
    """A shard file that is missing, unreadable, inconsistent or incomplete (names the file)."""


class ShardGapError(ShardError):
    """Images of a set that no shard covers: the evaluation is incomplete, not corrupt."""


def shard_name(set_name: str, start: int, stop: int) -> str:
    return f"{set_name}__{start:07d}-{stop:07d}.h5"


def _per_sample(key: str) -> bool:
    return key.startswith(_PER_SAMPLE_PREFIXES)


def write_shard(
    path: str | Path, set_name: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]
) -> Path:
    """Write one shard atomically (temporary file in the same folder, then rename).

    ``arrays`` maps dataset names (``fgsm/pred`` style for nested ones) to numpy arrays; per-sample
    arrays are chunked and gzip-compressed. ``attrs`` must include role, set_size, start, stop.
    """
    path = Path(path)
    missing = {"role", "set_size", "start", "stop"} - set(attrs)
    if missing:
        raise ValueError(f"shard attributes missing: {sorted(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["set"] = set_name
            for key, value in attrs.items():
                f.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
            group = f.create_group(set_name)
            for key, value in arrays.items():
                value = np.asarray(value)
                big = _per_sample(key) and value.size > 4096
                group.create_dataset(
                    key,
                    data=value,
                    chunks=True if big else None,
                    compression="gzip" if big else None,
                    compression_opts=4 if big else None,
                    shuffle=big,
                )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass
class Shard:
    path: Path
    set_name: str
    attrs: dict[str, Any]
    arrays: dict[str, np.ndarray]


def _int_attr(path: Path, attrs: dict[str, Any], key: str) -> int:
    value = attrs.get(key)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    shown = (
        "missing" if value is None else repr(value.tolist() if hasattr(value, "tolist") else value)
    )
    raise ShardError(f"{path}: attribute {key} is {shown}, not an integer")


def read_shard(path: str | Path) -> Shard:
    """Read a whole shard file; ShardError names the file and what is wrong."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            set_name = attrs.get("set")
            if not isinstance(set_name, str) or not isinstance(f.get(set_name), h5py.Group):
                what = "missing" if set_name is None else f"{set_name!r}, which names no group"
                raise ShardError(f"{path}: attribute set is {what}")
            arrays: dict[str, np.ndarray] = {}
            f[set_name].visititems(
                lambda name, obj: (
                    arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
                )
            )
    except ShardError:
        raise
    except (OSError, KeyError, ValueError) as err:  # ValueError: undecodable text, bad data
        raise ShardError(f"{path}: unreadable shard ({type(err).__name__}: {err})") from None
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema_version {attrs.get('schema_version')} != {SCHEMA_VERSION}"
        )
    if attrs.get("role") not in ROLES:
        raise ShardError(f"{path}: attribute role is {attrs.get('role', 'missing')!r}, not id|ood")
    start, stop, size = (_int_attr(path, attrs, k) for k in ("start", "stop", "set_size"))
    if not 0 <= start <= stop <= size:
        raise ShardError(f"{path}: range [{start}, {stop}) is not within set_size {size}")
    if "indices" not in arrays:
        raise ShardError(f"{path}: no {set_name}/indices dataset")
    n = len(arrays["indices"])
    if n != stop - start:
        raise ShardError(f"{path}: {n} indices for the range [{start}, {stop})")
    for key, value in arrays.items():
        if _per_sample(key) and value.shape[-1 if key == "fgsm/pred" else 0] != n:
            raise ShardError(f"{path}: {key} has shape {value.shape}, expected {n} samples")
    return Shard(path, set_name, attrs, arrays)


@dataclass
class SetResults:
    """A set's arrays merged over its shards, ordered by sample index."""

    name: str
    role: str
    arrays: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)
    shard_paths: list[Path] = field(default_factory=list)


def merge_shards(shards: list[Shard]) -> SetResults:
    """Merge one set's shards (read by :func:`read_shard`) by index.

    ShardGapError if images have no shard; ShardError if shards overlap or differ.
    """
    first = shards[0]
    size = int(first.attrs["set_size"])
    order = sorted(shards, key=lambda s: int(s.attrs["start"]))
    covered = 0
    for shard in order:
        if int(shard.attrs["start"]) < covered:
            raise ShardError(
                f"{shard.path}: starts at {shard.attrs['start']}, inside the range of an earlier "
                f"shard (which ends at {covered}); shards overlap"
            )
        if int(shard.attrs["start"]) > covered:
            raise ShardGapError(
                f"set {first.set_name}: images [{covered}, {shard.attrs['start']}) have no shard "
                f"(next shard {shard.path.name})"
            )
        for key in ("set_size", "role"):
            if shard.attrs[key] != first.attrs[key]:
                raise ShardError(f"{shard.path}: {key} differs from {first.path.name}")
        if shard.arrays.keys() != first.arrays.keys():
            raise ShardError(f"{shard.path}: datasets differ from {first.path.name}")
        covered = int(shard.attrs["stop"])
    if covered != size:
        raise ShardGapError(f"set {first.set_name}: images [{covered}, {size}) have no shard")
    merged: dict[str, np.ndarray] = {}
    for key in first.arrays:
        parts = [s.arrays[key] for s in order]
        if key == "fgsm/pred":
            merged[key] = np.concatenate(parts, axis=1)
        elif _per_sample(key):
            merged[key] = np.concatenate(parts, axis=0)
        else:
            merged[key] = parts[0]  # per-set constants such as fgsm/eps
    if not np.array_equal(merged["indices"], np.arange(size)):
        raise ShardError(f"set {first.set_name}: indices are not 0..{size - 1} in order")
    merged.pop("fgsm/accuracy", None)  # shard-level; recomputed over the full set
    attrs = {k: v for k, v in first.attrs.items() if k not in ("start", "stop", "created")}
    return SetResults(
        first.set_name, str(first.attrs["role"]), merged, attrs, [s.path for s in order]
    )


def load_run(eval_dir: str | Path) -> dict[str, SetResults]:
    """Every set of one run's evaluation, merged; raises ShardError on the first problem."""
    eval_dir = Path(eval_dir)
    paths = sorted(eval_dir.glob("*.h5"))
    if not paths:
        raise ShardError(f"{eval_dir}: no shard files")
    by_set: dict[str, list[Shard]] = {}
    for path in paths:
        shard = read_shard(path)
        by_set.setdefault(shard.set_name, []).append(shard)
    return {name: merge_shards(shards) for name, shards in sorted(by_set.items())}
