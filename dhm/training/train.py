"""train(cfg) -> final checkpoint: one Deep Hybrid Model, on one process or under DDP.

The same function runs on a laptop CPU, one GPU, or as one rank of a multi-node job: Accelerate
decides the device and the process group, and this code asks its Accelerator about ranks.
Resume is exact: the data order is a function of (seed, epoch), and every step reseeds the RNG
from (seed, global step, rank), so a checkpoint's position (epoch, batch, step) together with
model/optimizer/scheduler state determines the rest of the run. (That reseeding replaces saving
generator states: they are derivable, and they would not survive a change of world size.)

The run is three pieces, as MAE splits its ``main`` from ``train_one_epoch``: ``resume_or_init``
(the run's state, from the newest checkpoint or from scratch), ``train_one_epoch`` and
``save_checkpoint`` (one builder of the checkpoint dict). A ``StopRequest`` set from outside
(a signal handler) makes the loop write a checkpoint of its exact position and raise
``TrainingStopped``, so a requeued task loses nothing whatever the checkpoint cadence.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from dhm.core import checkpoint as ckpt_io
from dhm.core import provenance
from dhm.core import variants as V
from dhm.core.config import ConfigError, check_run, from_yaml, to_yaml, training_identity
from dhm.core.fsutil import atomic_write_text
from dhm.data import loaders as data_lib
from dhm.model import checkpoint as model_ckpt
from dhm.model.hybrid import DeepHybridModel, build_model, warm_start_from_resnet
from dhm.model.objectives import hybrid_loss, optimal_log_sigma, vae_terms
from dhm.training import validation as val_lib
from dhm.training.monitor import (  # noqa: F401 - NonFiniteLossError is part of this module's API
    FiniteWatch,
    MetricLog,
    NonFiniteLossError,
    assert_replicas_in_sync,
)

CHECKPOINT_FORMAT = 2  # 2: torch_threads, eval_log_sigma; 1 is read as well


class TrainingStopped(RuntimeError):
    """Training stopped on request at ``step``; ``checkpoint`` holds its exact position."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"stopped on request at step {step}; resume from {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class StopRequest:
    """Set ``requested`` (e.g. from a signal handler) to make training stop at a step boundary.

    A single process stops after the step in progress; DDP ranks agree at the next log step (a
    signal reaches ranks at slightly different moments, and they must stop at the same step).
    """

    def __init__(self) -> None:
        self.requested = False


def param_groups(model: torch.nn.Module, t: Any) -> list[dict[str, Any]]:
    """The trained parameters of ``model`` as Adam's groups: a learned decoder ``log_sigma`` in
    a group of its own at cfg.train ``t``'s sigma_lr (when set), everything else at t.lr."""
    sigma, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            own = t.sigma_lr is not None and name.rsplit(".", 1)[-1] == "log_sigma"
            (sigma if own else rest).append(p)
    return [{"params": rest}] + (
        [{"params": sigma, "lr": t.sigma_lr, "betas": (0.9, 0.9)}] if sigma else []
    )


def make_optimizer(params: list[Any], t: Any) -> torch.optim.Adam:
    """Adam for cfg.train ``t`` over ``params`` (tensors, or ``param_groups``), multi-tensor
    (``foreach``): a few ops over all parameters per step instead of a few per parameter
    tensor, and bitwise the same result as the for-loop.

    Not ``fused=True``: on torch 2.14's CPU kernel it diverged from the for-loop Adam (see
    docs/performance.md), which foreach does not.
    """
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, foreach=True)


def training_loss(
    out: Any, y: torch.Tensor, m: Any, model: DeepHybridModel | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective of a forward pass ``out`` (DHMOutput) for model config ``m``:
    ``vae_terms`` when the model has a VAE, then ``hybrid_loss``; (loss, detached terms).
    ``model`` supplies the pixel std the thesis objective normalizes images by."""
    vae = None
    if out.mu is not None:
        scale = 1.0
        if m.likelihood == "thesis" and m.vae_split_layer == 0 and model is not None:
            scale = model.pixel_std.view(-1, 1, 1)
        log_sigma = out.log_sigma
        if m.sigma == "optimal" and m.likelihood == "gaussian":
            log_sigma = optimal_log_sigma(out.target, out.recon)
        vae = vae_terms(
            out.target,
            out.recon,
            out.z,
            out.mu,
            out.logvar,
            log_sigma,
            kl_coeff=m.kl_coeff,
            likelihood=m.likelihood,
            target_scale=scale,
        )
    loss, terms = hybrid_loss(out.logits, y, vae, alpha=m.alpha, beta=m.beta)
    if vae is not None and m.likelihood == "gaussian":
        # the decoder sigma of this step (mean over channels)
        terms["sigma"] = torch.as_tensor(log_sigma).detach().exp().mean()
    return loss, terms


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
    """Check that an existing run dir's config.yaml trains the same model as ``cfg``.

    Raises ConfigError naming the differing keys, before anything in the folder is touched.
    """
    run_dir = Path(cfg.run_dir)
    config_file = run_dir / "config.yaml"
    if config_file.exists():
        old = from_yaml(config_file.read_text())
        diff = identity_diff(old, cfg)
        if diff:
            raise ConfigError(
                f"{config_file} was written for another training config ({'; '.join(diff)}); "
                "use another run_dir or remove that folder"
            )
    return run_dir


def identity_diff(old: Any, new: Any) -> list[str]:
    """'key: a there, b here' for every training-identity field that differs."""
    return _diff(training_identity(old, full=True), training_identity(new, full=True))


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} here")
    return out


def check_checkpoint_matches(path: Path, state: dict[str, Any], cfg: Any) -> None:
    diff = identity_diff(from_yaml(state["config_yaml"]), cfg)
    if diff:
        raise ckpt_io.CheckpointError(
            f"{path} belongs to another training config: {'; '.join(diff)}"
        )


def load_warm_start(path: str, key: str = "model.warm_start") -> dict[str, Any]:
    """A warm-start checkpoint's state: a resnet or dhm checkpoint that loads.
    CheckpointError names the key, the file and what is wrong."""
    state = model_ckpt.load(path)
    kind = from_yaml(state["config_yaml"]).model.name
    if kind not in ("resnet", "dhm"):
        raise ckpt_io.CheckpointError(
            f"{key}={path} is a {kind} checkpoint; a resnet (or dhm) one is needed"
        )
    return state


def apply_warm_start(model: DeepHybridModel, path: str) -> None:
    """Load ``path``'s classifier trunk and head into ``model`` (CheckpointError if it does
    not fit). The launcher calls this on a CPU copy of each run's model before submitting."""
    state = load_warm_start(path)
    try:
        warm_start_from_resnet(model, state["model"])
    except ValueError as err:
        raise ckpt_io.CheckpointError(f"model.warm_start={path}: {err}") from None


@dataclass
class RunState:
    """Everything one rank holds while training a run."""

    cfg: Any
    accelerator: Accelerator
    model: Any  # as prepared by Accelerate (DDP-wrapped under DDP)
    unwrapped: DeepHybridModel
    forward: Any  # model, or its torch.compile'd version
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: data_lib.DeviceLoader
    val_set: data_lib.ImageSet | None
    ckpt_dir: Path
    cfg_yaml: str
    epoch: int = 0
    batch: int = 0
    step: int = 0
    log: MetricLog | None = None
    watch: FiniteWatch | None = None
    last_val: val_lib.ValStats | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def checkpoint_state(rs: RunState, *, final: bool = False) -> dict[str, Any]:
    """The one checkpoint dict: weights, optimizer and schedule (not in final.pt), position,
    and ``code``: the snapshot id the process runs from ("" outside one; absent from older
    checkpoints, which load as before: nothing reads it back)."""
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": rs.unwrapped.state_dict(),
        "epoch": rs.epoch,
        "batch": rs.batch,
        "global_step": rs.step,
        "seed": rs.cfg.train.seed,
        "world_size": rs.accelerator.num_processes,
        "torch_threads": torch.get_num_threads(),
        "config_yaml": rs.cfg_yaml,
        "code": str(provenance.snapshot().get("id", "")),
        **rs.extra,
    }
    if not final:
        state["optimizer"] = rs.optimizer.state_dict()
        state["scheduler"] = rs.scheduler.state_dict()
    return state


def save_checkpoint(rs: RunState, path: Path, *, final: bool = False) -> Path:
    """Check the replicas agree, write ``path`` on the main process, wait for every rank."""
    assert_replicas_in_sync(rs.accelerator, rs.unwrapped)
    if rs.main:
        model_ckpt.atomic_save(checkpoint_state(rs, final=final), path)
        if not final:
            ckpt_io.prune(rs.ckpt_dir, rs.cfg.train.keep_checkpoints)
    rs.accelerator.wait_for_everyone()
    return path


def _resume_point(cfg: Any, ckpt_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    path = ckpt_io.newest(ckpt_dir)
    if path is None:
        return None, None
    state = model_ckpt.load(path)
    check_checkpoint_matches(path, state, cfg)
    threads, now = state.get("torch_threads"), torch.get_num_threads()
    if threads is not None and threads != now and not torch.cuda.is_available():
        print(
            f"warning: resuming {path} with {now} torch threads; it was written with "
            f"{threads}: CPU kernels split work by thread count, so the weights will not be "
            "bit-identical to an uninterrupted run (give the task the same cpus_per_task)",
            file=sys.stderr,
            flush=True,
        )
    return path, state


def _train_split(cfg: Any) -> data_lib.ImageSet:
    """The training images of cfg.data (uint8 [N, C, H, W] on the CPU), less the validation
    split when cfg.data.val_size asks for one."""
    return data_lib.load_split(
        cfg.data.name,
        cfg.data.root,
        "train",
        download=cfg.data.download,
        val_size=cfg.data.val_size,
        split_seed=cfg.data.split_seed,
    )


def _init_model(cfg: Any, accelerator: Accelerator, resume: dict[str, Any] | None) -> Any:
    """The model, seeded by cfg.train.seed: weights from ``resume``, else the warm start (if
    any), else fresh; SyncBatchNorm and channels-last on CUDA when configured."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = model_for(cfg)
    if resume is not None:
        model.load_state_dict(resume["model"])
    elif cfg.model.warm_start:
        apply_warm_start(model, cfg.model.warm_start)
    if cfg.model.sync_batchnorm and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if accelerator.device.type == "cuda" and t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _prepare_optimization(
    cfg: Any, accelerator: Accelerator, model: Any, resume: dict[str, Any] | None
) -> tuple[Any, torch.optim.Optimizer, Any]:
    """Adam and the step-decay schedule for ``model``; (model, optimizer) as prepared by
    Accelerate, and the optimizer and scheduler states of ``resume`` loaded."""
    t = cfg.train
    optimizer = make_optimizer(param_groups(model, t), t)
    # The scheduler steps once per epoch and is not handed to Accelerate, which would step
    # it once per process.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, t.lr_decay_every, gamma=t.lr_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    return model, optimizer, scheduler


def _make_loader(
    cfg: Any, train_set: data_lib.ImageSet, accelerator: Accelerator
) -> data_lib.DeviceLoader:
    """This rank's share of the training batches, on the accelerator's device; ConfigError
    when cfg.train.batch_size does not fit the set or the number of ranks."""
    t = cfg.train
    try:
        return data_lib.DeviceLoader(
            train_set,
            t.batch_size,
            device=accelerator.device,
            seed=t.seed,
            augment=data_lib.dataset_info(cfg.data.name).augment,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
    except ValueError as err:  # a batch larger than the set, or not divisible by the ranks
        raise ConfigError(f"train.batch_size={t.batch_size}: {err}") from None


def _start_logging(rs: RunState, run_dir: Path, resume_path: Path | None) -> None:
    """On the main process: say where the run starts, write config.yaml if it is missing and
    open the metric log at the run's step."""
    where = f"resuming from {resume_path} (step {rs.step})" if resume_path else "starting"
    print(
        f"train {run_dir}: {where}, {rs.accelerator.num_processes} process(es) on "
        f"{rs.accelerator.device}",
        flush=True,
    )
    if not (run_dir / "config.yaml").exists():
        atomic_write_text(run_dir / "config.yaml", rs.cfg_yaml)
    rs.log = MetricLog(run_dir / "logs", rs.step)


def resume_or_init(cfg: Any) -> RunState:
    """The run's state on this rank: from the newest step checkpoint, or fresh (with the
    warm start, if any). Reads the training data and places everything on the device."""
    t = cfg.train
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    train_set = _train_split(cfg)
    resume_path, resume = _resume_point(cfg, ckpt_dir)
    accelerator = make_accelerator(cfg)
    if accelerator.device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest kernels (exact resume is a CPU promise).
        torch.backends.cudnn.benchmark = True
    model = _init_model(cfg, accelerator, resume)
    model, optimizer, scheduler = _prepare_optimization(cfg, accelerator, model, resume)
    loader = _make_loader(cfg, train_set, accelerator)
    if t.compile and accelerator.device.type == "cpu":
        import torch._inductor.config as inductor_config

        # On CPU, the channels-last layouts inductor picks for convolutions hung in the second
        # convolution_backward (torch 2.14.1, oneDNN, AMD EPYC); plain layouts train fine.
        inductor_config.layout_optimization = False
    rs = RunState(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        unwrapped=accelerator.unwrap_model(model),
        forward=torch.compile(model) if t.compile else model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        val_set=val_lib.validation_set(cfg, t.val_max_images),
        ckpt_dir=ckpt_dir,
        cfg_yaml=to_yaml(cfg),
    )
    if resume is not None:
        rs.epoch, rs.batch, rs.step = resume["epoch"], resume["batch"], resume["global_step"]
    if rs.main:
        _start_logging(rs, run_dir, resume_path)
    rs.watch = FiniteWatch(accelerator.device)
    return rs


def _stop_agreed(rs: RunState, stop: StopRequest | None, log_now: bool) -> bool:
    if stop is None:
        return False
    if rs.accelerator.num_processes == 1:
        return stop.requested
    if not log_now:
        return False
    flag = torch.tensor(float(stop.requested), device=rs.accelerator.device)
    return bool(rs.accelerator.reduce(flag, "sum").item() > 0)


def train_one_epoch(rs: RunState, stop: StopRequest | None = None) -> None:
    """Train from ``rs``'s position to the end of its epoch; checkpoint, log and validate on
    the way. Raises TrainingStopped (after a checkpoint) when ``stop`` is agreed on."""
    t, acc, watch = rs.cfg.train, rs.accelerator, rs.watch
    epoch, n_batches = rs.epoch, len(rs.loader)
    batches: Any = rs.loader.epoch(epoch, start_batch=rs.batch)
    bar = None
    if rs.main and t.progress and sys.stderr.isatty():
        from tqdm import tqdm

        batches = bar = tqdm(batches, total=n_batches, initial=rs.batch, desc=f"epoch {epoch}")
    tick, images = time.perf_counter(), 0
    rs.model.train()
    for batch_idx, (x, y) in enumerate(batches, start=rs.batch):
        torch.manual_seed(step_seed(t.seed, rs.step, acc.process_index))
        if acc.device.type == "cuda" and t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = rs.forward(x, k=rs.cfg.model.importance_num)
        loss, terms = training_loss(out, y, rs.cfg.model, rs.unwrapped)
        if t.debug_nan_at_step is not None and rs.step == t.debug_nan_at_step:
            loss = loss * float("nan")
            terms["loss"] = loss.detach()
        # Reduced, so every rank records (and later raises) the same first bad step.
        finite = torch.isfinite(acc.reduce(loss.detach(), "sum"))
        watch.update(finite, terms, rs.step, epoch, batch_idx)
        rs.optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        rs.optimizer.step()
        rs.step += 1
        images += x.shape[0] * acc.num_processes
        rs.epoch, rs.batch = epoch, batch_idx + 1

        end_of_epoch = batch_idx == n_batches - 1
        log_now = rs.step % t.log_every_steps == 0 or end_of_epoch
        stopping = _stop_agreed(rs, stop, log_now)
        checkpoint_now = (
            end_of_epoch
            or stopping
            or (t.checkpoint_every_steps and rs.step % t.checkpoint_every_steps == 0)
        )
        if log_now or checkpoint_now:
            watch.check(rs.ckpt_dir)  # the only host sync of a step, and not every step
        if log_now:
            reduced = {k: acc.reduce(v, "mean").item() for k, v in terms.items()}
            if rs.log is not None:
                now = time.perf_counter()
                reduced.update(
                    step=rs.step,
                    epoch=epoch,
                    lr=rs.scheduler.get_last_lr()[0],
                    images_per_s=images / max(now - tick, 1e-9),
                )
                tick, images = now, 0
                rs.log.write(reduced)
                if bar is not None:
                    bar.set_postfix(loss=f"{reduced['loss']:.4g}")
        if end_of_epoch:
            rs.scheduler.step()
            rs.epoch, rs.batch = epoch + 1, 0
            fresh = _maybe_validate(rs)
            if rs.epoch in t.get("keep_epochs", ()):
                _save_epoch(rs, fresh)
        if checkpoint_now:
            path = save_checkpoint(rs, ckpt_io.step_path(rs.ckpt_dir, rs.step))
            if stopping:
                raise TrainingStopped(rs.step, path)


def _validation_pass(rs: RunState, data: data_lib.ImageSet) -> val_lib.ValStats:
    """One pass over ``data`` on every rank (blocks split over ranks, sums reduced)."""
    acc = rs.accelerator
    return val_lib.validation_pass(
        rs.unwrapped,
        data,
        rs.cfg.eval.batch_size,
        acc.device,
        seed=rs.cfg.train.seed,
        rank=acc.process_index,
        world_size=acc.num_processes,
        reduce=(lambda t: acc.reduce(t, "sum")) if acc.num_processes > 1 else None,
    )


def _save_epoch(rs: RunState, fresh: val_lib.ValStats | None) -> Path:
    """checkpoints/epoch_<NNNN>.pt after epoch ``rs.epoch`` (train.keep_epochs): the weights
    and the evaluation sigma fitted now, as final.pt has them; kept after training."""
    path = rs.ckpt_dir / V.checkpoint_file(rs.epoch)
    extra = rs.extra
    rs.extra = {**extra, **_eval_sigma(rs, fresh)}
    try:
        return save_checkpoint(rs, path, final=True)
    finally:
        rs.extra = extra


def _maybe_validate(rs: RunState) -> val_lib.ValStats | None:
    """Validation after epoch ``rs.epoch - 1`` when due (and always after the last epoch);
    its statistics (None: not due)."""
    every, last = rs.cfg.train.val_every_epochs, rs.epoch == rs.cfg.train.epochs
    if rs.val_set is None or not (last or (every and rs.epoch % every == 0)):
        return None
    stats = _validation_pass(rs, rs.val_set)
    rs.last_val = stats
    if rs.log is not None:
        rs.log.write({"step": rs.step, "epoch": rs.epoch - 1, **stats.metrics()})
        grids = val_lib.image_grids(
            rs.unwrapped, rs.val_set.images[:16], seed=0, device=rs.accelerator.device
        )
        if grids:
            from torchvision.utils import make_grid

            for name in ("recon", "samples"):
                rs.log.tb.add_image(f"images/{name}", make_grid(grids[name], nrow=8), rs.step)
    rs.model.train()
    return stats


def _eval_sigma(rs: RunState, fresh: Any = True) -> dict[str, Any]:
    """The sigma evaluation's headline bounds use, for final.pt: fitted in closed form on the
    validation split for every sigma option (for a learned one too: the shards then hold its
    trained bounds beside, ``dhm.evaluation.evaluate``). ``fresh``: this epoch's validation
    statistics (None: fit now; True: the last validation's, the end of training's)."""
    m = rs.unwrapped
    if not m.has_vae:
        return {}

    def fit(data: data_lib.ImageSet) -> val_lib.ValStats:
        return _validation_pass(rs, data)

    if rs.val_set is not None:
        stats = (rs.last_val if fresh is True else fresh) or fit(rs.val_set)
        source = f"fitted on {int(stats.sums['images'])} validation images"
    else:  # no validation split: fit on (up to 10,000) training images, and say so
        n = min(10000, rs.loader.n)
        stats = fit(
            data_lib.ImageSet("train", rs.loader.images[:n].cpu(), rs.loader.labels[:n].cpu())
        )
        source = f"fitted on {n} training images (no validation split)"
    return {"eval_log_sigma": stats.fitted_log_sigma(), "eval_sigma_source": source}


def train(cfg: Any, stop: StopRequest | None = None) -> Path:
    """Train one model described by a RunConfig; return the path of its final checkpoint."""
    return run_training(cfg, stop)[0]


def run_training(cfg: Any, stop: StopRequest | None = None) -> tuple[Path, torch.nn.Module]:
    """train(cfg), also returning this rank's trained (unwrapped) model.

    Writes ``<run_dir>/config.yaml``, ``checkpoints/step_*.pt`` (every
    train.checkpoint_every_steps and at every epoch end; the newest train.keep_checkpoints kept),
    ``checkpoints/final.pt`` when done, and ``logs/metrics.csv`` + ``logs/tensorboard/``. Once
    final.pt is written rank 0 removes the step checkpoints, unless
    train.keep_step_checkpoints.
    Resumes from the newest step checkpoint; returns at once if a readable final.pt exists
    (an unreadable one is renamed aside and training resumes).
    """
    check_run(cfg)
    ckpt_dir = prepare_run_dir(cfg) / "checkpoints"
    final_path = ckpt_dir / ckpt_io.FINAL_NAME
    if final_path.exists():
        try:
            state = model_ckpt.load(final_path)
        except ckpt_io.CheckpointError as err:
            aside = ckpt_io.set_aside(final_path, "unreadable")
            print(f"warning: {err}; moved to {aside.name}, training resumes", file=sys.stderr)
        else:
            check_checkpoint_matches(final_path, state, cfg)
            model = model_for(cfg)
            model.load_state_dict(state["model"])
            return final_path, model
    rs = resume_or_init(cfg)
    try:
        while rs.epoch < cfg.train.epochs:
            train_one_epoch(rs, stop)
    finally:
        if rs.log is not None:
            rs.log.close()
    rs.watch.check(ckpt_dir)
    rs.extra.update(_eval_sigma(rs))
    save_checkpoint(rs, final_path, final=True)
    if rs.main and not cfg.train.get("keep_step_checkpoints", False):
        ckpt_io.drop_step_checkpoints(ckpt_dir)  # final.pt is whole: nothing resumes from them
    return final_path, rs.unwrapped
