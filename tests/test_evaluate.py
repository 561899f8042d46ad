"""Evaluation shards: FGSM by hand, shard-split invariance, atomic writes, schema per model kind."""

from __future__ import annotations

import json
import math
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

from dhm.core.config import to_yaml
from dhm.data import loaders as data_lib
from dhm.evaluation import evaluate as ev
from dhm.evaluation import results
from dhm.evaluation.attacks import fgsm_predictions
from dhm.evaluation.evaluate import (
    ShardSpec,
    _bounds,
    _set_eval_sigma,
    eval_sets,
    evaluate_all,
    evaluate_set,
    load_model,
    plan_shards,
)
from dhm.model import checkpoint as model_ckpt
from dhm.model.nets import ResNetDecoder
from dhm.summary import metrics as M
from dhm.training import validation as val_lib
from dhm.training.train import model_for, train
from tests.helpers.configs import small_config

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
        run_dir,
        **{
            "train.epochs": 1,
            "eval.iwae_k": [1, 3],
            "eval.max_images": 150,
            "eval.fgsm_eps": [0.0, 0.02, 0.05],
            "eval.pgd_steps": 3,
        },
    )
    return cfg, train(cfg)


@pytest.mark.slow
def test_shard_split_does_not_change_the_union(trained, tmp_path):
    cfg, ckpt = trained
    merged = {}
    # Bitwise by construction: a batch is a fixed block of 32 images of the set and a shard a
    # union of whole blocks, so every image meets the same neighbours (and kernels) either way.
    for shard_size in (0, 64):
        local = cfg.copy()
        local.run_dir = str(tmp_path / f"split{shard_size}")
        local.eval.shard_size = shard_size
        local.eval.batch_size = 32
        paths = evaluate_all(local, ckpt)
        # 4 sets' scores and the test set's attacks; 150 images: 3 shards a part
        assert len(paths) == (5 if shard_size == 0 else 5 * 3)
        merged[shard_size] = results.load_run(Path(local.run_dir) / "eval")
    whole, split = merged[0], merged[64]
    assert whole.keys() == split.keys() == {"digits", "digits-val", "digits_heldout", "digits_ood"}
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
    assert digits["logits"].shape == (150, 8) and digits["logits"].dtype == np.float32
    assert digits["neg_elbo"].shape == digits["neg_iwae_k3"].shape == (150,)
    assert digits["fgsm/pred"].shape == (len(cfg.eval.fgsm_eps), 150)
    # eps = 0 is the clean prediction.
    np.testing.assert_array_equal(digits["fgsm/pred"][0], digits["logits"].argmax(1))
    # IWAE with more samples is a tighter bound on average.
    assert digits["neg_iwae_k3"].mean() <= digits["neg_iwae_k1"].mean()
    assert (digits["iwae_ess"] >= 1 - 1e-5).all() and (digits["iwae_ess"] <= 3 + 1e-5).all()
    # PGD is never weaker than FGSM: an image it leaves correct, FGSM left correct too.
    for e in range(3):
        pgd_ok = digits["pgd/pred"][e] == digits["labels"]
        fgsm_ok = digits["fgsm/pred"][e] == digits["labels"]
        assert not (pgd_ok & ~fgsm_ok).any()
    np.testing.assert_array_equal(digits["pgd/pred"][0], digits["logits"].argmax(1))
    assert (
        digits["images/recon"].shape == (16, 3, 32, 32)
        and digits["images/samples"].dtype == np.uint8
    )
    assert (digits["complexity_bits"] > 0).all()
    val = sets["digits-val"].arrays
    assert set(val) == {"indices", "labels", "logits"} and sets["digits-val"].role == "val"
    ood = sets["digits_ood"].arrays
    assert "labels" not in ood and "fgsm/pred" not in ood and "neg_elbo" in ood
    with h5py.File(paths[0]) as f:
        assert f.attrs["run_id"] == "r1" and f.attrs["role"] == "id"
        assert len(f.attrs["checkpoint_sha256"]) == 64
        assert "model:" in f.attrs["config_yaml"] and f.attrs["git_commit"]
        assert f.attrs["num_dims"] == 3 * 32 * 32
        assert (
            f.attrs["likelihood_space"] == "pixels-dequantized" and f.attrs["pixel_levels"] == 255
        )
        # Trained with the default learned sigma: the headline bounds use the sigma fitted on
        # the validation split, and the trained sigma's bounds sit beside them.
        assert (
            f.attrs["sigma_source"].startswith("fitted on") and f.attrs["bound_sigma"] == "fitted"
        )
        assert len(json.loads(f.attrs["sigma"])) == len(json.loads(f.attrs["trained_sigma"])) == 1
    assert digits["trained_neg_elbo"].shape == digits["trained_neg_iwae_k3"].shape == (150,)
    assert "trained_neg_elbo" in ood and "trained_neg_elbo" not in val
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
        assert (tmp_path / kind / "eval").glob("digits-val__*.h5")
    else:
        assert "neg_elbo" in arrays and "logits" not in arrays and "fgsm/pred" not in arrays
        assert not list((tmp_path / kind / "eval").glob("digits-val__*.h5"))  # no classifier


def test_plan_shards_cover_each_set_once(small_cfg):
    cfg = small_cfg(**{"eval.shard_size": 100})
    shards = plan_shards(cfg, "digits", "id", 360)
    assert [(s.start, s.stop) for s in shards] == [(0, 100), (100, 200), (200, 300), (300, 360)]
    assert eval_sets(cfg) == [
        ("digits", "id"),
        ("digits-val", "val"),
        ("digits_heldout", "ood"),
        ("digits_ood", "ood"),
    ]
    assert ShardSpec("svhn", "ood", 0, 10, 10).filename == "svhn__0000000-0000010.h5"


_SLOW_WRITER = """
import sys, time
import numpy as np
from dhm.evaluation import results

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


def _attack_model():
    torch.manual_seed(3)
    from dhm.model.hybrid import DeepHybridModel

    model = DeepHybridModel("dhm", num_classes=8, width=4, latent_dim=6).eval()

    class Logits(torch.nn.Module):  # what torchattacks attacks: pixels in [0, 1] -> logits
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.classify(x)

    x = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        y = model.classify(x).argmax(1)  # clean accuracy 1: every failure is the attack's
    return Logits().eval(), x, y


def test_fgsm_and_pgd_agree_with_torchattacks():
    # An implementation nobody here wrote. FGSM is deterministic: the same images flip.
    # PGD (from x, no random start, same step): torchattacks reports its final iterate; ours
    # counts an image broken at any iterate (or under FGSM), so it breaks at least those.
    import torchattacks

    from dhm.evaluation.attacks import pgd_predictions

    net, x, y = _attack_model()
    for eps in (0.01, 0.03, 8 / 255):
        theirs = net(torchattacks.FGSM(net, eps=eps)(x, y)).argmax(1)
        ours = fgsm_predictions(net, x, y, [eps])[0]
        assert torch.equal(ours, theirs), eps
        alpha, steps = eps / 4, 5
        adv = torchattacks.PGD(net, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        theirs_wrong = net(adv).argmax(1) != y
        ours = pgd_predictions(net, x, y, [eps], steps, alpha, random_start=False)[0]
        assert not (theirs_wrong & (ours == y)).any(), eps
        assert (ours != y).float().mean() >= theirs_wrong.float().mean()


def test_pgd_is_never_weaker_than_fgsm_and_its_start_is_seeded():
    from dhm.evaluation.attacks import pgd_predictions

    net, x, y = _attack_model()
    eps = [0.0, 0.01, 0.03]
    fgsm = fgsm_predictions(net, x, y, eps)
    pgd = pgd_predictions(net, x, y, eps, 3, seed=7, fgsm_pred=fgsm)
    assert ((pgd == y) <= (fgsm == y)).all()  # correct under PGD => correct under FGSM
    assert torch.equal(pgd[0], y)  # eps 0: the clean prediction
    again = pgd_predictions(net, x, y, eps, 3, seed=7, fgsm_pred=fgsm)
    assert torch.equal(pgd, again)


def test_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    # Collaborators on a shared project folder must be able to read the results.
    from dhm.core.fsutil import atomic_write_text

    old = os.umask(0o027)
    try:
        shard = results.write_shard(
            tmp_path / "digits__0000000-0000002.h5",
            "digits",
            {"indices": np.arange(2)},
            {"role": "id", "set_size": 2, "start": 0, "stop": 2},
        )
        ckpt = model_ckpt.atomic_save({"model": {}, "config_yaml": ""}, tmp_path / "final.pt")
        text = atomic_write_text(tmp_path / "plan.json", "{}")
    finally:
        os.umask(old)
    for path in (shard, ckpt, text):
        assert path.stat().st_mode & 0o777 == 0o640, path
    os.umask(0o002)
    try:
        again = atomic_write_text(tmp_path / "other.json", "{}")
    finally:
        os.umask(old)
    assert again.stat().st_mode & 0o777 == 0o664


@pytest.mark.slow
def test_the_fitted_sigma_bound_is_at_least_the_trained_one_where_it_was_fitted(trained):
    # The closed-form sigma maximises the ELBO summed over the images it was fitted on, for
    # that noise: so on the validation images, with their one sample each (the noise
    # validation_pass drew) and a global sigma, the fitted-sigma ELBO is at least the
    # trained-sigma one. Both from _bounds, evaluation's own function.

    cfg, ckpt = trained
    model, train_cfg, stored = load_model(ckpt, torch.device("cpu"))
    assert model.log_sigma.requires_grad and model.log_sigma.ndim == 0  # learned, global
    val = val_lib.validation_set(train_cfg, None)
    stats = val_lib.validation_pass(model, val, 100, torch.device("cpu"), seed=7)
    fitted, trained_ls = stats.fitted_log_sigma(), model.log_sigma.detach().clone()
    assert abs(fitted - float(trained_ls)) > 1e-3  # the comparison is not between equals
    with torch.no_grad():
        model.log_sigma.fill_(fitted)
    elbo_fitted = elbo_trained = 0.0
    for block, (_, x, _) in enumerate(data_lib.iterate_batches(val, 100, device="cpu")):
        eps = val_lib.block_noise(7, block, (1, x.shape[0], model.fc_mu.out_features))
        with torch.no_grad():
            found = _bounds(model, x, eps, [1], None, trained_ls)
        elbo_fitted -= found["neg_elbo"].double().sum().item()
        elbo_trained -= found["trained_neg_elbo"].double().sum().item()
    assert elbo_fitted >= elbo_trained
    # The fit stored in final.pt at the end of training is the same closed form.
    assert stored["eval_sigma_source"].startswith("fitted on")


@pytest.mark.slow
def test_a_constant_decoder_scores_the_hand_computed_bits_per_dim_on_uniform_noise(
    tmp_path, monkeypatch
):
    # A VAE whose decoder predicts 0.5 for every pixel and whose posterior is the prior (KL 0),
    # evaluated through evaluate() with its sigma fitted on (noise) validation images. Uniform
    # 8-bit noise, dequantized, is uniform on an interval of width 256/255 (variance
    # ~1/12): the Gaussian of that variance costs 0.5 ln(2 pi e / 12) nats a dimension, so
    # bits/dim = log2(255) + 0.5 log2(2 pi e / 12) = 8.249 (+ log2(256/255) = 0.0056 for the
    # interval's extra level). Tolerance 0.01 bits: that term plus the sampling error of a
    # fit over 200 x 3072 values (relative sd of a variance estimate ~ 0.1%).

    hand = math.log2(255) + 0.5 * math.log2(2 * math.pi * math.e / 12)
    assert abs(hand - 8.249) < 1e-3
    cfg = small_config(
        tmp_path / "run",
        **{"model.name": "vae", "model.alpha": 0.0, "model.sigma": "fixed", "eval.iwae_k": [2]},
    )
    model = model_for(cfg)
    with torch.no_grad():  # q(z|x) = N(0, I), the prior: KL 0
        for layer in (model.fc_mu, model.fc_logvar):
            layer.weight.zero_()
            layer.bias.zero_()
    # The decoder's last conv has no bias: make the decoder itself predict 0.5.
    monkeypatch.setattr(
        ResNetDecoder, "forward", lambda self, z: torch.full((z.shape[0], 3, 32, 32), 0.5)
    )
    ckpt = tmp_path / "final.pt"
    model_ckpt.atomic_save({"model": model.state_dict(), "config_yaml": to_yaml(cfg)}, ckpt)
    g = torch.Generator().manual_seed(0)
    noise = data_lib.ImageSet(
        "digits", torch.randint(0, 256, (200, 3, 32, 32), generator=g, dtype=torch.uint8),
        torch.zeros(200, dtype=torch.int64),
    )  # fmt: skip
    monkeypatch.setattr(data_lib, "load_split", lambda *a, **k: noise)
    path = ev.evaluate(cfg, ckpt, ev.ShardSpec("digits", "id", 0, 200, 200))
    shard = results.read_shard(path)
    assert shard.attrs["bound_sigma"] == "fitted"
    sigma = json.loads(shard.attrs["sigma"])[0]
    assert abs(sigma - math.sqrt(1 / 12)) < 0.01
    bpd = M.bits_per_dim(float(np.mean(shard.arrays["neg_elbo"], dtype=np.float64)), 3072)
    assert abs(bpd - hand) < 0.01
    assert bpd < 8.0 + 0.3  # and no better than uniform (8.0) by more than the Gaussian's cost


@pytest.mark.slow
def test_a_channel_sigma_evaluates_with_its_trained_bound_beside(tmp_path):
    # A per-channel learned sigma ([C] -> [C, 1, 1] against [k*B, C, H, W]): evaluation writes
    # both bounds, and with the trained sigma set equal to the fitted one they agree exactly.

    cfg = small_config(
        tmp_path / "run",
        **{"train.epochs": 1, "model.sigma": "channel", "eval.max_images": 60,
           "eval.fgsm_eps": [0.0], "eval.pgd_steps": 0},
    )  # fmt: skip
    ckpt = train(cfg)
    paths = evaluate_all(cfg, ckpt)
    digits = results.load_run(Path(cfg.run_dir) / "eval")["digits"]
    assert np.isfinite(digits.arrays["trained_neg_elbo"]).all()
    with h5py.File(paths[0]) as f:
        assert len(json.loads(f.attrs["trained_sigma"])) == 3 and f.attrs["bound_sigma"] == "fitted"
    model, train_cfg, stored = load_model(ckpt, torch.device("cpu"))
    _set_eval_sigma(model, cfg, train_cfg, stored)
    x = data_lib.load_split("digits", None, "test").images[:20].float() / 255
    eps = torch.randn(2, 20, model.fc_mu.out_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        found = _bounds(model, x, eps, [2], None, model.observation_log_sigma().clone())
    assert torch.equal(found["neg_elbo"], found["trained_neg_elbo"])
    assert torch.equal(found["neg_iwae_k2"], found["trained_neg_iwae_k2"])


@pytest.mark.slow
def test_a_learned_sigma_checkpoint_from_before_the_fit_evaluates_as_it_did(trained, tmp_path):
    # final.pt from before 2026-12-07: a learned sigma, no eval_log_sigma. Its shards already
    # on disk used the trained sigma; new ones must agree with them (no mixed bounds in a run).

    cfg, ckpt = trained
    state = model_ckpt.load(ckpt)
    state.pop("eval_log_sigma")
    state["eval_sigma_source"] = "learned"
    old = tmp_path / "old.pt"
    model_ckpt.atomic_save(state, old)
    local = cfg.copy()
    local.run_dir = str(tmp_path / "old-run")
    path = evaluate_set(local, old, "digits_ood", "ood")[0]
    shard = results.read_shard(path)
    assert (
        shard.attrs["bound_sigma"] == "trained" and json.loads(shard.attrs["trained_sigma"]) == []
    )
    assert "trained_neg_elbo" not in shard.arrays
    sigma = json.loads(shard.attrs["sigma"])[0]
    assert sigma == pytest.approx(float(torch.exp(state["model"]["log_sigma"])), rel=1e-6)
