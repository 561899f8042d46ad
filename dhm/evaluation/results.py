"""The HDF5 record of an evaluation: one file per shard, merged per run by sample index.

A shard file ``<run_dir>/eval/<set>__<start>-<stop>.h5`` holds one group named after the set
(e.g. ``/digits``, ``/svhn``, ``/digits-val``) with datasets keyed by sample index (see
docs/results.md for every dataset, its units and when it is present):

    indices [N] int64          positions in the full set (the merge key)
    labels [N] int64           class labels (in-distribution and validation sets)
    logits [N, C] float32      models with a classifier
    neg_elbo [N] float32       -ELBO in nats per image (beta = 1), models with a VAE
    neg_iwae_k<K> [N] float32  -IWAE bound with K samples, nats
    trained_neg_elbo, trained_neg_iwae_k<K> [N]   the same under a learned sigma as trained
                               (the two above use the sigma fitted on validation: bound_sigma)
    iwae_ess [N] float32       effective sample size of the largest K's importance weights
    complexity_bits [N]        PNG size of the 8-bit image in bits (image likelihoods)
    fgsm/eps, pgd/eps [E]      epsilons in [0, 1] pixel units (in-distribution set)
    fgsm/pred, pgd/pred [E, N] prediction of every image at every epsilon (int16)
    images/{inputs,recon,samples} [n, 3, 32, 32] uint8   in the shard holding image 0

File attributes carry provenance (schema_version, run_id, set, role, set_size, start, stop,
config_yaml, checkpoint_sha256, git_commit, versions, sigma, ...). Files are written under a
temporary name and renamed when complete. Which sets a run evaluates, with which settings, and
whether a set is done is ``dhm.core.layout``'s answer (no h5py needed for it).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dhm.core.fsutil import atomic_path
from dhm.core.layout import (  # noqa: F401 - the layout's names, part of this module's API
    ROLES,
    SCHEMA_VERSION,
    eval_sets,
    set_complete,
    shard_name,
)
from dhm.core.shard_attrs import (  # noqa: F401 - part of this module's API
    open_readonly,
    read_attr,
    read_attrs,
    shard_eval_id,
    shard_set_size,
)

_PER_SAMPLE_PREFIXES = (
    "indices", "labels", "logits", "neg_elbo", "neg_iwae_k", "iwae_ess", "complexity_bits",
    "trained_neg_", "fgsm/pred", "pgd/pred",
)  # fmt: skip

REQUIRED_ATTRS = ("schema_version", "set", "role", "set_size", "start", "stop")  # read_shard checks
_TEXT = h5py.string_dtype()
_ARRAY_TYPES = tuple(  # datasets: (HDF5 type, numpy dtype) of those write_shard stores
    (h5py.h5t.py_create(np.dtype(d)), np.dtype(d)) for d in ("<i8", "<f4", "<i2", "<f8")
)


class ShardError(ValueError):
    """A shard file that is missing, unreadable, inconsistent or incomplete (names the file)."""


class ShardGapError(ShardError):
    """Images of a set that no shard covers: the evaluation is incomplete, not corrupt."""


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
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
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


def _read_dataset(obj: Any) -> Any:
    """A whole dataset (low-level id) as ``h5py.Dataset[()]`` gives it."""
    ftype, shape = obj.get_type(), obj.shape
    found = next(((t, d) for t, d in _ARRAY_TYPES if ftype == t), None)  # cheaper than obj.dtype
    if found is None or shape is None:  # other types, empty dataspace: h5py's general path
        return h5py.Dataset(obj)[()]
    arr = np.empty(shape, found[1])
    if arr.size:
        obj.read(h5py.h5s.ALL, h5py.h5s.ALL, arr, mtype=found[0])
    return arr[()] if arr.ndim == 0 else arr


def read_shard(path: str | Path, attrs: Iterable[str] | None = None) -> Shard:
    """Read a shard file; ShardError names the file and what is wrong.

    Every dataset of the set's group is read; of the file attributes, those the checks need
    (``REQUIRED_ATTRS``) plus ``attrs``, or all of them when ``attrs`` is None. It uses h5py's
    low-level API (about twice as fast as ``h5py.File`` for these small files).
    """
    path = Path(path)
    try:
        fid = open_readonly(path)
    except (OSError, KeyError, ValueError) as err:
        raise ShardError(f"{path}: unreadable shard ({type(err).__name__}: {err})") from None
    try:
        if attrs is None:
            names: list[bytes] = []
            h5py.h5a.iterate(fid, names.append)
            keys = [n.decode() for n in names]
        else:
            keys = list(dict.fromkeys([*REQUIRED_ATTRS, *attrs]))
        found = {k: v for k, v in ((k, read_attr(fid, k)) for k in keys) if v is not None}
        set_name, group = found.get("set"), None
        if isinstance(set_name, str):
            try:
                group = h5py.h5o.open(fid, set_name.encode())
            except KeyError:
                pass
        if not isinstance(group, h5py.h5g.GroupID):
            what = "missing" if set_name is None else f"{set_name!r}, which names no group"
            raise ShardError(f"{path}: attribute set is {what}")
        members: list[bytes] = []
        group.links.visit(members.append)
        arrays: dict[str, np.ndarray] = {}
        for member in members:
            obj = h5py.h5o.open(group, member)
            if isinstance(obj, h5py.h5d.DatasetID):
                arrays[member.decode()] = _read_dataset(obj)
    except ShardError:
        raise
    except (OSError, KeyError, ValueError) as err:  # ValueError: undecodable text, bad data
        raise ShardError(f"{path}: unreadable shard ({type(err).__name__}: {err})") from None
    finally:
        fid.close()
    if found.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema_version {found.get('schema_version')} != {SCHEMA_VERSION}"
        )
    if found.get("role") not in ROLES:
        raise ShardError(f"{path}: attribute role is {found.get('role', 'missing')!r}, not id|ood")
    start, stop, size = (_int_attr(path, found, k) for k in ("start", "stop", "set_size"))
    if not 0 <= start <= stop <= size:
        raise ShardError(f"{path}: range [{start}, {stop}) is not within set_size {size}")
    if "indices" not in arrays:
        raise ShardError(f"{path}: no {set_name}/indices dataset")
    n = len(arrays["indices"])
    if n != stop - start:
        raise ShardError(f"{path}: {n} indices for the range [{start}, {stop})")
    for key, value in arrays.items():
        if _per_sample(key) and value.shape[-1 if key.endswith("/pred") else 0] != n:
            raise ShardError(f"{path}: {key} has shape {value.shape}, expected {n} samples")
    return Shard(path, set_name, found, arrays)


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
        if _merged_keys(shard) != _merged_keys(first):
            raise ShardError(f"{shard.path}: datasets differ from {first.path.name}")
        covered = int(shard.attrs["stop"])
    if covered != size:
        raise ShardGapError(f"set {first.set_name}: images [{covered}, {size}) have no shard")
    merged: dict[str, np.ndarray] = {}
    for key in first.arrays:
        if key.startswith("images/"):
            continue
        parts = [s.arrays[key] for s in order]
        if key.endswith("/pred"):
            merged[key] = np.concatenate(parts, axis=1)
        elif _per_sample(key):
            merged[key] = np.concatenate(parts, axis=0)
        else:
            merged[key] = parts[0]  # per-set constants such as fgsm/eps
    if not np.array_equal(merged["indices"], np.arange(size)):
        raise ShardError(f"set {first.set_name}: indices are not 0..{size - 1} in order")
    for shard in order:  # the report's image grids, from the shard that holds image 0
        merged.update({k: v for k, v in shard.arrays.items() if k.startswith("images/")})
    merged.pop("fgsm/accuracy", None)  # shard-level; recomputed over the full set
    merged.pop("pgd/accuracy", None)
    attrs = {k: v for k, v in first.attrs.items() if k not in ("start", "stop", "created")}
    return SetResults(
        first.set_name, str(first.attrs["role"]), merged, attrs, [s.path for s in order]
    )


def _merged_keys(shard: Shard) -> set[str]:
    return {k for k in shard.arrays if not k.startswith("images/")}


def merge_parts(parts: list[list[Shard]]) -> SetResults:
    """One set from its parts (``dhm.core.variants``: scores, then attacks), each merged over
    its shards; ShardError when the parts disagree on the images."""
    merged = [merge_shards(shards) for shards in parts]
    out = merged[0]
    for other in merged[1:]:
        for key in ("indices", "labels"):
            if key in other.arrays and not np.array_equal(other.arrays[key], out.arrays.get(key)):
                raise ShardError(
                    f"{other.shard_paths[0]}: {key} differ from those of {out.shard_paths[0]}"
                )
        out.arrays.update({k: v for k, v in other.arrays.items() if k not in out.arrays})
        out.shard_paths += other.shard_paths
    return out


def load_run(eval_dir: str | Path, checkpoint: str = "final") -> dict[str, SetResults]:
    """Every set of one run's evaluation at ``checkpoint`` (final, or epoch<N>), merged over
    its shards and parts; raises ShardError on the first problem, and when a set has several
    evaluations of one part (variants: ``dhm.summary.aggregate`` reads those one by one)."""
    eval_dir = Path(eval_dir)
    folders = [p for p in sorted(eval_dir.glob(f"{checkpoint}-*-*")) if p.is_dir()]
    paths = [*sorted(eval_dir.glob("*.h5")), *(q for f in folders for q in sorted(f.glob("*.h5")))]
    if not paths:
        raise ShardError(f"{eval_dir}: no shard files")
    by_set: dict[str, dict[str, list[Shard]]] = {}
    for path in paths:
        shard = read_shard(path)
        folder = "" if path.parent == eval_dir else path.parent.name
        by_set.setdefault(shard.set_name, {}).setdefault(folder, []).append(shard)
    out = {}
    for name, groups in sorted(by_set.items()):
        kinds = [f.split("-")[1] if f else "old layout" for f in groups]
        if len(set(kinds)) != len(kinds):
            raise ShardError(
                f"{eval_dir}: set {name} has several evaluations ({', '.join(groups)})"
            )
        out[name] = merge_parts([groups[f] for f in sorted(groups, key=_part_order)])
    return out


def _part_order(folder: str) -> int:
    return 0 if not folder else 1 if folder.split("-")[1] == "scores" else 2
