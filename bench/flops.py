"""Benchmark ``flops``: FLOPs of one DHM training image and model FLOP utilisation (MFU).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over the forward and backward
of the real model and loss (``dhm.training.train.training_loss``) at batch 2, divided by 2 (matmul
and
convolution FLOPs only; elementwise work and the Adam update are not counted). The headline is
dhm at width 64 (~10 GFLOP: three ResNet-18 trunks, forward + backward ~ 3x forward).

MFU = achieved FLOP/s of the train step (FLOPs/image x images/s of ``train_step``'s "ours")
divided by a dense matmul rate measured here: bf16 on CUDA, fp32 on CPU (informative only).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import common
from dhm.training.train import training_loss

HEADLINE_WIDTH = 64
COUNT_BATCH = 2


def train_flops_per_image(
    kind: str, split: int, width: int, latent_dim: int, device: torch.device
) -> float:
    """Counted FLOPs of forward + loss + backward for one training image."""
    model, m = common.make_model(kind, width, latent_dim, split)
    model = model.to(device).train()
    x = torch.rand(COUNT_BATCH, 3, 32, 32, device=device)
    y = torch.randint(0, common.CIFAR.num_classes, (COUNT_BATCH,), device=device)
    with FlopCounterMode(display=False) as counter:
        loss, _ = training_loss(model(x, k=m.importance_num), y, m, model)
        loss.backward()
    return counter.get_total_flops() / COUNT_BATCH


def _train_rates(args: argparse.Namespace) -> dict[str, float]:
    """images/s of our step per variant: from this run's train_step result, else measured."""
    earlier = getattr(args, "results", {}).get("train_step")
    if earlier:
        return {r["model"]: r["ours img/s"] for r in earlier["rows"]}
    from bench.train_step import OurStep

    step = OurStep("dhm", 0, args, common.synthetic_set(max(args.batch * 4, 1024), args.seed))
    timing = {"warmup": args.warmup, "repeats": args.repeats, "inner": args.steps}
    t = common.median(common.measure(step, device=args.device, **timing))
    step.close()
    return {"dhm-s0": args.batch / t}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    headline = train_flops_per_image("dhm", 0, HEADLINE_WIDTH, args.latent_dim, device)
    peak = common.matmul_rate(device, args.quick)
    rates = _train_rates(args)
    rows = []
    for kind, split in common.selected_variants(args.models):
        name = common.variant_name(kind, split)
        if name not in rates:
            continue
        if args.width == HEADLINE_WIDTH and name == "dhm-s0":
            per_image = headline
        else:
            per_image = train_flops_per_image(kind, split, args.width, args.latent_dim, device)
        achieved = per_image * rates[name]
        rows.append(
            {
                "model": name,
                f"GFLOP/img (w={args.width})": per_image / 1e9,
                "img/s": rates[name],
                "GFLOP/s": achieved / 1e9,
                "MFU": achieved / peak["flop_per_s"],
            }
        )
    return {
        "rows": rows,
        "summary": {
            f"dhm GFLOP/train image at width {HEADLINE_WIDTH}": headline / 1e9,
            "expected": "~10",
            f"{peak['dtype']} matmul GFLOP/s (n={peak['n']})": peak["flop_per_s"] / 1e9,
        },
        "matmul": peak,
        "headline_flops_per_image": headline,
    }
