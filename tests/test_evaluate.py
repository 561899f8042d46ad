"""Evaluation shards: FGSM by hand, shard-split invariance, atomic writes, schema per model kind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dhm import results
from dhm.attacks import fgsm_predictions
from dhm.evaluate import ShardSpec, eval_sets, evaluate_all, plan_shards
from dhm.train import train
from tests.conftest import small_config

REPO = Path(__file__).resolve().parents[1]


def test_fgsm_on_a_linear_model_matches_a_hand_computation():
    # logits = W x (x flattened, 2 pixels), labels 0. d CE / dx = W^T (softmax - onehot).
    w = torch.tensor([[1.0, -2.0], [-1.0, 1.0]])
    x = torch.tensor([[0.5, 0.5], [0.1, 0.95]])
    y = torch.tensor([0, 0])

    def classify(inp):
        return inp @ w.T

    # Image 0: logits (-0.5, 0); p = softmax; grad = W^T (p - e0), sign by hand below.
    p0 = torch.softmax(torch.tensor([-0.5, 0.0]), 0)
    g0 = w.T @ (p0 - torch.tensor([1.0, 0.0]))
    assert torch.equal(g0.sign(), torch.tensor([-1.0, 1.0]))
    # eps 0.1: x0 -> (0.4, 0.6): logits (0.4 - 1.2, -0.4 + 0.6) = (-0.8, 0.2) -> class 1.
    # Image 1 at (0.1, 0.95): grad sign is also (-1, +1); eps 0.1 -> (0.0, 1.0) after clamping
    # (1.05 clamps to 1): logits (-2, 1) -> class 1; eps 0 -> logits (-1.8, 0.85) -> class 1.
    preds = fgsm_predictions(classify, x, y, [0.0, 0.1, 0.3])
    assert preds.tolist() == [[1, 1], [1, 1], [1, 1]]
    # A point the attack flips: logits (0.3, 0) at eps 0 -> class 0; at eps 0.1 -> class 1.
    x2 = torch.tensor([[0.7, 0.2]])  # logits (0.7 - 0.4, -0.7 + 0.2) = (0.3, -0.5)
    preds2 = fgsm_predictions(classify, x2, torch.tensor([0]), [0.0, 0.1, 0.5])
    # eps 0.1 -> (0.6, 0.3): logits (0.0, -0.3) -> 0; eps 0.5 -> (0.2, 0.7): (-1.2, 0.5) -> 1.
    assert preds2.tolist() == [[0], [0], [1]]


def test_fgsm_uses_one_gradient_and_one_forward_per_nonzero_epsilon():
    calls = {"n": 0}
    lin = torch.nn.Linear(12, 3)

    def classify(inp):
        calls["n"] += 1
        return lin(inp.flatten(1))

    fgsm_predictions(classify, torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]), [0, 0.1, 0.2])
    assert calls["n"] == 3  # clean (with gradient) + two non-zero epsilons


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dhm trained for one epoch, with its run config."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    cfg = small_config(
        run_dir, **{"train.epochs": 1, "eval.iwae_k": [1, 3], "eval.max_images": 150}
    )
    return cfg, train(cfg)


@pytest.mark.slow
def test_shard_split_does_not_change_the_union(trained, tmp_path):
    cfg, ckpt = trained
    merged = {}
    for shard_size in (0, 40):
        local = cfg.copy()
        local.run_dir = str(tmp_path / f"split{shard_size}")
        local.eval.shard_size = shard_size
        local.eval.batch_size = 32  # batches straddle shard edges
        paths = evaluate_all(local, ckpt)
        assert len(paths) == (2 if shard_size == 0 else 2 * 4)
        merged[shard_size] = results.load_run(Path(local.run_dir) / "eval")
    whole, split = merged[0], merged[40]
    assert whole.keys() == split.keys() == {"digits", "digits_ood"}
    for name in whole:
        assert whole[name].arrays.keys() == split[name].arrays.keys()
        for key, value in whole[name].arrays.items():
            np.testing.assert_array_equal(value, split[name].arrays[key], err_msg=f"{name}/{key}")


@pytest.mark.slow
def test_shard_contents_and_provenance(trained):
    cfg, ckpt = trained
    paths = evaluate_all(cfg, ckpt, run_id="r1")
    sets = results.load_run(Path(cfg.run_dir) / "eval")
    digits = sets["digits"].arrays
    assert digits["logits"].shape == (150, 10) and digits["logits"].dtype == np.float32
    assert digits["neg_elbo"].shape == digits["neg_iwae_k3"].shape == (150,)
    assert digits["fgsm/pred"].shape == (len(cfg.eval.fgsm_eps), 150)
    # eps = 0 is the clean prediction.
    np.testing.assert_array_equal(digits["fgsm/pred"][0], digits["logits"].argmax(1))
    # IWAE with more samples is a tighter bound on average.
    assert digits["neg_iwae_k3"].mean() <= digits["neg_iwae_k1"].mean()
    assert (
        "labels" not in sets["digits_ood"].arrays and "fgsm/pred" not in sets["digits_ood"].arrays
    )
    with h5py.File(paths[0]) as f:
        assert f.attrs["run_id"] == "r1" and f.attrs["role"] == "id"
        assert len(f.attrs["checkpoint_sha256"]) == 64
        assert "model:" in f.attrs["config_yaml"] and f.attrs["git_commit"]
        assert f.attrs["num_dims"] == 3 * 32 * 32
    # Evaluating again keeps the complete files.
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert [p.stat().st_mtime_ns for p in evaluate_all(cfg, ckpt, run_id="r1")] == mtimes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet", "vae"])
def test_schema_follows_the_model_kind(tmp_path, kind):
    alpha, beta = (1.0, 0.0) if kind == "resnet" else (0.0, 1.0)
    overrides = {"model.name": kind, "model.alpha": alpha, "model.beta": beta,
                 "train.epochs": 1, "eval.max_images": 60}  # fmt: skip
    cfg = small_config(tmp_path / kind, **overrides)
    evaluate_all(cfg, train(cfg))
    arrays = results.load_run(tmp_path / kind / "eval")["digits"].arrays
    if kind == "resnet":
        assert "logits" in arrays and "fgsm/pred" in arrays and "neg_elbo" not in arrays
    else:
        assert "neg_elbo" in arrays and "logits" not in arrays and "fgsm/pred" not in arrays


def test_plan_shards_cover_each_set_once(small_cfg):
    cfg = small_cfg(**{"eval.shard_size": 100})
    shards = plan_shards(cfg, "digits", "id", 360)
    assert [(s.start, s.stop) for s in shards] == [(0, 100), (100, 200), (200, 300), (300, 360)]
    assert eval_sets(cfg) == [("digits", "id"), ("digits_ood", "ood")]
    assert ShardSpec("svhn", "ood", 0, 10, 10).filename == "svhn__0000000-0000010.h5"


_SLOW_WRITER = """
import sys, time
import numpy as np
from dhm import results

class Slow:
    def __array__(self, dtype=None, copy=None):
        time.sleep(60)
        return np.zeros(3)

results.write_shard(sys.argv[1], "digits", {"indices": np.arange(3), "logits": Slow()},
                    {"role": "id", "set_size": 3, "start": 0, "stop": 3})
"""


def test_a_killed_writer_leaves_no_file_under_the_final_name(tmp_path):
    final = tmp_path / "eval" / "digits__0000000-0000003.h5"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(final)], cwd=REPO)
    deadline = time.time() + 60
    while not list((tmp_path / "eval").glob(".*.tmp")) and time.time() < deadline:
        time.sleep(0.1)
    assert list((tmp_path / "eval").glob(".*.tmp")), "the writer never started its temporary file"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not final.exists()
    with pytest.raises(results.ShardError, match="no shard files"):
        results.load_run(tmp_path / "eval")


def test_a_truncated_shard_is_named(tmp_path):
    path = results.write_shard(
        tmp_path / "digits__0000000-0000004.h5", "digits",
        {"indices": np.arange(4), "logits": np.zeros((4, 10), np.float32)},
        {"role": "id", "set_size": 4, "start": 0, "stop": 4},
    )  # fmt: skip
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(results.ShardError, match="digits__0000000-0000004.h5: unreadable"):
        results.load_run(tmp_path)


def test_a_gap_between_shards_is_named(tmp_path):
    for start, stop in [(0, 2), (3, 4)]:
        results.write_shard(
            tmp_path / results.shard_name("digits", start, stop), "digits",
            {"indices": np.arange(start, stop)},
            {"role": "id", "set_size": 4, "start": start, "stop": stop},
        )  # fmt: skip
    with pytest.raises(results.ShardGapError, match=r"images \[2, 3\) have no shard"):
        results.load_run(tmp_path)
    shards = [results.read_shard(p) for p in sorted(tmp_path.glob("*.h5"))]
    with pytest.raises(results.ShardGapError, match=r"images \[2, 4\) have no shard"):
        results.merge_shards(shards[:1])  # the tail of the set is uncovered


def test_overlapping_shards_are_corrupt_not_a_gap(tmp_path):
    for start, stop in [(0, 4), (0, 2), (2, 4)]:  # an old whole-set shard beside a new split
        results.write_shard(
            tmp_path / results.shard_name("digits", start, stop), "digits",
            {"indices": np.arange(start, stop)},
            {"role": "id", "set_size": 4, "start": start, "stop": stop},
        )  # fmt: skip
    with pytest.raises(results.ShardError, match="shards overlap") as info:
        results.load_run(tmp_path)
    assert not isinstance(info.value, results.ShardGapError)


_GOOD_ATTRS = {"schema_version": results.SCHEMA_VERSION, "set": "digits", "role": "id",
               "set_size": 4, "start": 0, "stop": 4}  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stop": None}, "attribute stop is missing, not an integer"),
        ({"set_size": None}, "attribute set_size is missing, not an integer"),
        ({"start": "0"}, "attribute start is '0'"),
        ({"stop": 2.5}, "attribute stop is 2.5"),
        ({"role": None}, "attribute role is 'missing'"),
        ({"role": "train"}, "attribute role is 'train'"),
        ({"set": None}, "attribute set is missing"),
        ({"set": "svhn"}, "attribute set is 'svhn', which names no group"),
        ({"stop": 6, "set_size": 4}, r"range \[0, 6\) is not within set_size 4"),
    ],
)
def test_a_missing_or_malformed_attribute_is_named(tmp_path, change, message):
    path = tmp_path / "digits__0000000-0000004.h5"
    with h5py.File(path, "w") as f:  # written directly: write_shard would refuse some of these
        for key, value in {**_GOOD_ATTRS, **change}.items():
            if value is not None:
                f.attrs[key] = value
        f["digits/indices"] = np.arange(4)
    with pytest.raises(results.ShardError, match=f"{path.name}: {message}"):
        results.read_shard(path)
    with pytest.raises(results.ShardError, match=path.name):
        results.load_run(tmp_path)


def test_read_shard_matches_h5py(tmp_path):
    """read_shard's low-level reader gives what h5py.File gives, for every attribute type."""
    rng = np.random.default_rng(0)
    arrays = {
        "indices": np.arange(5000),
        "logits": rng.normal(size=(5000, 10)).astype(np.float32),
        "neg_elbo": rng.normal(size=5000).astype(np.float32),
        "fgsm/eps": np.float32([0, 0.1]),
        "fgsm/pred": np.zeros((2, 5000), np.int16),
    }
    attrs = {"role": "id", "set_size": 5000, "start": 0, "stop": 5000, "model": "dhm",
             "config_yaml": "model:\n  name: dhé\n", "num_dims": np.int32(3072), "alpha": 0.5,
             "versions": {"h5py": "3"}, "shape": np.arange(3), "flag": True}  # fmt: skip
    path = results.write_shard(tmp_path / "digits__0000000-0005000.h5", "digits", arrays, attrs)
    with h5py.File(path, "r") as f:
        want = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    shard = results.read_shard(path)
    assert shard.attrs.keys() == want.keys()
    for key, value in want.items():
        assert type(shard.attrs[key]) is type(value), key
        np.testing.assert_array_equal(shard.attrs[key], value, err_msg=key)
    assert shard.arrays.keys() == arrays.keys()
    for key, value in arrays.items():
        assert shard.arrays[key].dtype == value.dtype, key
        np.testing.assert_array_equal(shard.arrays[key], value, err_msg=key)
    few = results.read_shard(path, ["model"])  # only the checked attributes and those asked for
    assert set(few.attrs) == {*results.REQUIRED_ATTRS, "model"}
    assert results.read_attrs(path, ["config_yaml", "absent"]) == {
        "config_yaml": want["config_yaml"]
    }
