"""Tests for dhm.data.loaders: real torchvision parsers on tiny on-disk files, offline sets,
loaders."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.svhn as tv_svhn
import torchvision.transforms.v2.functional as TF

from dhm.data import loaders as D
from tests.helpers.datasets import indexed_set, write_cifar10, write_pickle, write_svhn


@pytest.fixture
def no_md5(monkeypatch):
    """Skip only torchvision's md5 comparison (tiny files can't match); existence still checked.

    The module-level ``check_integrity`` is patched because CIFAR's ``_load_meta`` calls it
    directly besides ``_check_integrity``; all parsing stays real.
    """

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(tv_cifar, "check_integrity", exists)
    monkeypatch.setattr(tv_svhn, "check_integrity", exists)


def _row_ids(images: torch.Tensor, reference: np.ndarray) -> list[int]:
    """Index in ``reference`` of each image (random pixels make every image unique)."""
    lookup = {r.tobytes(): i for i, r in enumerate(reference)}
    return [lookup[r.numpy().tobytes()] for r in images]


def test_cifar10_roundtrip_and_split(tmp_path, no_md5):
    (xtr, ytr), (xte, yte) = write_cifar10(tmp_path)
    test = D.load_split("cifar10", tmp_path, "test")
    assert test.images.dtype == torch.uint8 and test.labels.dtype == torch.int64
    assert np.array_equal(test.images.numpy(), xte) and np.array_equal(test.labels.numpy(), yte)
    # Pixel [c, h, w] must come from byte c*1024 + h*32 + w of the stored row.
    assert test.images[1, 2, 3, 4] == xte.reshape(-1, 3072)[1, 2 * 1024 + 3 * 32 + 4]

    tr = D.load_split("cifar10", tmp_path, "train", val_size=5, split_seed=0)
    va = D.load_split("cifar10", tmp_path, "val", val_size=5, split_seed=0)
    assert (len(tr), len(va)) == (15, 5)
    ids_tr, ids_va = _row_ids(tr.images, xtr), _row_ids(va.images, xtr)
    assert sorted(ids_tr + ids_va) == list(range(20))  # disjoint, union = training set
    assert np.array_equal(tr.labels.numpy(), ytr[ids_tr])
    assert np.array_equal(va.labels.numpy(), ytr[ids_va])
    assert D.load_split("cifar10", tmp_path, "val", val_size=5, split_seed=0).labels.equal(
        va.labels
    )
    other = _row_ids(D.load_split("cifar10", tmp_path, "val", val_size=5, split_seed=1).images, xtr)
    assert sorted(other) != sorted(ids_va)
    ood = D.load_ood("cifar10", tmp_path)
    assert np.array_equal(ood.images.numpy(), xte)


def test_cifar100_ood_fine_labels(tmp_path, no_md5):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    sets = {}
    for name, n in [("train", 5), ("test", 7)]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine, coarse = rng.integers(0, 100, n).tolist(), rng.integers(0, 20, n).tolist()
        write_pickle(folder / name, {"data": x, "fine_labels": fine, "coarse_labels": coarse})
        sets[name] = (x.reshape(-1, 3, 32, 32), np.array(fine))
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["c"] * 20}
    write_pickle(folder / "meta", meta)
    ood = D.load_ood("cifar100", tmp_path)
    assert np.array_equal(ood.images.numpy(), sets["test"][0])
    assert np.array_equal(ood.labels.numpy(), sets["test"][1])


def test_svhn_roundtrip_and_label_mapping(tmp_path, no_md5):
    xtr, ytr = write_svhn(tmp_path, "train", 12, seed=2)
    xte, yte = write_svhn(tmp_path, "test", 5, seed=3)
    test = D.load_split("svhn", tmp_path, "test")
    assert np.array_equal(test.images.numpy(), xte) and np.array_equal(test.labels.numpy(), yte)
    assert test.labels[0] == 0 and test.labels.max() <= 9
    tr = D.load_split("svhn", tmp_path, "train", val_size=4, split_seed=7)
    va = D.load_split("svhn", tmp_path, "val", val_size=4, split_seed=7)
    ids_tr, ids_va = _row_ids(tr.images, xtr), _row_ids(va.images, xtr)
    assert len(ids_va) == 4 and sorted(ids_tr + ids_va) == list(range(12))
    assert np.array_equal(va.labels.numpy(), ytr[ids_va])
    assert D.load_ood("svhn", tmp_path).labels.equal(test.labels)


def test_missing_folder_names_folder_and_fix(tmp_path):
    with pytest.raises(D.DataError) as e:
        D.load_split("cifar10", tmp_path / "nowhere", "train")
    assert "cifar-10-batches-py" in str(e.value) and "data.download=true" in str(e.value)
    with pytest.raises(D.DataError, match="train_32x32.mat"):
        D.load_split("svhn", tmp_path, "train")


def test_truncated_file_names_file(tmp_path, no_md5):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(D.DataError, match="data_batch_3") as e:
        D.load_split("cifar10", tmp_path, "train", val_size=2)
    assert "data_batch_1" not in str(e.value).split("Fix:")[0]  # only the bad file is blamed
    write_svhn(tmp_path, "test", 3)
    mat = tmp_path / "test_32x32.mat"
    mat.write_bytes(mat.read_bytes()[:500])
    with pytest.raises(D.DataError, match="test_32x32.mat"):
        D.load_ood("svhn", tmp_path)


def test_checksum_mismatch_is_data_error(tmp_path):
    write_cifar10(tmp_path)  # parses fine, but md5 differs from the official files
    with pytest.raises(D.DataError, match="checksum"):
        D.load_split("cifar10", tmp_path, "test")


def test_unknown_names():
    with pytest.raises(D.DataError, match="cifar10, svhn, digits"):
        D.load_split("mnist", "/x", "train")
    with pytest.raises(ValueError, match="digits_ood"):
        D.load_ood("digits", "/x")
    with pytest.raises(ValueError):
        D.load_split("digits", "/x", "holdout")


def test_digits_splits():
    tr, va, te = (D.load_split("digits", "ignored", s) for s in D.SPLITS)
    # Digits 0-7 (8 and 9 are the held-out near-OOD set): 284 of the fixed 360 test images.
    assert (len(tr), len(va), len(te)) == (959, 200, 284)
    for s in (tr, va, te):
        assert s.images.shape[1:] == (3, 32, 32) and s.images.dtype == torch.uint8
        assert s.labels.dtype == torch.int64
        assert s.images[:, 0].equal(s.images[:, 2])  # gray replicated to 3 channels
    assert set(tr.labels.tolist()) == set(range(8)) == set(te.labels.tolist())
    assert tr.images.max() == 255 and tr.images.min() == 0
    # Test set is fixed; train/val move with split_seed but always partition the same pool.
    te2 = D.load_split("digits", "other", "test")
    tr1 = D.load_split("digits", ".", "train", split_seed=1)
    va1 = D.load_split("digits", ".", "val", split_seed=1)
    assert te2.images.equal(te.images)
    assert D.load_split("digits", ".", "val").images.equal(va.images)
    assert not va1.images.equal(va.images)
    pool = torch.cat([tr.images, va.images]).flatten(1).sum(1).sort().values
    assert torch.cat([tr1.images, va1.images]).flatten(1).sum(1).sort().values.equal(pool)
    mean, std = D.channel_stats(torch.cat([tr.images, va.images]))
    assert mean == pytest.approx(D.DATASETS["digits"].mean, abs=1e-5)
    assert std == pytest.approx(D.DATASETS["digits"].std, abs=1e-5)


def test_digits_ood():
    ood = D.load_ood("digits_ood", "ignored")
    assert ood.images.shape == (360, 3, 32, 32) and ood.images.dtype == torch.uint8
    assert (ood.labels == -1).all()
    assert not ood.images[:, 0].equal(ood.images[:, 1])  # colour photos, unlike digits
    assert len(ood.images.flatten(1).unique(dim=0)) == 360
    assert D.DATASETS["digits"].ood_sets == ("digits_heldout", "digits_ood")


def test_held_out_digits_are_every_8_and_9_and_never_trained_on():
    from sklearn.datasets import load_digits

    held = D.load_ood("digits_heldout", "ignored")
    target = load_digits().target
    assert len(held) == int(((target == 8) | (target == 9)).sum()) == 354
    assert (held.labels == -1).all()
    train = {img.numpy().tobytes() for img in D.load_split("digits", ".", "train").images}
    assert not any(img.numpy().tobytes() in train for img in held.images)


def _auroc(pos, neg) -> float:
    """P(pos > neg) + ties / 2, either direction: the best a threshold on this statistic does."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    a = roc_auc_score(y, np.r_[pos, neg])
    return max(a, 1 - a)


def test_the_near_ood_set_is_not_separated_by_trivial_image_statistics():
    # The photo patches are told apart from the gray digits by their colour alone (AUROC 1.0):
    # a test an OOD detector passes without modelling anything. The held-out digits are not.
    test = D.load_split("digits", ".", "test").images.double() / 255
    held = D.load_ood("digits_heldout", ".").images.double() / 255
    far = D.load_ood("digits_ood", ".").images.double() / 255
    stats = {
        "mean colour": lambda x: x.mean((1, 2, 3)),
        "dark fraction": lambda x: (x < 0.1).double().mean((1, 2, 3)),
        "contrast": lambda x: x.std((1, 2, 3)),
        "channel spread": lambda x: (x.amax(1) - x.amin(1)).mean((1, 2)),
    }
    for name, stat in stats.items():
        assert _auroc(stat(test).numpy(), stat(held).numpy()) < 0.9, name
    spread = stats["channel spread"]
    assert _auroc(spread(test).numpy(), spread(far).numpy()) > 0.99


def _all(loader: D.DeviceLoader, epoch: int, start: int = 0):
    return list(loader.epoch(epoch, start_batch=start))


def test_loader_order_is_function_of_seed_and_epoch():
    data = indexed_set()
    a = D.DeviceLoader(data, 8, device="cpu", seed=3, augment=True)
    b = D.DeviceLoader(data, 8, device="cpu", seed=3, augment=True)
    assert len(a) == 6
    ya = torch.cat([y for _, y in _all(a, 2)])
    assert ya.equal(torch.cat([y for _, y in _all(b, 2)]))
    assert all(xa.equal(xb) for (xa, _), (xb, _) in zip(_all(a, 2), _all(b, 2), strict=True))
    assert not ya.equal(torch.cat([y for _, y in _all(a, 3)]))
    other_seed = D.DeviceLoader(data, 8, device="cpu", seed=4, augment=True)
    assert not ya.equal(torch.cat([y for _, y in _all(other_seed, 2)]))
    assert len(ya) == 48 and len(ya.unique()) == 48  # each index at most once
    for x, y in _all(a, 0):
        assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
        assert 0 <= x.min() and x.max() <= 1
    full = D.DeviceLoader(data, 8, device="cpu", seed=3, augment=False, drop_last=False)
    yf = torch.cat([y for _, y in _all(full, 1)])
    assert len(full) == 7 and sorted(yf.tolist()) == list(range(53))
    plain = D.DeviceLoader(data, 8, device="cpu", seed=0, augment=False, shuffle=False)
    assert torch.cat([y for _, y in _all(plain, 5)]).equal(torch.arange(48))


def test_loader_resume_mid_epoch():
    loader = D.DeviceLoader(indexed_set(), 8, device="cpu", seed=1, augment=True)
    full = _all(loader, 4)
    for k in (0, 2, 6):
        part = _all(loader, 4, k)
        assert len(part) == len(full) - k
        assert all(
            x.equal(xf) and y.equal(yf) for (x, y), (xf, yf) in zip(part, full[k:], strict=True)
        )
    with pytest.raises(ValueError):
        loader.epoch(0, start_batch=7)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_reassemble_single_process_batch(drop_last):
    data = indexed_set(51)
    kw = dict(device="cpu", seed=9, augment=True, drop_last=drop_last)
    single = _all(D.DeviceLoader(data, 12, **kw), 1)
    ranks = [_all(D.DeviceLoader(data, 12, rank=r, world_size=3, **kw), 1) for r in range(3)]
    assert all(len(r) == len(single) for r in ranks)
    for b, (x, y) in enumerate(single):
        assert torch.cat([r[b][0] for r in ranks]).equal(x)
        assert torch.cat([r[b][1] for r in ranks]).equal(y)
    assert len(ranks[0][0][1]) == 4
    with pytest.raises(ValueError, match="global_batch_size=10.*world_size=3"):
        D.DeviceLoader(data, 10, world_size=3, **kw)


def test_crop_flip_matches_torchvision():
    data = indexed_set(6)
    offsets = torch.tensor([[0, 0], [8, 8], [0, 8], [3, 5], [8, 0], [4, 4]])
    flips = torch.tensor([False, True, True, False, True, False])
    out = D.crop_flip(data.images, offsets, flips)
    for i in range(6):
        ref = TF.crop(TF.pad(data.images[i], [4]), int(offsets[i, 0]), int(offsets[i, 1]), 32, 32)
        ref = TF.horizontal_flip(ref) if flips[i] else ref
        assert out[i].equal(ref)
    assert D.crop_flip(data.images, torch.full((6, 2), 4), torch.zeros(6, dtype=bool)).equal(
        data.images
    )


@pytest.mark.parametrize("padding", [4, 2])
def test_crop_windows_equal_crop_flip_for_every_offset_and_flip(padding):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    crops = D.CropWindows(images, padding=padding)
    side = 2 * padding + 1
    dy, dx, flip = torch.meshgrid(
        torch.arange(side), torch.arange(side), torch.arange(2), indexing="ij"
    )
    offsets = torch.stack([dy.reshape(-1), dx.reshape(-1)], 1)
    flips = flip.reshape(-1).bool()
    for i in range(5):  # the last image at the largest offset reads the buffer's last byte
        idx = torch.full((len(flips),), i)
        expect = D.crop_flip(images[idx], offsets, flips, padding=padding)
        assert crops(idx, offsets, flips).equal(expect)
    # A shuffled batch with repeats, as the loader draws them.
    idx = torch.randint(0, 5, (64,), generator=g)
    offsets = torch.randint(0, side, (64, 2), generator=g)
    flips = torch.randint(0, 2, (64,), generator=g).bool()
    out = crops(idx, offsets, flips)
    assert out.is_contiguous() and out.dtype == torch.uint8
    assert out.equal(D.crop_flip(images[idx], offsets, flips, padding=padding))


def test_loader_augmentation_wiring_and_plain_pixels():
    data = indexed_set()
    plain = D.DeviceLoader(data, 8, device="cpu", seed=5, augment=False)
    aug = D.DeviceLoader(data, 8, device="cpu", seed=5, augment=True)
    for b, ((xp, yp), (xa, ya)) in enumerate(zip(_all(plain, 2), _all(aug, 2), strict=True)):
        assert yp.equal(ya)  # augmentation does not change the order
        assert xp.mul(255).round().to(torch.uint8).equal(data.images[yp])  # exact pixels
        offsets, flips = D.augmentation_params(5, 2, b, 8)
        assert offsets.min() >= 0 and offsets.max() <= 8
        expect = D.crop_flip(data.images[ya], offsets, flips).float() / 255
        assert xa.equal(expect)


def test_iterate_batches_are_fixed_blocks_of_the_set():
    data = indexed_set(23)
    batches = list(D.iterate_batches(data, 5, device="cpu", start=5, stop=23))
    idx = torch.cat([i for i, _, _ in batches])
    assert idx.equal(torch.arange(5, 23)) and [len(i) for i, _, _ in batches] == [5, 5, 5, 3]
    for i, x, y in batches:
        assert y.equal(i) and x.equal(data.images[i].float() / 255)
    # A range that would put an image in a batch with other neighbours is refused.
    for start, stop in [(3, 10), (5, 12)]:
        with pytest.raises(ValueError, match="not a union of whole evaluation blocks of 5"):
            list(D.iterate_batches(data, 5, device="cpu", start=start, stop=stop))
    assert torch.cat([i for i, _, _ in D.iterate_batches(data, 10, device="cpu")]).equal(
        torch.arange(23)
    )
    assert list(D.iterate_batches(data, 4, device="cpu", start=23)) == []
