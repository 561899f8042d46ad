"""The CUDA fast path: run on a GPU box by ``bash bench/gpu_check.sh run``.

Skipped where no CUDA device is visible (CI, the 2-core dev VMs): the same code paths have CPU
tests (test_data's crop windows, test_train's host-read count and training runs); these add what
only a GPU shows: that the loop body never synchronises with the host, that bf16 autocast +
channels_last + torch.compile train and evaluate, and that the crop windows gather the same
pixels from device memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from bench import common
from bench.train_step import OurStep
from dhm.data import loaders as D
from dhm.evaluation.evaluate import evaluate_all
from dhm.model import checkpoint as model_ckpt
from dhm.training.train import train
from hpc.distributed import bind_device
from tests.helpers.configs import free_port, small_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one state per process: CPU tests before these set fp32 on the CPU."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    common.accelerator_for.cache_clear()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    common.accelerator_for.cache_clear()


def test_crop_windows_on_the_gpu_equal_the_cpu_definition():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=g)
    idx = torch.randint(0, 300, (512,), generator=g)
    offsets = torch.randint(0, 9, (512, 2), generator=g)
    flips = torch.randint(0, 2, (512,), generator=g).bool()
    crops = D.CropWindows(images.cuda())
    assert crops(idx.cuda(), offsets, flips).cpu().equal(D.crop_flip(images[idx], offsets, flips))


def test_loader_batches_on_the_gpu_equal_the_cpu_ones():
    data = common.synthetic_set(500, seed=1)
    kw = {"seed": 3, "augment": True}
    cpu = list(D.DeviceLoader(data, 64, device="cpu", **kw).epoch(2))
    gpu = list(D.DeviceLoader(data, 64, device="cuda", **kw).epoch(2))
    assert len(cpu) == len(gpu) == 7
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and xg.cpu().equal(xc) and yg.cpu().equal(yc)


@pytest.mark.slow
@pytest.mark.parametrize("kind,split", [("dhm", 0), ("dhm", 3), ("resnet", 0), ("vae", 0)])
def test_training_step_never_waits_for_the_host(kind, split):
    # The body of dhm.training.train's loop (bench.train_step.OurStep), after the epoch's one copy.
    args = Namespace(
        device=torch.device("cuda"), width=16, latent_dim=32, batch=64, seed=0, quick=True
    )
    step = OurStep(kind, split, args, common.synthetic_set(64 * 12))
    step()  # the epoch starts: its indices and windows are copied (a sync) here
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    step.close()  # reads the finiteness record: no non-finite loss


@pytest.mark.slow
@pytest.mark.parametrize("compile_model", [False, True])
def test_bf16_channels_last_training_and_evaluation_on_the_gpu(tmp_path, compile_model):
    cfg = small_config(
        tmp_path / "run",
        **{
            "train.device": "cuda",
            "train.compile": compile_model,
            "train.epochs": 3,
            "train.batch_size": 100,
            "model.width": 16,
            "model.latent_dim": 16,
        },
    )
    final = train(cfg)
    state = model_ckpt.load(final)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    rows = (Path(cfg.run_dir) / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    cells = [r.split(",")[header.index("loss")] for r in rows[1:]]
    loss = [float(c) for c in cells if c]  # validation rows have no training loss
    assert loss[-1] < loss[0], loss
    shards = evaluate_all(cfg, final)
    assert shards and all(Path(p).exists() for p in shards)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("style", ["node", "task"])
def test_two_gpu_ddp_uses_nccl_and_each_rank_its_own_gpu(tmp_path, style):
    # Two ranks on one box under each binding style, with the environment
    # hpc.distributed.bind_device gives them: node, both see every GPU and LOCAL_RANK = r;
    # task, each sees only GPU r and LOCAL_RANK = 0. NCCL is the backend on CUDA, the collective
    # timeout is train.dist_timeout_s, the ranks end with the same weights on distinct GPUs.

    out = tmp_path / "weights"
    out.mkdir()
    port, procs = free_port(), []
    overrides = {"train.device": "cuda", "train.epochs": 1, "train.batch_size": 100,
                 "model.width": 8, "train.dist_timeout_s": 321}  # fmt: skip
    for rank in range(2):
        slurm = {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO),
               **bind_device(slurm, style)}  # fmt: skip
        env["CUDA_VISIBLE_DEVICES"] = "0,1" if style == "node" else str(rank)
        cmd = [sys.executable, "-m", "tests._ddp_worker", str(tmp_path / "run"),
               json.dumps(overrides), str(out)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO))
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert {(r["backend"], r["timeout_s"]) for r in records} == {("nccl", 321)}
    physical = [
        r["cuda_visible_devices"].split(",")[int(r["device"].split(":")[1])] for r in records
    ]
    assert physical == ["0", "1"], records
    w0, w1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(w0[k].cpu(), w1[k].cpu()) for k in w0)
