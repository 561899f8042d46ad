"""Benchmark ``train_step``: images/s of one full training step per model kind.

Ours is the body of ``dhm.training.train.run_training``'s loop: DeviceLoader batches, the
Accelerator of
``dhm.training.train.make_accelerator`` (bf16 autocast on CUDA, fp32 on CPU), channels_last on CUDA,
``training_loss``, the deferred finiteness record (no host sync per step),
backward and an Adam step. The reference is a thesis-style step on the same model, batch size
and cores: fp32, batches from the per-sample PIL DataLoader, and the loss summed in a Python
loop over the batch (per-sample MSE reconstruction + KL + CE), as the old code did.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench import common
from dhm.data.loaders import DeviceLoader, ImageSet
from dhm.model.hybrid import DHMOutput
from dhm.training.train import (
    FiniteWatch,
    make_optimizer,
    param_groups,
    step_seed,
    training_loss,
)

# CPU: let the reference's DataLoader workers finish prefetching before a sample is timed.
SETTLE_S = 0.1


def _device_batches(loader: DeviceLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


class OurStep:
    """One optimisation step exactly as dhm.training.train runs it (minus logging and
    checkpoints)."""

    def __init__(self, kind: str, split: int, args: argparse.Namespace, data: ImageSet):
        model, self.mcfg = common.make_model(kind, args.width, args.latent_dim, split, args.seed)
        self.acc = common.accelerator_for(args.device.type)
        tcfg = common.run_cfg(args.device).train
        self.channels_last = self.acc.device.type == "cuda" and tcfg.channels_last
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(param_groups(model, tcfg), tcfg)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.model.train()
        # As dhm.training.train: the compiled module runs the step, the prepared one holds the
        # state.
        self.forward = torch.compile(self.model) if getattr(args, "compile", False) else self.model
        loader = DeviceLoader(
            data, args.batch, device=self.acc.device, seed=args.seed, augment=True
        )
        self.batches = _device_batches(loader)
        self.seed, self.global_step = args.seed, 0
        self.watch = FiniteWatch(
            self.acc.device
        )  # deferred, as in dhm.training.train: no sync per step

    def __call__(self) -> None:
        m = self.mcfg
        x, y = next(self.batches)
        torch.manual_seed(step_seed(self.seed, self.global_step, self.acc.process_index))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.forward(x, k=m.importance_num)
        loss, terms = training_loss(out, y, m)
        finite = torch.isfinite(self.acc.reduce(loss.detach(), "sum"))
        self.watch.update(finite, terms, self.global_step, 0, self.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        self.optimizer.step()
        self.global_step += 1

    def close(self) -> None:
        self.watch.check(Path("(benchmark: no checkpoints)"))
        self.acc.free_memory()  # drop the Accelerator's references to model and optimizer


def thesis_loss(out: DHMOutput, y: torch.Tensor, alpha: float, beta: float, kl_coeff: float):
    """The old code's loss: a Python loop over the batch, per-sample MSE + KL + CE, averaged."""
    total = torch.zeros((), device=y.device)
    for i in range(y.shape[0]):
        if out.logits is not None and alpha:
            total = total + alpha * F.cross_entropy(out.logits[i : i + 1], y[i : i + 1])
        if out.mu is not None and beta:
            rec = F.mse_loss(out.recon[0, i], out.target[i])
            mu, logvar = out.mu[i], out.logvar[i]
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            total = total + beta * (rec + kl_coeff * kl)
    return total / y.shape[0]


class ThesisStep:
    """The reference step: fp32, PIL DataLoader batches, per-sample loss loop, Adam."""

    def __init__(self, kind: str, split: int, args: argparse.Namespace, batches: Iterator):
        model, self.mcfg = common.make_model(kind, args.width, args.latent_dim, split, args.seed)
        self.model = model.to(args.device).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.batches = batches

    def __call__(self) -> None:
        m = self.mcfg
        x, y = next(self.batches)
        out = self.model(x)
        loss = thesis_loss(out, y, m.alpha, m.beta, m.kl_coeff)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    data = common.synthetic_set(args.images, seed=args.seed)
    ref_loader = common.pil_loader(data, args.batch, device)
    ref_batches = common.endless(ref_loader, device)
    timing = {
        "device": device, "warmup": args.warmup, "repeats": args.repeats, "inner": args.steps,
        "settle_s": SETTLE_S if device.type == "cpu" else 0.0,
    }  # fmt: skip
    rows, samples = [], {}
    for kind, split in common.selected_variants(args.models):
        name = common.variant_name(kind, split)
        ours = OurStep(kind, split, args, data)
        ref = ThesisStep(kind, split, args, ref_batches)
        t = common.measure_interleaved({"ours": ours, "ref": ref}, **timing)
        t_ours, t_ref = t["ours"], t["ref"]
        n_params = common.param_count(ref.model)
        ours.close()
        del ours, ref
        ours_ips, ref_ips = args.batch / common.median(t_ours), args.batch / common.median(t_ref)
        rows.append(
            {
                "model": name,
                "params(M)": n_params / 1e6,
                "ours img/s": ours_ips,
                "ours ms/step": 1e3 * common.median(t_ours),
                "ours +-": common.spread(t_ours),
                "ref img/s": ref_ips,
                "ref ms/step": 1e3 * common.median(t_ref),
                "ref +-": common.spread(t_ref),
                "ratio": ours_ips / ref_ips,
            }
        )
        samples[name] = {"ours": t_ours, "ref": t_ref}
    ref_batches.close()
    del ref_loader  # stops the persistent workers
    ratios = [r["ratio"] for r in rows]
    geo = torch.tensor(ratios).log().mean().exp().item()
    precision = "bf16 autocast + channels_last" if device.type == "cuda" else "fp32"
    if args.compile:
        precision += " + torch.compile"
    return {
        "rows": rows,
        "summary": {
            "ours": f"{precision}, DeviceLoader, batched loss",
            "ref": "fp32, PIL DataLoader, per-sample loss loop",
            "ratio geomean": geo,
            "ratio min": min(ratios),
        },
        "config": {
            "width": args.width,
            "latent_dim": args.latent_dim,
            "batch": args.batch,
            "steps_per_sample": args.steps,
            "repeats": args.repeats,
            "warmup": args.warmup,
        },
        "samples_s": samples,
    }
