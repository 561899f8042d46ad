"""Benchmark ``pipeline``: images/s of the training input path.

Ours: ``dhm.data.loaders.DeviceLoader`` (uint8 set resident on the device, padded once; a batch of
crops + flips is one ``index_select`` of window starts, see ``dhm.data.loaders.CropWindows``).
Reference: torchvision's per-sample PIL pipeline (RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor) in a DataLoader with one worker per core, moved to the device.
Both deliver float [B,3,32,32] batches on the device for one epoch of a synthetic set
(``--images``, default 10k).
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import common
from dhm.data.loaders import DeviceLoader

TARGET_RATIO = 20.0
SETTLE_S = 0.2  # the reference's workers refill their prefetch queue before ours is timed


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    data = common.synthetic_set(args.images, seed=args.seed)
    loader = DeviceLoader(data, args.batch, device=device, seed=args.seed, augment=True)
    per_epoch = len(loader) * args.batch
    epoch_counter = iter(range(10**9))

    def our_epoch() -> None:
        for _x, _y in loader.epoch(next(epoch_counter)):
            pass

    ref_loader = common.pil_loader(data, args.batch, device)
    batches = common.endless(ref_loader, device)
    n_batches = len(ref_loader)  # one epoch per sample, as for ours

    def ref_epoch() -> None:
        for _ in range(n_batches):
            next(batches)

    # Warm-up includes the workers' start-up; samples alternate so load changes hit both.
    t = common.measure_interleaved(
        {"ours": our_epoch, "ref": ref_epoch}, device=device, warmup=1, repeats=args.repeats,
        settle_s=SETTLE_S,
    )  # fmt: skip
    ours, ref = t["ours"], t["ref"]
    batches.close()
    del ref_loader  # stops the persistent workers

    ours_ips = per_epoch / common.median(ours)
    ref_ips = per_epoch / common.median(ref)
    ratio = ours_ips / ref_ips
    rows = [
        {
            "path": "DeviceLoader (ours)",
            "images/s": ours_ips,
            "ms/batch": 1e3 * common.median(ours) / len(loader),
            "+-": common.spread(ours),
        },
        {
            "path": f"PIL DataLoader x{common.cpu_cores()} workers (ref)",
            "images/s": ref_ips,
            "ms/batch": 1e3 * common.median(ref) / n_batches,
            "+-": common.spread(ref),
        },
    ]
    return {
        "rows": rows,
        "summary": {
            "ratio ours/ref": ratio,
            "target": f">= {TARGET_RATIO:g}x",
            "meets target": ratio >= TARGET_RATIO,
        },
        "config": {"images": args.images, "batch": args.batch, "workers": common.cpu_cores()},
        "samples_s": {"ours": ours, "ref": ref},
    }
