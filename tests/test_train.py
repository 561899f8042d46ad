"""Training on digits: the loss falls, resume is exact, DDP ranks agree, bad input is refused."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dhm.train as train_mod
from dhm import checkpoint as ckpt_io
from dhm.config import ConfigError
from dhm.data import DataError
from dhm.train import NonFiniteLossError, train
from tests.conftest import free_port, small_config

REPO = Path(__file__).resolve().parents[1]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.load(path)["model"]


@pytest.mark.slow
def test_short_training_on_digits_lowers_the_loss(small_cfg):
    cfg = small_cfg(**{"train.epochs": 3})
    final = train(cfg)
    rows = _rows(Path(cfg.run_dir))
    first = [float(r["loss"]) for r in rows[:3]]
    last = [float(r["loss"]) for r in rows[-3:]]
    assert sum(last) < 0.6 * sum(first)
    assert float(rows[-1]["ce"]) < float(rows[0]["ce"])
    assert int(rows[-1]["step"]) == 3 * (1200 // 50)
    assert final.name == "final.pt" and (Path(cfg.run_dir) / "config.yaml").exists()
    assert list((Path(cfg.run_dir) / "logs" / "tensorboard").iterdir())
    # Only the newest train.keep_checkpoints step checkpoints are kept.
    assert len(ckpt_io.step_checkpoints(final.parent)) == 2
    # Training again finds final.pt and returns it without touching it.
    mtime = final.stat().st_mtime_ns
    assert train(cfg) == final and final.stat().st_mtime_ns == mtime


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {"model.name": "dhm", "model.vae_split_layer": 2},
        {"model.name": "dhm", "model.importance_num": 3, "model.vae_split_layer": 4},
    ],
    ids=["dhm-split2", "iwae3-split4"],
)
def test_resume_after_a_mid_epoch_crash_is_bit_identical(tmp_path, monkeypatch, overrides):
    base = {"train.epochs": 2, "train.checkpoint_every_steps": 5, "train.keep_checkpoints": 1}
    base.update(overrides)
    straight = train(small_config(tmp_path / "straight", **base))

    # Crash in the middle of epoch 1 (24 steps per epoch), after a step that no checkpoint holds.
    crashed_cfg = small_config(tmp_path / "crashed", **base)
    real_loss, calls = train_mod.hybrid_loss, {"n": 0}

    def crashing_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 33:
            raise KeyboardInterrupt("simulated kill at step 32")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_mod, "hybrid_loss", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        train(crashed_cfg)
    monkeypatch.setattr(train_mod, "hybrid_loss", real_loss)
    ckpt_dir = Path(crashed_cfg.run_dir) / "checkpoints"
    assert [step for step, _ in ckpt_io.step_checkpoints(ckpt_dir)] == [30]
    assert not (ckpt_dir / "final.pt").exists()

    resumed = train(crashed_cfg)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The metrics log has each step once, the redone ones included.
    steps = [int(r["step"]) for r in _rows(Path(crashed_cfg.run_dir))]
    assert steps == sorted(set(steps)) and steps[-1] == 48


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,split", [("dhm", 0), ("dhm", 1), ("dhm", 3), ("vae", 0), ("zmodel", 0)]
)
def test_every_model_kind_and_split_trains(small_cfg, kind, split):
    alpha = 0.0 if kind == "vae" else 1.0
    cfg = small_cfg(
        **{
            "model.name": kind,
            "model.vae_split_layer": split,
            "model.alpha": alpha,
            "model.beta": 1e-3,
            "train.epochs": 1,
        }
    )
    state = ckpt_io.load(train(cfg))
    assert state["global_step"] == 24
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_compiled_training_on_cpu_saves_plain_weights_that_evaluate(small_cfg):
    # train.compile=true (torch.compile; inductor on CPU, ~1.5 min here): the GPU fast path's
    # option, on the same code path. The checkpoint holds the unwrapped module's weights.
    from dhm.evaluate import evaluate_all
    from dhm.model import build_model

    cfg = small_cfg(**{"train.compile": True, "train.epochs": 1, "train.batch_size": 100})
    final = train(cfg)
    state = ckpt_io.load(final)
    eager = build_model(cfg.model, 10, (0.5,) * 3, (0.25,) * 3)
    assert set(state["model"]) == set(eager.state_dict())  # no "_orig_mod." prefixes
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    loss = [float(r["loss"]) for r in _rows(Path(cfg.run_dir))]
    assert len(loss) >= 2 and loss[-1] < loss[0]
    assert evaluate_all(cfg, final)


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(small_cfg):
    cfg = small_cfg(**{"train.debug_nan_at_step": 7, "train.checkpoint_every_steps": 5})
    with pytest.raises(NonFiniteLossError, match=r"step 7 \(epoch 0, batch 7\).*ce=.*kl="):
        train(cfg)
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    assert [s for s, _ in ckpt_io.step_checkpoints(ckpt_dir)] == [5]
    assert not (ckpt_dir / "final.pt").exists()


def test_non_finite_loss_found_at_a_log_step_names_the_step_it_happened(small_cfg):
    # The check is deferred (no host sync per step): here the first look is at the end of the
    # epoch, and the error still names step 7 and its terms; nothing is saved after it.
    cfg = small_cfg(**{"train.debug_nan_at_step": 7, "train.checkpoint_every_steps": 0,
                       "train.log_every_steps": 1000, "train.epochs": 1})  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"step 7 \(epoch 0, batch 7\).*loss=nan"):
        train(cfg)
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    assert not ckpt_dir.exists() or not list(ckpt_dir.iterdir())


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


def _host_reads_in_dhm(monkeypatch) -> list[str]:
    """Record 'file:line' of every tensor-to-host read made by code under dhm/."""
    calls: list[str] = []
    dhm_dir = str(REPO / "dhm")

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(dhm_dir):
                calls.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in HOST_READS:
        wrap(name)
    return calls


def test_training_reads_the_device_only_at_log_and_checkpoint_steps(tmp_path, monkeypatch):
    # On a GPU each read is a sync that stalls the queue; their number must not grow with the
    # number of steps. 24 and 48 steps, one log + checkpoint (the epoch end) each.
    reads = {}
    for batch in (50, 25):
        cfg = small_config(tmp_path / f"b{batch}", **{
            "train.batch_size": batch, "train.epochs": 1, "train.checkpoint_every_steps": 0,
            "train.log_every_steps": 1000,
        })  # fmt: skip
        calls = _host_reads_in_dhm(monkeypatch)
        train(cfg)
        monkeypatch.undo()
        reads[batch] = calls
    assert reads[50] and len(reads[50]) == len(reads[25]), reads


def test_loader_copies_to_the_device_once_per_epoch(monkeypatch):
    from dhm.data import DeviceLoader
    from tests.test_data import _indexed

    loader = DeviceLoader(_indexed(64), 8, device="cpu", seed=0, augment=True)
    batches = loader.epoch(0)
    next(batches)  # the epoch's indices and windows are prepared here
    moves = []
    original = torch.Tensor.to
    monkeypatch.setattr(
        torch.Tensor, "to", lambda self, *a, **k: moves.append(a) or original(self, *a, **k)
    )
    rest = list(batches)
    assert len(rest) == 7 and moves == []


def test_the_optimizer_steps_exactly_as_the_reference_adam(small_cfg):
    # make_optimizer's multi-tensor Adam must give the for-loop Adam's weights bit for bit
    # (the fused CPU kernel did not: see its docstring).
    cfg = small_cfg(**{"model.head_dropout": [0.0, 0.0]})
    t = cfg.train

    def reference(p):
        return torch.optim.Adam(p, lr=t.lr, weight_decay=t.weight_decay, foreach=False)

    models = []
    for make in (lambda p: train_mod.make_optimizer(p, t), reference):
        torch.manual_seed(0)
        model = train_mod.model_for(cfg)
        opt = make(list(model.parameters()))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.rand(8, 3, 32, 32, generator=g)
            torch.manual_seed(2)
            out = model(x)
            loss = out.logits.logsumexp(1).mean() + out.recon.square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_bad_values_are_refused_before_anything_is_written(small_cfg):
    for overrides, message in [
        ({"model.name": "gan"}, "model.name='gan'"),
        ({"model.alpha": 0.0, "model.beta": 0.0}, "cannot both be 0"),
        ({"model.vae_split_layer": 7}, "model.vae_split_layer=7"),
        ({"model.importance_num": 0}, "model.importance_num=0"),
        ({"model.latent_dim": -3}, "model.latent_dim=-3"),
        ({"data.name": "mnist"}, "data.name='mnist'"),
        ({"eval.fgsm_eps": [0.5, 2.0]}, "eval.fgsm_eps"),
    ]:
        cfg = small_cfg(**overrides)
        with pytest.raises(ConfigError, match=message):
            train(cfg)
        assert not Path(cfg.run_dir).exists()


def test_missing_dataset_files_are_named(small_cfg, tmp_path):
    cfg = small_cfg(**{"data.name": "cifar10", "data.root": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match="nowhere.*data.download=true"):
        train(cfg)
    assert not Path(cfg.run_dir).exists()


@pytest.mark.slow
def test_a_run_dir_of_another_config_is_not_touched(small_cfg):
    cfg = small_cfg(**{"train.epochs": 1})
    train(cfg)
    before = {p: p.stat().st_mtime_ns for p in Path(cfg.run_dir).rglob("*") if p.is_file()}
    other = small_cfg(**{"train.epochs": 1, "model.latent_dim": 16})
    with pytest.raises(ConfigError, match="model.latent_dim: 8 there, 16 here"):
        train(other)
    after = {p: p.stat().st_mtime_ns for p in Path(cfg.run_dir).rglob("*") if p.is_file()}
    assert before == after


def test_a_checkpoint_of_another_model_is_refused(small_cfg, tmp_path):
    cfg = small_cfg()
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    foreign = small_config(tmp_path / "other", **{"model.name": "resnet", "model.beta": 0.0})
    ckpt_io.atomic_save(
        {"model": {}, "config_yaml": train_mod.to_yaml(foreign)}, ckpt_dir / "step_000000005.pt"
    )
    with pytest.raises(ckpt_io.CheckpointError, match="step_000000005.pt belongs to another"):
        train(cfg)
    (ckpt_dir / "step_000000005.pt").write_bytes(b"truncated")
    with pytest.raises(ckpt_io.CheckpointError, match="cannot be read"):
        train(cfg)


@pytest.mark.slow
def test_warm_start_from_a_resnet_checkpoint(small_cfg, tmp_path):
    resnet_cfg = small_config(
        tmp_path / "resnet", **{"model.name": "resnet", "model.beta": 0.0, "train.epochs": 1}
    )
    resnet_final = train(resnet_cfg)
    cfg = small_cfg(**{"model.warm_start": str(resnet_final), "train.epochs": 1})
    train(cfg)  # loads, then trains on
    vae_cfg = small_config(
        tmp_path / "vae", **{"model.name": "vae", "model.alpha": 0.0, "train.epochs": 1}
    )
    with pytest.raises(ckpt_io.CheckpointError, match="is a vae checkpoint"):
        train(small_config(tmp_path / "dhm2", **{"model.warm_start": str(train(vae_cfg))}))


def _run_ddp(tmp_path: Path, run_name: str, overrides: dict, world_size: int) -> list[dict]:
    out = tmp_path / f"{run_name}-weights"
    out.mkdir()
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        cmd = [
            sys.executable,
            "-m",
            "tests._ddp_worker",
            str(tmp_path / run_name),
            json.dumps(overrides),
            str(out),
        ]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


@pytest.mark.slow
def test_two_cpu_processes_match_one_with_the_same_global_batch(tmp_path):
    # GroupNorm, no dropout and no VAE sampling: the result does not depend on how the
    # global batch is split (BatchNorm statistics stay per process on CPU/gloo).
    overrides = {
        "model.name": "resnet",
        "model.beta": 0.0,
        "model.norm": "group",
        "model.head_dropout": [0.0, 0.0],
        "data.val_size": 1237,  # 200 training images: 4 steps of 50
        "train.epochs": 1,
        "train.batch_size": 50,
    }
    rank0, rank1 = _run_ddp(tmp_path, "ddp", overrides, world_size=2)
    (single,) = _run_ddp(tmp_path, "single", overrides, world_size=1)
    torch.manual_seed(0)  # train.seed: the initial weights
    init = train_mod.model_for(small_config(tmp_path / "x", **overrides)).state_dict()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        # Float tolerance, relative to how far 4 Adam steps moved the weights: a different
        # batch split or a wrong gradient average moves them by whole steps (lr = 1e-3).
        moved = (single[key] - init[key]).abs().max()
        assert (rank0[key] - single[key]).abs().max() <= 0.05 * moved + 1e-7, key
    # The DDP run's checkpoint, written by rank 0, holds the same weights.
    saved = _weights(tmp_path / "ddp" / "checkpoints" / "final.pt")
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)
    assert ckpt_io.load(tmp_path / "ddp" / "checkpoints" / "final.pt")["world_size"] == 2


@pytest.mark.slow
def test_ddp_ranks_stay_identical_with_batchnorm_and_dropout(tmp_path):
    overrides = {"model.name": "dhm", "train.epochs": 1, "train.batch_size": 50, "model.beta": 1e-3}
    rank0, rank1 = _run_ddp(tmp_path, "ddp", overrides, world_size=2)
    for key in rank0:
        if "running_" in key or "num_batches_tracked" in key:
            continue  # BatchNorm running statistics are per process on the CPU
        assert torch.equal(rank0[key], rank1[key]), key


def test_a_batch_larger_than_the_training_set_is_a_config_error(small_cfg):
    with pytest.raises(ConfigError, match="train.batch_size=5000"):
        train(small_cfg(**{"train.batch_size": 5000}))
