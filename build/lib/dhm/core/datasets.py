"""What is known about each dataset before any file is read: the one list of names.

Classes, normalization, augmentation, default OOD sets, validation split sizes and where
torchvision expects the files. No torch here: the launcher validates names and looks for files
with this module alone; ``dhm.data.loaders`` loads the pixels.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of an in-distribution dataset."""

    name: str
    num_classes: int
    mean: tuple[float, float, float]  # per-channel, of [0, 1] pixels; applied inside the model
    std: tuple[float, float, float]
    augment: bool  # random crop (pad 4) + horizontal flip during training
    ood_sets: tuple[str, ...]  # default OOD sets evaluated against this dataset
    val_size: int  # default validation images carved out of the official training set
    train_size: int  # images of the official training set (train + validation)


# Hard-coded from channel_stats() of the digits training pool (classes 0-7, train + val, test
# excluded); tests/test_data.py recomputes them so a change in the conversion is caught.
_DIGITS_MEAN = 0.302555
_DIGITS_STD = 0.324488

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2023, 0.1994, 0.2010),
        True,
        ("svhn", "cifar100"),
        8000,
        50000,
    ),
    "svhn": DatasetInfo(
        "svhn",
        10,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        False,
        ("cifar10", "cifar100"),
        14652,
        73257,
    ),
    # Digits 0-7 of scikit-learn's bundled set. No crop/flip: digit identity is position and
    # orientation sensitive. OOD: the held-out digits 8 and 9 (near: same strokes, same
    # scanner), then photo patches (far).
    "digits": DatasetInfo(
        "digits",
        8,
        (_DIGITS_MEAN,) * 3,
        (_DIGITS_STD,) * 3,
        False,
        ("digits_heldout", "digits_ood"),
        200,
        1159,
    ),
}
# Every set that can be evaluated as out-of-distribution (its test split, labels unused).
OOD_SETS: tuple[str, ...] = ("cifar10", "cifar100", "svhn", "digits_heldout", "digits_ood")
DIGITS_HELDOUT = (8, 9)  # digit classes never trained on; the demo's near-OOD set
# Images of each set's test split as shipped (what a full evaluation covers).
TEST_SIZES = {
    "cifar10": 10000,
    "cifar100": 10000,
    "svhn": 26032,
    "digits": 284,
    "digits_heldout": 354,
    "digits_ood": 360,
}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FileSpec:
    """Files torchvision's parser of a dataset reads, under ``<root>/<folder>``."""

    title: str
    folder: str  # subfolder of root holding the files ("" = root itself)
    train_files: tuple[str, ...]  # what torchvision needs for train=True (checks included)
    test_files: tuple[str, ...]
    archive: str  # how to obtain the files by hand


_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
FILE_SPECS: dict[str, FileSpec] = {
    # torchvision's CIFAR integrity check covers the train and test files for either split.
    "cifar10": FileSpec(
        "CIFAR-10",
        "cifar-10-batches-py",
        _CIFAR10_FILES,
        _CIFAR10_FILES,
        "extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into <root>/",
    ),
    "cifar100": FileSpec(
        "CIFAR-100",
        "cifar-100-python",
        ("train", "test", "meta"),
        ("train", "test", "meta"),
        "extract https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into <root>/",
    ),
    "svhn": FileSpec(
        "SVHN",
        "",
        ("train_32x32.mat",),
        ("test_32x32.mat",),
        "download train_32x32.mat / test_32x32.mat from http://ufldl.stanford.edu/housenumbers/"
        " into <root>/",
    ),
}


class DataError(ValueError):
    """A dataset is unknown, missing or unreadable; the message names the file and the fix."""


_MAT_HEADER = 128  # MATLAB 5.0 MAT-file: text header, then tagged data elements
_MAT_TAG = struct.Struct("<II")  # (data type, bytes) of a data element, little-endian


def _pickle_whole(f: BinaryIO, size: int) -> bool:
    """A pickle (protocol 2 and up, as CIFAR's batches are) of a dict whose last two bytes are
    SETITEMS/SETITEM and STOP: a file cut short ends there by chance once in 2^16."""
    head = f.read(2)
    f.seek(size - 2)
    return head[:1] == b"\x80" and 2 <= head[1] <= 5 and f.read(2) in (b"u.", b"s.")


def _mat_whole(f: BinaryIO, size: int) -> bool:
    """A MATLAB 5.0 MAT-file (SVHN's, as scipy.io.savemat writes too) whose top-level data
    elements' tags add up to the file's size (at least two: X and y); only the tags are read."""
    header = f.read(_MAT_HEADER)
    if not header.startswith(b"MATLAB 5.0 MAT-file") or header[126:128] != b"IM":
        return False  # not a MAT-file, or big-endian (neither torchvision's nor scipy's)
    pos, elements = _MAT_HEADER, 0
    while pos < size:
        elements += 1
        f.seek(pos)
        tag = f.read(_MAT_TAG.size)
        if len(tag) < _MAT_TAG.size:
            return False
        dtype, nbytes = _MAT_TAG.unpack(tag)
        if dtype >> 16:  # small data element: type, size and data in these 8 bytes
            pos += _MAT_TAG.size
            continue
        pos += _MAT_TAG.size + nbytes
        if dtype != 15:  # elements other than miCOMPRESSED are padded to 8 bytes
            pos += -nbytes % 8
    return pos == size and elements >= 2  # SVHN's X and y


def _whole(path: Path, name: str) -> bool:
    """Whether a dataset file has its format's header and is not cut short: a few bytes read,
    whatever its size (the full parse, and torchvision's md5, run where the set is loaded)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4:
                return False
            return (_mat_whole if name == "svhn" else _pickle_whole)(f, size)
    except OSError:
        return False


def file_problem(name: str, root: str | Path, train: bool) -> str | None:
    """What is wrong with the files of file-based set ``name`` under ``root`` (None: nothing).

    Looks for every file torchvision reads and checks each one's header and length (pickle,
    .mat): a missing folder, a missing file and a truncated or corrupt file are each named. Not
    torchvision's md5 check, which the real load still does.
    """
    spec = FILE_SPECS[name]
    root = Path(root).expanduser()
    folder = root / spec.folder if spec.folder else root
    files = spec.train_files if train else spec.test_files
    if not folder.is_dir():
        return f"folder {folder}/ does not exist"
    if missing := [str(folder / f) for f in files if not (folder / f).is_file()]:
        return "missing file(s) " + ", ".join(missing)
    if bad := [str(folder / f) for f in files if not _whole(folder / f, name)]:
        return "truncated or corrupt file(s) " + ", ".join(bad)
    return None


def _fix(name: str, root: str | Path, train: bool) -> str:
    spec = FILE_SPECS[name]
    folder = Path(root) / spec.folder if spec.folder else Path(root)
    files = spec.train_files if train else spec.test_files
    return (
        f"Fix: set data.download=true, or {spec.archive.replace('<root>', str(root))} "
        f"so that {folder}/ holds {', '.join(files)}"
    )


def explain_files(name: str, root: str | Path, train: bool, download: bool, err: Exception) -> str:
    """The message for a failed load: which folder or file is the problem, and the fix."""
    spec = FILE_SPECS[name]
    problem = file_problem(name, root, train) or (
        f"files under {root}/ failed torchvision's checksum check (corrupt or another version)"
    )
    tried = " (download=true was set and failed: no internet?)" if download else ""
    which = "training" if train else "test"
    return (
        f"cannot load {spec.title} {which} set: {problem}{tried}. {_fix(name, root, train)}. "
        f"[{type(err).__name__}: {err}]"
    )


def check_files(name: str, root: str | Path, train: bool, key: str = "data.root") -> None:
    """Raise DataError naming the file and the fix when set ``name`` cannot be read from
    ``root`` (the launch-time check; the embedded digits sets need no files)."""
    if name not in FILE_SPECS:
        return
    problem = file_problem(name, root, train)
    if problem is not None:
        which = "training" if train else "test"
        raise DataError(
            f"{key}={root}: cannot read the {FILE_SPECS[name].title} {which} set: {problem}. "
            f"{_fix(name, root, train)}"
        )
