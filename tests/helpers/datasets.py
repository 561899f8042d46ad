"""Dataset files and image sets for tests: tiny CIFAR-10 and SVHN files in the official on-disk
layouts (parsed by the real torchvision code), and an image set whose labels are its indices."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import scipy.io
import torch

from dhm.data import loaders as D


def write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0):
    """CIFAR-10 python layout; returns expected (train, test) as CHW uint8 + labels.

    Keys are str: the real Python-2 pickles decode to str keys under encoding="latin1".
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    for split, names, n in [("train", train_names, per_batch), ("test", ["test_batch"], n_test)]:
        xs, ys = [], []
        for name in names:
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            y = rng.integers(0, 10, n).tolist()
            write_pickle(folder / name, {"data": x, "labels": y, "batch_label": name})
            xs.append(x)
            ys += y
        out[split] = (np.concatenate(xs).reshape(-1, 3, 32, 32), np.array(ys))
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return out["train"], out["test"]


def write_svhn(root: Path, split: str, n: int, seed: int = 0):
    """SVHN .mat: X [32,32,3,N] uint8, y [N,1] in 1..10 (10 = digit 0). Returns CHW + labels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0, 0] = 10
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return x.transpose(3, 2, 0, 1), np.where(y[:, 0] == 10, 0, y[:, 0])


def indexed_set(n: int = 53, seed: int = 0) -> D.ImageSet:
    """Random uint8 images [n, 3, 32, 32] whose label is their own index, so y reveals which
    samples a batch holds."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return D.ImageSet("t", images, torch.arange(n))
