"""Helpers shared by the benchmarks: timers, machine info, synthetic data, models, references.

Timing convention: ``measure`` runs warm-up calls, then ``repeats`` timed calls, synchronizing
the CUDA device (when there is one) before every clock read; benchmarks report medians.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from dhm.core.config import ModelConfig, check_model, run_config
from dhm.data.loaders import DATASETS, ImageSet
from dhm.model.hybrid import DeepHybridModel, build_model

REPO = Path(__file__).resolve().parents[1]
CIFAR = DATASETS["cifar10"]

# (kind, vae_split_layer) of every model the train-step benchmark measures.
MODEL_VARIANTS: tuple[tuple[str, int], ...] = (
    *(("dhm", s) for s in range(5)),
    ("resnet", 0),
    ("vae", 0),
    ("zmodel", 0),
)


def variant_name(kind: str, split: int) -> str:
    return f"{kind}-s{split}" if kind == "dhm" else kind


def selected_variants(models: list[str] | None) -> list[tuple[str, int]]:
    """MODEL_VARIANTS, or those named in ``models`` (``--models dhm-s0,resnet``)."""
    if not models:
        return list(MODEL_VARIANTS)
    return [v for v in MODEL_VARIANTS if variant_name(*v) in models]


# ----------------------------------------------------------------------------------- timing


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def sync(device: torch.device) -> None:
    """Wait for queued device work so that a clock read covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], *, device: torch.device, warmup: int, repeats: int, inner: int = 1
) -> list[float]:
    """Seconds per call of ``fn``: ``repeats`` samples, each the mean of ``inner`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return samples


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    inner: int = 1,
    settle_s: float = 0.0,
) -> dict[str, list[float]]:
    """``measure`` for several functions with their samples alternated (A B A B ...), so a
    change in machine load during the run hits each about equally. ``settle_s``: an untimed
    pause before every sample (lets a DataLoader's workers finish prefetching)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle_s:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) / inner)
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def spread(samples: list[float]) -> float:
    """Relative half-range of the samples: a rough noise estimate for the table."""
    m = statistics.median(samples)
    return (max(samples) - min(samples)) / (2 * m) if m > 0 else 0.0


# ----------------------------------------------------------------------------- machine info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine makes CPU timings noisy."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on; stored in the JSON next to the results."""
    import torchvision

    from dhm.core import provenance

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_cores_usable": cpu_cores(),
        "cpu_name": _cpu_name(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
    }
    if device.type == "cuda":
        info["cuda_version"] = torch.version.cuda
        info["cudnn_version"] = torch.backends.cudnn.version()
    info.update(provenance.record())
    return info


# ----------------------------------------------------------------------------- synthetic data


def synthetic_set(n: int = 10_000, seed: int = 0, num_classes: int = 10) -> ImageSet:
    """A CIFAR-sized set of random uint8 images [n,3,32,32] and labels, as dhm.data.loaders holds
    one."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return ImageSet("synthetic", images, labels)


class PILImageDataset(torch.utils.data.Dataset):
    """The reference input path: per-sample PIL images through a torchvision transform.

    Stores HWC uint8 like torchvision's CIFAR10 and returns what its ``__getitem__`` returns.
    """

    def __init__(self, data: ImageSet, transform: Callable):
        self.images = data.images.permute(0, 2, 3, 1).contiguous().numpy()  # [N,32,32,3]
        self.labels = data.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def pil_loader(data: ImageSet, batch: int, device: torch.device) -> torch.utils.data.DataLoader:
    """torchvision's per-sample CIFAR pipeline (crop pad 4 + hflip + ToTensor) in a DataLoader
    with one worker per usable core, the same global batch, persistent workers."""
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )
    return torch.utils.data.DataLoader(
        PILImageDataset(data, transform),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=cpu_cores(),
        persistent_workers=True,
        pin_memory=device.type == "cuda",
    )


def endless(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator:
    """(x, y) on ``device`` forever, epoch after epoch (the workers persist across epochs)."""
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# --------------------------------------------------------------------------------- models


def model_config(kind: str, width: int, latent_dim: int, split: int = 0):
    """configs/model/<kind>.yaml on the ModelConfig schema, with width/latent/split set."""
    cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig),
        OmegaConf.load(REPO / "configs" / "model" / f"{kind}.yaml"),
    )
    cfg.width, cfg.latent_dim, cfg.vae_split_layer = width, latent_dim, split
    check_model(cfg)
    return cfg


def make_model(kind: str, width: int, latent_dim: int, split: int = 0, seed: int = 0):
    """(DeepHybridModel on CPU with CIFAR-10 classes/normalization, its model config)."""
    cfg = model_config(kind, width, latent_dim, split)
    torch.manual_seed(seed)
    return build_model(cfg, CIFAR.num_classes, CIFAR.mean, CIFAR.std), cfg


def run_cfg(device: torch.device):
    """A RunConfig whose train section is what dhm.training.train would run with on ``device``."""
    return run_config(**{"train.device": device.type, "train.progress": False})


@lru_cache(maxsize=2)
def accelerator_for(device_type: str):
    """dhm.training.train's Accelerator for ``device_type`` (bf16 autocast on CUDA, fp32 on CPU)."""
    from dhm.training.train import make_accelerator

    threads = torch.get_num_threads()
    acc = make_accelerator(run_cfg(torch.device(device_type)))
    torch.set_num_threads(threads)  # keep the thread count of the rest of the run
    return acc


def param_count(model: DeepHybridModel) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_rate(device: torch.device, quick: bool) -> dict[str, Any]:
    """Dense matmul FLOP/s: bf16 on CUDA (tensor cores), fp32 on CPU; the MFU denominator."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
    else:
        n, dtype, reps = 2048, torch.float32, (5 if quick else 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    samples = measure(lambda: torch.matmul(a, b), device=device, warmup=2, repeats=reps)
    t = median(samples)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flop_per_s": 2 * n**3 / t}
