"""train(cfg) -> final checkpoint: one Deep Hybrid Model, on one process or under DDP.

The same function runs on a laptop CPU, one GPU, or as one rank of a multi-node job: Accelerate
decides the device and the process group, and this code asks its Accelerator about ranks.
Resume is exact: the data order is a function of (seed, epoch), and every step reseeds the RNG
from (seed, global step, rank), so a checkpoint's position (epoch, batch, step) together with
model/optimizer/scheduler state determines the rest of the run. (That reseeding replaces saving
generator states: they are derivable, and they would not survive a change of world size.)
"""

from __future__ import annotations

import csv
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from dhm import checkpoint as ckpt_io
from dhm import data as data_lib
from dhm.config import ConfigError, check_run, from_yaml, to_yaml, training_identity
from dhm.model import DeepHybridModel, build_model, warm_start_from_resnet
from dhm.objectives import hybrid_loss, vae_terms

METRIC_FIELDS = (
    "step", "epoch", "lr", "loss", "ce", "accuracy", "rec_nll", "kl", "neg_elbo", "neg_iwae",
    "images_per_s",
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


def make_optimizer(params: list[torch.nn.Parameter], t: Any) -> torch.optim.Adam:
    """Adam for cfg.train ``t``, multi-tensor (``foreach``): a few ops over all parameters per
    step instead of a few per parameter tensor, and bitwise the same result as the for-loop.

    Not ``fused=True``: on torch 2.14's CPU kernel its weights after 4 steps differed from the
    for-loop's by up to 17% of their movement (foreach: 0), and a 2-process DDP run from a
    1-process one by up to 49% (foreach: 0.7%).
    """
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, foreach=True)


def training_loss(
    out: Any, y: torch.Tensor, m: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective of a forward pass ``out`` (DHMOutput) for model config ``m``:
    ``vae_terms`` when the model has a VAE, then ``hybrid_loss``; (loss, detached terms)."""
    vae = None
    if out.mu is not None:
        vae = vae_terms(
            out.target, out.recon, out.z, out.mu, out.logvar, out.log_sigma, kl_coeff=m.kl_coeff
        )
    return hybrid_loss(out.logits, y, vae, alpha=m.alpha, beta=m.beta, kl_coeff=m.kl_coeff)


def step_seed(seed: int, global_step: int, rank: int) -> int:
    """Seed of the RNG for one optimisation step of one rank (dropout, VAE noise)."""
    return (seed * 1_000_003 + global_step * 7919 + rank * 104_729) % (2**63 - 1)


def make_accelerator(cfg: Any) -> Accelerator:
    """An Accelerator for cfg.train: bf16 autocast on GPU, fp32 on CPU, DDP when launched so."""
    t, m = cfg.train, cfg.model
    cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' is not allowed: no CUDA device is visible")
    precision = t.mixed_precision
    if precision == "auto":
        precision = "no" if cpu else "bf16"
    # A branch without a loss term has no gradient; DDP must be told to expect that.
    unused = (m.alpha == 0 and m.name != "vae") or (m.beta == 0 and m.name != "resnet")
    handlers = [
        InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s)),
        DistributedDataParallelKwargs(find_unused_parameters=unused),
    ]
    return Accelerator(cpu=cpu, mixed_precision=precision, kwargs_handlers=handlers)


def model_for(cfg: Any) -> DeepHybridModel:
    info = data_lib.dataset_info(cfg.data.name)
    return build_model(cfg.model, info.num_classes, info.mean, info.std)


def prepare_run_dir(cfg: Any) -> Path:
    """Create the run dir and its config.yaml, or check that an existing one trains the same model.

    Raises ConfigError naming the differing keys, before anything in the folder is touched.
    """
    run_dir = Path(cfg.run_dir)
    config_file = run_dir / "config.yaml"
    if config_file.exists():
        old = from_yaml(config_file.read_text())
        diff = _identity_diff(training_identity(old), training_identity(cfg))
        if diff:
            raise ConfigError(
                f"{config_file} was written for another training config ({'; '.join(diff)}); "
                "use another run_dir or remove that folder"
            )
    return run_dir


def _identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} here")
    return out


def _check_checkpoint_matches(path: Path, state: dict[str, Any], cfg: Any) -> None:
    diff = _identity_diff(
        training_identity(from_yaml(state["config_yaml"])), training_identity(cfg)
    )
    if diff:
        raise ckpt_io.CheckpointError(
            f"{path} belongs to another training config: {'; '.join(diff)}"
        )


def _load_warm_start(model: DeepHybridModel, path: str) -> None:
    state = ckpt_io.load(path)
    kind = from_yaml(state["config_yaml"]).model.name
    if kind not in ("resnet", "dhm"):
        raise ckpt_io.CheckpointError(
            f"model.warm_start={path} is a {kind} checkpoint; a resnet (or dhm) one is needed"
        )
    try:
        warm_start_from_resnet(model, state["model"])
    except ValueError as err:
        raise ckpt_io.CheckpointError(f"model.warm_start={path}: {err}") from None


class _MetricLog:
    """CSV + TensorBoard per-step metrics, written by the main process only."""

    def __init__(self, log_dir: Path, resume_step: int):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = log_dir / "metrics.csv"
        rows = []
        if self.csv_path.exists() and resume_step > 0:
            # Rows past the resumed step were logged by the interrupted attempt and are redone.
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self._file = open(self.csv_path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._csv = csv.DictWriter(self._file, fieldnames=METRIC_FIELDS)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(log_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, row: dict[str, float]) -> None:
        self._csv.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        self._file.flush()
        for key, value in row.items():
            if key not in ("step", "epoch"):
                self._tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        self._file.close()
        self._tb.close()


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


def train(cfg: Any) -> Path:
    """Train one model described by a RunConfig; return the path of its final checkpoint."""
    return run_training(cfg)[0]


def run_training(cfg: Any) -> tuple[Path, torch.nn.Module]:
    """train(cfg), also returning this rank's trained (unwrapped) model.

    Writes ``<run_dir>/config.yaml``, ``checkpoints/step_*.pt`` (every
    train.checkpoint_every_steps and at every epoch end; the newest train.keep_checkpoints kept),
    ``checkpoints/final.pt`` when done, and ``logs/metrics.csv`` + ``logs/tensorboard/``.
    Resumes from the newest step checkpoint; returns at once if final.pt exists.
    """
    check_run(cfg)
    run_dir = prepare_run_dir(cfg)
    ckpt_dir = run_dir / "checkpoints"
    final_path = ckpt_dir / ckpt_io.FINAL_NAME
    if final_path.exists():
        state = ckpt_io.load(final_path)
        _check_checkpoint_matches(final_path, state, cfg)
        model = model_for(cfg)
        model.load_state_dict(state["model"])
        return final_path, model

    info = data_lib.dataset_info(cfg.data.name)
    train_set = data_lib.load_split(
        cfg.data.name, cfg.data.root, "train", download=cfg.data.download,
        val_size=cfg.data.val_size, split_seed=cfg.data.split_seed,
    )  # fmt: skip
    resume_path = ckpt_io.newest(ckpt_dir)
    resume = ckpt_io.load(resume_path) if resume_path else None
    if resume is not None:
        _check_checkpoint_matches(resume_path, resume, cfg)

    accelerator = make_accelerator(cfg)
    t = cfg.train
    if accelerator.device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest kernels (exact resume is a CPU promise).
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(t.seed)
    model = model_for(cfg)
    if resume is not None:
        model.load_state_dict(resume["model"])
    elif cfg.model.warm_start:
        _load_warm_start(model, cfg.model.warm_start)
    if cfg.model.sync_batchnorm and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if accelerator.device.type == "cuda" and t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, t)
    # The scheduler steps once per epoch and is not handed to Accelerate, which would step
    # it once per process.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, t.lr_decay_every, gamma=t.lr_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    forward = torch.compile(model) if t.compile else model

    try:
        loader = data_lib.DeviceLoader(
            train_set, t.batch_size, device=accelerator.device, seed=t.seed,
            augment=info.augment, rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )  # fmt: skip
    except ValueError as err:  # a batch larger than the set, or not divisible by the ranks
        raise ConfigError(f"train.batch_size={t.batch_size}: {err}") from None
    start_epoch, start_batch, global_step = 0, 0, 0
    if resume is not None:
        start_epoch, start_batch = resume["epoch"], resume["batch"]
        global_step = resume["global_step"]

    main = accelerator.is_main_process
    cfg_yaml = to_yaml(cfg)
    if main:
        where = f"resuming from {resume_path} (step {global_step})" if resume else "starting"
        print(f"train {run_dir}: {where}, {accelerator.num_processes} process(es) on "
              f"{accelerator.device}", flush=True)  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():
            (run_dir / "config.yaml").write_text(cfg_yaml)
    log = _MetricLog(run_dir / "logs", global_step) if main else None
    show_bar = main and t.progress and sys.stderr.isatty()
    unwrapped = accelerator.unwrap_model(model)

    def save_step_checkpoint(next_epoch: int, next_batch: int) -> None:
        assert_replicas_in_sync(accelerator, unwrapped)
        state = {
            "format": 1,
            "model": unwrapped.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": next_epoch,
            "batch": next_batch,
            "global_step": global_step,
            "seed": t.seed,
            "world_size": accelerator.num_processes,
            "config_yaml": cfg_yaml,
        }
        if main:
            ckpt_io.atomic_save(state, ckpt_io.step_path(ckpt_dir, global_step))
            ckpt_io.prune(ckpt_dir, t.keep_checkpoints)
        accelerator.wait_for_everyone()

    watch = FiniteWatch(accelerator.device)
    try:
        model.train()
        tick, images = time.perf_counter(), 0
        for epoch in range(start_epoch, t.epochs):
            batches = loader.epoch(epoch, start_batch=start_batch)
            bar = None
            if show_bar:
                from tqdm import tqdm

                bar = tqdm(batches, total=len(loader), initial=start_batch, desc=f"epoch {epoch}")
                batches = bar
            for batch_idx, (x, y) in enumerate(batches, start=start_batch):
                torch.manual_seed(step_seed(t.seed, global_step, accelerator.process_index))
                if accelerator.device.type == "cuda" and t.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = forward(x, k=cfg.model.importance_num)
                loss, terms = training_loss(out, y, cfg.model)
                if t.debug_nan_at_step is not None and global_step == t.debug_nan_at_step:
                    loss = loss * float("nan")
                    terms["loss"] = loss.detach()
                # Reduced, so every rank records (and later raises) the same first bad step.
                finite = torch.isfinite(accelerator.reduce(loss.detach(), "sum"))
                watch.update(finite, terms, global_step, epoch, batch_idx)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                global_step += 1
                images += x.shape[0] * accelerator.num_processes

                end_of_epoch = batch_idx == len(loader) - 1
                log_now = global_step % t.log_every_steps == 0 or end_of_epoch
                checkpoint_now = end_of_epoch or (
                    t.checkpoint_every_steps and global_step % t.checkpoint_every_steps == 0
                )
                if log_now or checkpoint_now:
                    watch.check(ckpt_dir)  # the only host sync of a step, and not every step
                if log_now:
                    reduced = {k: accelerator.reduce(v, "mean").item() for k, v in terms.items()}
                    if main:
                        now = time.perf_counter()
                        reduced.update(
                            step=global_step, epoch=epoch, lr=scheduler.get_last_lr()[0],
                            images_per_s=images / max(now - tick, 1e-9),
                        )  # fmt: skip
                        tick, images = now, 0
                        log.write(reduced)
                        if bar is not None:
                            bar.set_postfix(loss=f"{reduced['loss']:.4g}")
                if end_of_epoch:
                    scheduler.step()
                if checkpoint_now:
                    nxt = (epoch + 1, 0) if end_of_epoch else (epoch, batch_idx + 1)
                    save_step_checkpoint(*nxt)
            start_batch = 0
    finally:
        if log is not None:
            log.close()

    watch.check(ckpt_dir)
    final = {
        "format": 1,
        "model": unwrapped.state_dict(),
        "global_step": global_step,
        "epoch": t.epochs,
        "config_yaml": cfg_yaml,
        "world_size": accelerator.num_processes,
    }
    assert_replicas_in_sync(accelerator, unwrapped)
    if main:
        ckpt_io.atomic_save(final, final_path)
    accelerator.wait_for_everyone()
    return final_path, unwrapped
