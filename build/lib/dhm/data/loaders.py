"""Datasets and device-resident batch loaders for Deep Hybrid Model training.

Every set is held as raw ``uint8`` pixels ``[N, 3, 32, 32]`` (CHW); conversion to float in
``[0, 1]`` happens per batch and normalization (``DatasetInfo.mean``/``std``) is the model's job,
so OOD sets are always normalized with the in-distribution statistics.

Sources: CIFAR-10/100 and SVHN through torchvision's parsers (files under ``root``), and two
offline sets built from files scikit-learn ships: ``digits`` (``load_digits``, 8x8 upsampled to
32x32) and ``digits_ood`` (crops of ``load_sample_images``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dhm.core.datasets import (
    DATASETS,
    DIGITS_HELDOUT,
    OOD_SETS,
    SPLITS,
    DataError,
    DatasetInfo,
    explain_files,
)

__all__ = ["DATASETS", "OOD_SETS", "DataError", "DatasetInfo", "ImageSet"]

_DIGITS_TEST_SEED = 2024  # fixed: the digits test set must not move with split_seed
_DIGITS_TEST_SIZE = 360  # of all 1,797 images; the classes 0-7 among them are the test set


@dataclass
class ImageSet:
    """Images with labels. ``images``: uint8 [N,3,32,32] CPU; ``labels``: int64 [N] (-1: none).

    Tensors may be shared with an in-process cache: treat them as read-only (no in-place ops).
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(
                f"{self.name}: images must be uint8 [N,3,32,32], got {x.dtype} {x.shape}"
            )
        if y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise ValueError(
                f"{self.name}: labels must be int64 [{x.shape[0]}], got {y.dtype} {y.shape}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]


def dataset_info(name: str) -> DatasetInfo:
    """Return ``DATASETS[name]``; unknown names raise DataError listing the allowed ones."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return DATASETS[name]


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images [N,C,H,W] scaled to [0, 1]."""
    x = images.to(torch.float64).div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1, correction=0).tolist())


# ---------------------------------------------------------------- file-based sets (torchvision)


_FILE_CACHE: dict[tuple[str, str, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def clear_cache() -> None:
    """Drop all in-process dataset caches (file-based and embedded)."""
    _FILE_CACHE.clear()
    _digits_all.cache_clear()
    _digits_pool.cache_clear()
    _digits_ood.cache_clear()
    _digits_heldout.cache_clear()


def _load_file_set(name: str, root: Path, train: bool, download: bool):
    key = (name, str(root), train)
    if key in _FILE_CACHE:
        return _FILE_CACHE[key]
    import torchvision.datasets as tvd  # deferred: the offline sets do not need torchvision

    try:
        if name == "svhn":
            ds = tvd.SVHN(str(root), split="train" if train else "test", download=download)
            images = torch.from_numpy(np.ascontiguousarray(ds.data))  # already [N,3,32,32]
            labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64).reshape(-1))
        else:
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(str(root), train=train, download=download)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
            labels = torch.tensor(ds.targets, dtype=torch.int64)
    except Exception as e:  # any failure (checks, parsing, download) gets an actionable message
        raise DataError(explain_files(name, root, train, download, e)) from e
    _FILE_CACHE[key] = images, labels
    return images, labels


# --------------------------------------------------------------------- embedded offline sets


@lru_cache(maxsize=1)
def _digits_all() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 sklearn digits as uint8 [N,3,32,32] (0..16 -> 0..255, bilinear 8->32)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).to(torch.float64).mul(255.0 / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(d.target.astype(np.int64))


def _digits_test_mask() -> torch.Tensor:
    """bool [1797]: the fixed 360-image test portion (a frozen permutation, any class)."""
    n = len(_digits_all()[1])
    # RandomState's stream is frozen by NumPy's compatibility policy, so the split never moves.
    perm = torch.from_numpy(np.random.RandomState(_DIGITS_TEST_SEED).permutation(n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[perm[:_DIGITS_TEST_SIZE]] = True
    return mask


@lru_cache(maxsize=2)
def _digits_pool(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits 0-7: the test images of the fixed test portion, or all the others (training)."""
    x, y = _digits_all()
    known = ~torch.isin(y, torch.tensor(DIGITS_HELDOUT))
    idx = torch.nonzero(known & (_digits_test_mask() != train)).flatten()
    return x[idx], y[idx]


@lru_cache(maxsize=1)
def _digits_heldout() -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the held-out digits 8 and 9 (never trained on): the near-OOD set."""
    x, y = _digits_all()
    idx = torch.nonzero(torch.isin(y, torch.tensor(DIGITS_HELDOUT))).flatten()
    return x[idx], torch.full((len(idx),), -1, dtype=torch.int64)


@lru_cache(maxsize=1)
def _digits_ood() -> tuple[torch.Tensor, torch.Tensor]:
    """360 photo patches: a 12x15 grid of 64x64 crops of china.jpg and flower.jpg, 2x2-averaged."""
    from sklearn.datasets import load_sample_images

    crops = []
    for img in load_sample_images().images:  # uint8 [427, 640, 3] each
        t = torch.tensor(img, dtype=torch.float64).permute(2, 0, 1)  # copy: read-only array
        h, w = t.shape[1:]
        for top in np.linspace(0, h - 64, 12).round().astype(int):
            for left in np.linspace(0, w - 64, 15).round().astype(int):
                crops.append(t[:, top : top + 64, left : left + 64])
    x = F.avg_pool2d(torch.stack(crops), 2).round().clamp(0, 255).to(torch.uint8)
    return x, torch.full((x.shape[0],), -1, dtype=torch.int64)


# ------------------------------------------------------------------------------ public loaders


def _raw(name: str, root: str | Path, train: bool, download: bool):
    if name == "digits":
        return _digits_pool(train)  # root is ignored: the data ships with scikit-learn
    if name == "digits_ood":
        return _digits_ood()
    if name == "digits_heldout":
        return _digits_heldout()
    return _load_file_set(name, Path(root).expanduser().resolve(), train, download)


def split_indices(n: int, val_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint sorted (train, val) int64 index tensors covering ``range(n)``; val has val_size."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size={val_size} must be in [0, {n}) for a training set of {n}")
    perm = torch.from_numpy(np.random.RandomState(split_seed).permutation(n))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def load_split(
    name: str,
    root: str | Path,
    split: str,
    *,
    download: bool = False,
    val_size: int | None = None,
    split_seed: int = 0,
) -> ImageSet:
    """Load ``split`` ("train", "val" or "test") of dataset ``name`` as uint8 [N,3,32,32].

    train/val partition the official training set by a seeded permutation (``split_seed``);
    ``val_size=None`` uses ``DATASETS[name].val_size``. Missing/corrupt files raise DataError.
    """
    dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _raw(name, root, split != "test", download)
    if split == "test":
        return ImageSet(name, images, labels)
    vs = DATASETS[name].val_size if val_size is None else val_size
    train_idx, val_idx = split_indices(len(labels), vs, split_seed)
    idx = train_idx if split == "train" else val_idx
    return ImageSet(name, images[idx], labels[idx])


def load_ood(name: str, root: str | Path, *, download: bool = False) -> ImageSet:
    """Load the test split of OOD set ``name`` (one of OOD_SETS), raw uint8 [N,3,32,32]."""
    if name not in OOD_SETS:
        raise DataError(f"unknown OOD set {name!r}; allowed: {', '.join(OOD_SETS)}")
    images, labels = _raw(name, root, False, download)
    return ImageSet(name, images, labels)


# ----------------------------------------------------------------------------------- batching


def _mixed_seed(*words: int) -> int:
    # SeedSequence hashes the tuple, so (seed, epoch) and (seed, epoch + 1) give unrelated streams.
    return int(np.random.SeedSequence([w % 2**64 for w in words]).generate_state(1, np.uint64)[0])


_PERM_TAG, _AUG_TAG = 0, 1  # keep the order and augmentation streams apart


def augmentation_params(
    seed: int, epoch: int, batch: int, n: int, padding: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets int64 [n,2] (dy, dx in 0..2*padding) and flip flags bool [n], on CPU.

    Drawn for a whole global batch from a generator seeded by (seed, epoch, batch).
    """
    g = torch.Generator().manual_seed(_mixed_seed(_AUG_TAG, seed, epoch, batch))
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=g)
    flips = torch.randint(0, 2, (n,), generator=g).bool()
    return offsets, flips


def crop_flip(
    images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int = 4
) -> torch.Tensor:
    """Zero-pad by ``padding``, crop at ``offsets`` [B,2] (dy, dx), then h-flip where ``flips``.

    Equals torchvision's pad -> crop -> hflip per sample; images [B,C,H,W] any dtype, same out.
    One gather on the images' device: no Python loop over samples. The definition that
    ``CropWindows`` (the training loader's faster path) is tested against.
    """
    b, c, h, w = images.shape
    dev = images.device
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(images, (padding,) * 4).reshape(b * c * hp, wp)
    offsets, flips = offsets.to(dev), flips.to(dev)
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    # Rows first: whole padded rows with one index_select (contiguous copies), then the
    # per-sample column window (and flip) with one gather whose index is shared by every
    # row of a sample: faster on CPU than one 4-way advanced-indexing gather.
    first_row = torch.arange(b * c, device=dev).view(b, c, 1) * hp
    row_idx = (first_row + (offsets[:, :1] + ar_h)[:, None, :]).reshape(-1)
    rows = torch.index_select(padded, 0, row_idx).view(b, c * h, wp)
    cols = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - ar_w, ar_w)  # [B,W]
    return torch.gather(rows, 2, cols[:, None, :].expand(b, c * h, w)).view(b, c, h, w)


class CropWindows:
    """Every padded crop of a uint8 set as one overlapping strided view; a batch is one gather.

    Holds the zero-padded images and their mirror images, contiguous, [2N,C,H+2p,W+2p] (about
    3.1x the set's bytes at p=4 on 32x32). In the flat buffer, the crop at (dy, dx) of padded
    image j is a fixed-stride window starting at ``j*S + dy*(W+2p) + dx`` (S = one padded
    image), so ``windows`` views the buffer as [positions, C, H, W] with strides
    (1, (H+2p)(W+2p), W+2p, 1), and a batch of crops is ``index_select`` of their start
    positions: one contiguous-row copy per image row, faster than the per-element gather of
    ``crop_flip`` (docs/performance.md). A flipped crop at dx is the window
    at 2p - dx of the mirror image. Equals ``crop_flip`` bit for bit (tested).
    """

    def __init__(self, images: torch.Tensor, padding: int = 4) -> None:
        n, c, h, w = images.shape
        self.n, self.padding = n, padding
        self.hp, self.wp = h + 2 * padding, w + 2 * padding
        # Written in place: the peak is the buffer plus one flipped copy of the set.
        buffer = images.new_zeros((2 * n, c, self.hp, self.wp))
        inner = (slice(None), slice(None), slice(padding, padding + h), slice(padding, padding + w))
        buffer[:n][inner] = images
        buffer[n:][inner] = images.flip(-1)
        self.buffer = buffer.view(-1)
        self.image_stride = c * self.hp * self.wp
        last = (c - 1) * self.hp * self.wp + (h - 1) * self.wp + (w - 1)  # a window's span
        positions = self.buffer.numel() - last
        self.windows = self.buffer.as_strided(
            (positions, c, h, w), (1, self.hp * self.wp, self.wp, 1)
        )

    def starts(self, idx: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Window start positions (int64 [B], on ``idx``'s device) of images ``idx`` cropped at
        ``offsets`` [B,2] (dy, dx) and flipped where ``flips``."""
        offsets, flips = offsets.to(idx.device).long(), flips.to(idx.device)
        dx = torch.where(flips, 2 * self.padding - offsets[:, 1], offsets[:, 1])
        image = idx.long() + flips.long() * self.n  # int64: positions exceed 2**31 past ~220k
        return image * self.image_stride + offsets[:, 0] * self.wp + dx

    def gather(self, starts: torch.Tensor) -> torch.Tensor:
        """The crops [B,C,H,W] at window ``starts`` (on the buffer's device)."""
        return torch.index_select(self.windows, 0, starts)

    def __call__(
        self, idx: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor
    ) -> torch.Tensor:
        """Crops [B,C,H,W] of images ``idx`` at ``offsets`` [B,2] (dy, dx), flipped where
        ``flips``."""
        return self.gather(self.starts(idx.to(self.buffer.device), offsets, flips))


class DeviceLoader:
    """Training batches from a dataset resident on one device, no DataLoader workers, no PIL.

    The epoch order is a pure function of (seed, epoch), augmentation of (seed, epoch, batch);
    both are drawn for the whole global batch, and rank r takes the contiguous slice
    [r*n/W, (r+1)*n/W) of each global batch of n samples. So ranks together reproduce the
    world_size=1 batch exactly, and ``epoch(e, start_batch=k)`` resumes bit-exactly. With
    drop_last=False the last global batch is smaller and split as evenly as possible (a rank
    can get an empty slice when it has fewer samples than world_size).
    """

    def __init__(
        self,
        data: ImageSet,
        global_batch_size: int,
        *,
        device: torch.device | str,
        seed: int,
        augment: bool,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}"
            )
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"world_size={world_size}"
            )
        n = len(data)
        self.num_batches = n // global_batch_size if drop_last else -(-n // global_batch_size)
        if self.num_batches == 0:
            raise ValueError(f"{data.name}: {n} samples give no batch of {global_batch_size}")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)  # once; batches are gathered from here
        # index_select on a [N, C*H*W] view copies whole images (faster on CPU than advanced
        # indexing of the 4-d tensor).
        self._flat = self.images.reshape(len(data), -1)
        self._crops = CropWindows(self.images) if augment else None
        self.labels = data.labels.to(self.device)
        self.n, self.global_batch_size = n, global_batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.dtype = dtype or torch.get_default_dtype()

    def __len__(self) -> int:
        return self.num_batches

    def permutation(self, epoch: int) -> torch.Tensor:
        """Sample order of ``epoch``: int64 [N] on CPU (identical on every device and rank)."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(_mixed_seed(_PERM_TAG, self.seed, epoch))
        return torch.randperm(self.n, generator=g)

    def epoch(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x [B_local,3,32,32] in [0,1] of ``dtype`` (default: torch's default float),
        y int64 [B_local]) on the device,
        for global batches ``start_batch .. len(self) - 1``."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch={start_batch} not in [0, {self.num_batches}]")
        return self._batches(epoch, start_batch)

    def _batches(self, epoch: int, start_batch: int):
        g, w, r = self.global_batch_size, self.world_size, self.rank
        perm = self.permutation(epoch)
        # The whole epoch's indices and crop windows are worked out on the host and copied
        # once: a blocking host-to-device copy per batch would wait for the GPU every step.
        spans, idx_parts, start_parts, pos = [], [], [], 0
        for b in range(start_batch, self.num_batches):
            n = min(g, self.n - b * g)  # global batch size, smaller only for the last one
            lo, hi = n * r // w, n * (r + 1) // w
            idx = perm[b * g + lo : b * g + hi]
            idx_parts.append(idx)
            if self._crops is not None:
                offsets, flips = augmentation_params(self.seed, epoch, b, n)
                start_parts.append(self._crops.starts(idx, offsets[lo:hi], flips[lo:hi]))
            spans.append((pos, pos + hi - lo))
            pos += hi - lo
        if not spans:
            return
        all_idx = torch.cat(idx_parts).to(self.device)
        all_starts = torch.cat(start_parts).to(self.device) if start_parts else None
        for a, z in spans:
            idx = all_idx[a:z]
            if all_starts is not None:
                x = self._crops.gather(all_starts[a:z])
            else:
                x = torch.index_select(self._flat, 0, idx).view(-1, *self.images.shape[1:])
            yield x.to(self.dtype).div_(255), self.labels[idx]


def iterate_batches(
    data: ImageSet,
    batch_size: int,
    *,
    device: torch.device | str,
    start: int = 0,
    stop: int | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Evaluation batches over ``data[start:stop]``: the fixed blocks ``[k*B, (k+1)*B)`` of the
    whole set (B = ``batch_size``; the last block may be shorter), no augmentation.

    An image always shares its batch with the same neighbours however a set is sharded, so
    per-image outputs do not depend on the sharding even where a kernel's arithmetic depends
    on the batch size (oneDNN picks kernels per shape). ``start`` must be a block boundary and
    ``stop`` a block boundary or the set's end. Yields (indices int64 [B], x [B,3,32,32] in
    [0,1] of ``dtype`` (default: torch's default float), y int64 [B]), all on ``device``.
    """
    n = len(data)
    stop = n if stop is None else min(stop, n)
    if batch_size < 1 or not 0 <= start <= stop:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= start <= stop, got {batch_size}, {start}, {stop}"
        )
    if start < stop and (start % batch_size or (stop % batch_size and stop != n)):
        raise ValueError(
            f"[{start}, {stop}) is not a union of whole evaluation blocks of {batch_size} images"
        )
    dtype = dtype or torch.get_default_dtype()

    def gen():
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            x = data.images[lo:hi].to(device).to(dtype).div_(255)  # move uint8, convert there
            yield torch.arange(lo, hi, device=device), x, data.labels[lo:hi].to(device)

    return gen()
