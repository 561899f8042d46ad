"""What the training loop watches and writes: non-finite losses, replica agreement, metrics.

``FiniteWatch`` records the first non-finite loss on the device (no host sync per step);
``assert_replicas_in_sync`` checks that DDP ranks hold the same weights at checkpoints;
``MetricLog`` writes metrics.csv and TensorBoard on the main process.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from accelerate import Accelerator

from dhm.core.layout import METRICS_LOG

METRIC_FIELDS = (
    "step", "epoch", "lr", "loss", "ce", "accuracy", "rec_nll", "kl", "neg_elbo",
    "vae_objective", "sigma", "images_per_s", "val_accuracy", "val_nll", "val_neg_elbo",
    "val_sigma_fitted",
)  # fmt: skip


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the terms."""


class FiniteWatch:
    """Records the first step whose loss was not finite, on the device, without a host sync.

    ``update`` runs every step as a few tiny device ops (no ``.item()``, so a GPU never waits
    for the host); ``check`` reads the record (one sync) and raises NonFiniteLossError naming
    that step, its epoch and batch and every loss term. The loop checks before it logs,
    checkpoints or returns, so a non-finite loss stops the run at the next log or checkpoint
    step, no checkpoint holds weights updated by it, and the error names the step where it
    happened, not where it was noticed.
    """

    def __init__(self, device: torch.device) -> None:
        # step, epoch, batch of the first non-finite loss (-1: none), as 0-d device tensors.
        self.where = [torch.tensor(-1, device=device) for _ in range(3)]
        self.values: torch.Tensor | None = None
        self.names: list[str] = []

    def update(self, finite: torch.Tensor, terms: dict[str, torch.Tensor], *where: int) -> None:
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        if self.values is None:
            self.names, self.values = list(terms), torch.zeros_like(values)
        first = (self.where[0] < 0) & ~finite
        # Python ints enter as kernel arguments: no host-to-device copy, so no sync.
        self.where = [torch.where(first, n, w) for n, w in zip(where, self.where, strict=True)]
        self.values = torch.where(first, values, self.values)

    def check(self, ckpt_dir: Path) -> None:
        step, epoch, batch = torch.stack(self.where).tolist()
        if step >= 0:
            assert self.values is not None
            shown = ", ".join(
                f"{k}={v:.4g}" for k, v in zip(self.names, self.values.tolist(), strict=True)
            )
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (epoch {epoch}, batch {batch}): {shown}; "
                f"the last good checkpoint in {ckpt_dir} is kept"
            )


class MetricLog:
    """CSV + TensorBoard per-step metrics, written by the main process only."""

    def __init__(self, log_dir: Path, resume_step: int):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = log_dir / METRICS_LOG
        rows = []
        if self.csv_path.exists() and resume_step > 0:
            # Rows past the resumed step were logged by the interrupted attempt and are redone.
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self._file = open(self.csv_path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._csv = csv.DictWriter(self._file, fieldnames=METRIC_FIELDS)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(log_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, row: dict[str, float]) -> None:
        self._csv.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        self._file.flush()
        for key, value in row.items():
            if key not in ("step", "epoch"):
                group, name = ("val", key[4:]) if key.startswith("val_") else ("train", key)
                self.tb.add_scalar(f"{group}/{name}", value, row["step"])

    def close(self) -> None:
        self._file.close()
        self.tb.close()


def assert_replicas_in_sync(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Raise if the DDP ranks' weights differ (bitwise), e.g. after a non-deterministic step.

    Compares a float64 fingerprint of every parameter across ranks (buffers such as BatchNorm
    running statistics are per process on CPU); one small all-gather, at checkpoint time only.
    """
    if accelerator.num_processes == 1:
        return
    tensors = [p.detach() for p in model.parameters()]
    weights = torch.arange(1, len(tensors) + 1, dtype=torch.float64, device=accelerator.device)
    sums = torch.stack([t.double().sum() for t in tensors]) * weights
    squares = torch.stack([t.double().square().sum() for t in tensors])
    fingerprint = torch.stack([sums.sum(), squares.sum()])
    gathered = accelerator.gather(fingerprint.unsqueeze(0))
    if not torch.equal(gathered, fingerprint.unsqueeze(0).expand_as(gathered)):
        raise RuntimeError(
            f"DDP replicas diverged: weight fingerprints per rank {gathered.tolist()}"
        )
