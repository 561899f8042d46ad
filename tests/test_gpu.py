"""The CUDA fast path: run on a GPU box by ``bash bench/gpu_check.sh run``.

Skipped where no CUDA device is visible (CI, the 2-core dev VMs): the same code paths have CPU
tests (test_data's crop windows, test_train's host-read count and training runs); these add what
only a GPU shows: that the loop body never synchronises with the host, that bf16 autocast +
channels_last + torch.compile train and evaluate, and that the crop windows gather the same
pixels from device memory.
"""

from __future__ import annotations

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
from tests.helpers.configs import small_config

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
