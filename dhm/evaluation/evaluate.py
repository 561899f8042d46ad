"""evaluate(cfg, checkpoint, shard) -> one HDF5 shard: logits, bounds and attacks per image.

A shard is (set, index range) of a set in one of three roles:

* ``id``, the in-distribution test set: logits, labels, -ELBO, -IWAE, the importance weights'
  effective sample size, compressed size, FGSM and PGD predictions, and (in the shard holding
  image 0) a few test images with their reconstructions and prior samples;
* ``val``, the validation split of the training set: logits and labels, for temperature
  scaling (models with a classifier);
* ``ood``: logits, -ELBO, -IWAE, effective sample size, compressed size.

The model runs in eval mode (no dropout, BatchNorm running statistics). Batches are fixed
blocks of the set (``dhm.data.loaders.iterate_batches``) and a shard is a union of whole blocks; the
VAE noise and the dequantization noise of image i are functions of (eval.seed, i), and PGD's
random start of (eval.seed, block): so the union of shards is identical bit for bit however a
set is split.

Likelihoods (docs/results.md): the Gaussian observation model with the model's learned sigma,
or, for a model trained with a fixed sigma or the thesis objective, the sigma fitted in closed
form on the validation split (``dhm.training.validation``), recorded in the shard's attributes. For
``vae_split_layer = 0`` the target is the 8-bit image uniformly dequantized on its own pixel
grid, y = (x + u - 1/2) / 255, u ~ U[0, 1)^D, so -ELBO(y) + D ln 255 bounds the discrete
image's negative log-likelihood (bits/dim). For s >= 1 the target is the classifier's
activations entering stage s (nats per dimension; no bits).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dhm.core import checkpoint as ckpt_io
from dhm.core import provenance
from dhm.core import variants as V
from dhm.core.config import from_yaml, to_yaml
from dhm.core.layout import eval_sets
from dhm.data import loaders as data_lib
from dhm.evaluation import results
from dhm.evaluation.attacks import fgsm_predictions, pgd_predictions
from dhm.evaluation.results import shard_eval_id
from dhm.model import checkpoint as model_ckpt
from dhm.model.hybrid import DeepHybridModel, build_model
from dhm.model.nets import encoder_stage_shape
from dhm.model.objectives import (
    diag_gaussian_log_prob,
    effective_sample_size,
    gaussian_kl,
    gaussian_log_likelihood,
    standard_normal_log_prob,
)
from dhm.training import validation as val_lib

NOISE_BLOCK = 256  # images per block of pre-drawn per-image noise
# Cap on images x samples per decoder call. A GPU wants large calls (2048 bounds memory); on a
# CPU, calls of 256 stay in cache (docs/performance.md).
DECODER_IMAGES = {"cuda": 2048, "cpu": 256}
PIXEL_LEVELS = 255  # the model's pixel grid: x / 255, spacing 1/255


@dataclass(frozen=True)
class ShardSpec:
    set_name: str
    role: str  # "id" | "val" | "ood"
    start: int
    stop: int
    set_size: int
    part: str = "scores"  # scores | attacks (dhm.core.variants)
    checkpoint: Any = V.FINAL  # final | an epoch of train.keep_epochs

    @property
    def filename(self) -> str:
        return results.shard_name(self.set_name, self.start, self.stop)

    def path(self, cfg: Any, model: str) -> Path:
        """<run_dir>/eval/<checkpoint>-<part>-<part id>/<file> (dhm.core.variants)."""
        folder = V.part_folder(
            V.settings_of(cfg.eval), self.checkpoint, self.role, self.part, model
        )
        return Path(cfg.run_dir) / "eval" / folder / self.filename


def load_eval_set(cfg: Any, set_name: str, role: str) -> data_lib.ImageSet:
    d = cfg.data
    if role == "id":
        data = data_lib.load_split(set_name, d.root, "test", download=d.download)
    elif role == "val":
        data = data_lib.load_split(
            d.name, d.root, "val", download=d.download, val_size=d.val_size, split_seed=d.split_seed
        )
    else:
        data = data_lib.load_ood(set_name, d.root, download=d.download)
    if cfg.eval.max_images is not None and len(data) > cfg.eval.max_images:
        data = data_lib.ImageSet(
            data.name, data.images[: cfg.eval.max_images], data.labels[: cfg.eval.max_images]
        )
    return data


def plan_shards(
    cfg: Any,
    set_name: str,
    role: str,
    set_size: int,
    part: str = "scores",
    checkpoint: Any = V.FINAL,
) -> list[ShardSpec]:
    """Index ranges of one set: eval.shard_size images each (0 = the whole set)."""
    size = cfg.eval.shard_size or set_size
    return [
        ShardSpec(set_name, role, start, min(start + size, set_size), set_size, part, checkpoint)
        for start in range(0, set_size, size)
    ]


class _PerImage:
    """Noise per image index, drawn in fixed blocks of NOISE_BLOCK images: image i gets the
    same values whatever batch or shard it is evaluated in."""

    def __init__(self, seed: int, tag: int, shape: tuple[int, ...], uniform: bool = False):
        self.seed, self.tag, self.shape, self.uniform = seed, tag, shape, uniform
        self._cache: dict[int, torch.Tensor] = {}

    def _block(self, b: int) -> torch.Tensor:
        if b not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + b * 31 + self.tag)
            size = (NOISE_BLOCK, *self.shape)
            values = (
                torch.rand(size, generator=g) if self.uniform else torch.randn(size, generator=g)
            )
            self._cache = {b: values}
        return self._cache[b]

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, *shape] noise for image indices [B] (CPU)."""
        idx = indices.cpu()
        out = torch.empty((len(idx), *self.shape))
        for b in torch.unique(idx // NOISE_BLOCK).tolist():
            sel = (idx // NOISE_BLOCK) == b
            out[sel] = self._block(b)[idx[sel] % NOISE_BLOCK]
        return out


def _bounds(
    model: DeepHybridModel,
    x: torch.Tensor,
    eps: torch.Tensor,
    ks: list[int],
    target: torch.Tensor | None,
    trained_log_sigma: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """For one batch with noise eps [kmax, B, D]: logits (if any), -ELBO [B], -IWAE_k [B] for
    each k, and the effective sample size [B] of the kmax importance weights, under the model's
    (evaluation) sigma; with ``trained_log_sigma``, also ``trained_neg_elbo`` and
    ``trained_neg_iwae_k<k>`` under that sigma, from the same decoder outputs.

    ``target`` replaces the model's reconstruction target (the dequantized image); -ELBO uses
    beta = 1 and averages the reconstruction term over the kmax samples. The decoder sees
    sub-batches of at most DECODER_IMAGES[device type] images x samples, each in one call.
    """
    kmax = eps.shape[0]
    per_call = max(1, DECODER_IMAGES.get(x.device.type, DECODER_IMAGES["cuda"]) // kmax)
    sigmas = {"": None} if trained_log_sigma is None else {"": None, "trained_": trained_log_sigma}
    logits, neg_elbo, log_w = [], {p: [] for p in sigmas}, {p: [] for p in sigmas}
    for s in range(0, x.shape[0], per_call):
        out = model(x[s : s + per_call], eps=eps[:, s : s + per_call].to(x.device, x.dtype))
        tgt = out.target if target is None else target[s : s + per_call]
        k, b = out.recon.shape[:2]
        tgt_k = tgt.unsqueeze(0).expand(k, *tgt.shape).reshape(k * b, *tgt.shape[1:])
        recon = out.recon.reshape(k * b, *out.recon.shape[2:])
        kl = gaussian_kl(out.mu, out.logvar)
        log_qz = diag_gaussian_log_prob(out.z, out.mu.unsqueeze(0), out.logvar.unsqueeze(0))
        log_pz = standard_normal_log_prob(out.z)
        for prefix, log_sigma in sigmas.items():
            if log_sigma is None:
                log_sigma = out.log_sigma
            log_px = gaussian_log_likelihood(tgt_k, recon, log_sigma).view(k, b)
            neg_elbo[prefix].append(-log_px.mean(0) + kl)
            log_w[prefix].append(log_px + log_pz - log_qz)
        if out.logits is not None:
            logits.append(out.logits)
    found = {}
    for prefix in sigmas:
        lw = torch.cat(log_w[prefix], 1)
        for k in ks:
            found[f"{prefix}neg_iwae_k{k}"] = -(torch.logsumexp(lw[:k], 0) - math.log(k))
        found[f"{prefix}neg_elbo"] = torch.cat(neg_elbo[prefix])
        if not prefix:
            found["iwae_ess"] = effective_sample_size(lw)
    if logits:
        found["logits"] = torch.cat(logits)
    return found


def dequantize(raw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Uniformly dequantized pixels on the model's grid: (x + u - 1/2) / 255 for uint8 x and
    u in [0, 1), so pixel value k covers [(k - 1/2)/255, (k + 1/2)/255), a cell of width 1/255
    centred on k/255, the value the model sees. Then -log P(x) <= E_u[-log p(y)] + D ln 255."""
    return (raw.to(u.dtype) + u - 0.5) / PIXEL_LEVELS


def compressed_bits(images: torch.Tensor) -> np.ndarray:
    """Length in bits of each uint8 image [B, 3, H, W] as a PNG (zlib level 9): the lossless
    compressor of Serra et al. (2020)'s input-complexity score."""
    from PIL import Image

    out = np.empty(len(images), np.float32)
    for i, img in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=9)
        out[i] = 8 * buf.tell()
    return out


def eval_device(choice: str) -> torch.device:
    """The device of eval.device: cpu, cuda (ValueError when there is none), auto (either)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("eval.device='cuda' is not allowed: no CUDA device is visible")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[DeepHybridModel, Any, dict]:
    """The model of a checkpoint in eval mode on ``device``, its resolved config, and its
    stored evaluation sigma (``eval_log_sigma``, ``eval_sigma_source``) if any."""
    state = model_ckpt.load(checkpoint)
    cfg = from_yaml(state["config_yaml"])
    info = data_lib.dataset_info(cfg.data.name)
    model = build_model(cfg.model, info.num_classes, info.mean, info.std)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ckpt_io.CheckpointError(
            f"{checkpoint}: weights do not fit its config: {err}"
        ) from None
    sigma = {k: state[k] for k in ("eval_log_sigma", "eval_sigma_source") if k in state}
    return model.to(device).eval(), cfg, sigma


def _set_eval_sigma(
    model: DeepHybridModel, cfg: Any, train_cfg: Any, stored: dict
) -> tuple[str, str, torch.Tensor | None]:
    """Give the model the sigma evaluation's headline bounds use; return where it came from,
    which it is (``bound_sigma``: "fitted", "trained" or "fixed"; "" without a VAE) and, when
    the headline sigma is fitted and the model's own was learned, the trained log sigma shaped
    like ``observation_log_sigma`` (its bounds go beside), else None.

    The fitted sigma is the closed form on the validation split, stored in final.pt at the end
    of training (``eval_log_sigma``) for every sigma option. A checkpoint from before that:
    a learned sigma is used as trained, as it was then, so every shard of the run agrees with
    those already written; a fixed or thesis one is fitted now, as it was then.
    """
    if not model.has_vae:
        return "", "", None
    learned = model.log_sigma.requires_grad
    if stored.get("eval_log_sigma") is not None:
        trained = model.observation_log_sigma().detach().clone() if learned else None
        log_sigma, source = float(stored["eval_log_sigma"]), stored["eval_sigma_source"]
    elif learned:  # final.pt from before 2026-12-07
        return "learned (a checkpoint from before fitted sigmas)", "trained", None
    else:
        val = val_lib.validation_set(train_cfg.copy(), 10000)
        if val is None:
            value = math.exp(float(model.log_sigma))
            return f"fixed at {value:.4g} (no validation split)", "fixed", None
        device = model.log_sigma.device
        stats = val_lib.validation_pass(
            model, val, cfg.eval.batch_size, device, seed=train_cfg.train.seed
        )
        log_sigma, trained = stats.fitted_log_sigma(), None
        source = f"fitted at evaluation on {int(stats.sums['images'])} validation images"
    with torch.no_grad():
        model.log_sigma.fill_(log_sigma)
    return source, "fitted", trained


def evaluate(
    cfg: Any,
    checkpoint: str | Path,
    shard: ShardSpec,
    run_id: str = "",
    extra_attrs: dict[str, Any] | None = None,
) -> Path:
    """Evaluate one part of one shard of one checkpoint into its file (``ShardSpec.path``);
    return its path.

    ``cfg`` supplies run_dir, data.root and eval settings; the model comes from the checkpoint.
    An existing complete file is kept and returned (evaluation is deterministic, and the
    folder's part id names the settings that made it).
    """
    out_path = shard.path(cfg, cfg.model.name)
    pid = out_path.parent.name.rsplit("-", 1)[-1]
    if out_path.exists():
        if shard_eval_id(out_path) == pid:
            return out_path
        raise results.ShardError(
            f"{out_path} was not written for its folder (eval_id {shard_eval_id(out_path)}, "
            f"the folder's part id {pid}): move it aside to evaluate it again"
        )
    device = eval_device(cfg.eval.device)
    model, train_cfg, stored = load_model(checkpoint, device)
    train_cfg.data.root, train_cfg.data.download = cfg.data.root, cfg.data.download
    sigma_source, bound, trained = _set_eval_sigma(model, cfg, train_cfg, stored)
    data = load_eval_set(cfg, shard.set_name, shard.role)
    if len(data) != shard.set_size:
        raise ValueError(f"{shard.set_name} has {len(data)} images, the plan said {shard.set_size}")
    arrays = _evaluate_arrays(cfg, model, data, shard, device, trained)
    attrs = {
        "role": shard.role,
        "set_size": shard.set_size,
        "start": shard.start,
        "stop": shard.stop,
        "run_id": run_id or Path(cfg.run_dir).name,
        "model": train_cfg.model.name,
        "config_yaml": to_yaml(train_cfg),
        "eval_config_yaml": to_yaml(cfg.eval),
        "eval_id": pid,  # the part id: the settings this part depends on
        "part": shard.part,
        "checkpoint_name": str(shard.checkpoint),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": ckpt_io.sha256(checkpoint),
        # Dimensions the likelihood covers (image or split-layer activations), and what it is.
        "num_dims": math.prod(encoder_stage_shape(model.split, train_cfg.model.width))
        if model.has_vae
        else 0,
        "likelihood_space": (
            "" if not model.has_vae else "activations" if model.split else "pixels-dequantized"
        ),
        "pixel_levels": PIXEL_LEVELS,
        # The sigma of the headline bounds (neg_elbo, neg_iwae_k*), where it came from, and
        # ("fitted" or "trained") which one it is; a learned sigma's own bounds are the
        # trained_* columns, under trained_sigma.
        "sigma": [math.exp(v) for v in model.log_sigma.flatten().tolist()] if model.has_vae else [],
        "sigma_source": sigma_source,
        "bound_sigma": bound,
        "trained_sigma": []
        if trained is None
        else [math.exp(v) for v in trained.flatten().tolist()],
        "training_likelihood": train_cfg.model.likelihood,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **provenance.record(),
        **(extra_attrs or {}),
    }
    return results.write_shard(out_path, shard.set_name, arrays, attrs)


def _likelihood_columns(
    model: DeepHybridModel,
    data: data_lib.ImageSet,
    indices: torch.Tensor,
    x: torch.Tensor,
    noise: _PerImage,
    dequant: _PerImage | None,
    ks: list[int],
    trained_log_sigma: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One batch's VAE columns: ``complexity_bits`` [B] (PNG length in bits, pixel-space VAEs
    only), then ``_bounds``' -ELBO [B] and -IWAE_k [B] (nats), ``iwae_ess`` [B] and, with a
    classifier head, ``logits`` [B, classes] in float32. ``x`` [B, 3, H, W] is on the model's
    device; the reconstruction target of a pixel-space VAE is the dequantized image."""
    found: dict[str, torch.Tensor] = {}
    target = None
    if dequant is not None:
        raw = data.images[indices.cpu()].to(x.device, x.dtype)
        target = (raw + dequant(indices).to(x.device, x.dtype) - 0.5) / PIXEL_LEVELS
        found["complexity_bits"] = torch.from_numpy(compressed_bits(data.images[indices.cpu()]))
    eps = noise(indices).transpose(0, 1)
    for key, value in _bounds(model, x, eps, ks, target, trained_log_sigma).items():
        found[key] = value.float() if key == "logits" else value
    return found


def _attack_columns(
    model: DeepHybridModel,
    indices: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_grid: list[float],
    e: Any,
) -> dict[str, torch.Tensor]:
    """One batch's predictions under attack, [B, E] for the E epsilons of ``eps_grid``:
    ``fgsm/pred`` and, when eval.pgd_steps > 0, ``pgd/pred`` (its random start seeded by
    (eval.seed, block), started from the FGSM predictions)."""
    fgsm = fgsm_predictions(model.classify, x, y, eps_grid)
    found = {"fgsm/pred": fgsm.T}
    if e.pgd_steps:
        block = int(indices[0]) // e.batch_size
        pgd = pgd_predictions(
            model.classify,
            x,
            y,
            eps_grid,
            e.pgd_steps,
            e.pgd_step_size,
            seed=e.seed * 1_000_003 + block,
            fgsm_pred=fgsm,
        )
        found["pgd/pred"] = pgd.T
    return found


def _stack_columns(
    cols: dict[str, list[Any]], eps_grid: list[float], pgd_steps: int
) -> dict[str, np.ndarray]:
    """The shard's arrays from per-batch columns: concatenated over batches [N, ...], float64
    stored as float32, attack predictions transposed to int16 [E, N] with their ``eps`` [E] and
    ``accuracy`` [E] (and ``pgd/steps``)."""
    arrays: dict[str, np.ndarray] = {}
    for key, parts in cols.items():
        value = torch.cat(parts).numpy()
        if key.endswith("/pred"):
            value = value.T.astype(np.int16)  # [E, N]
        elif value.dtype == np.float64:
            value = value.astype(np.float32)
        arrays[key] = value
    for kind in ("fgsm", "pgd"):
        if f"{kind}/pred" in arrays:
            arrays[f"{kind}/eps"] = np.asarray(eps_grid, dtype=np.float32)
            arrays[f"{kind}/accuracy"] = (arrays[f"{kind}/pred"] == arrays["labels"][None]).mean(1)
    if "pgd/pred" in arrays:
        arrays["pgd/steps"] = np.asarray(pgd_steps, dtype=np.int64)
    return arrays


def _evaluate_arrays(
    cfg: Any,
    model: DeepHybridModel,
    data: data_lib.ImageSet,
    shard: ShardSpec,
    device: torch.device,
    trained_log_sigma: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Every array of one shard (N = shard.stop - shard.start images): ``indices`` and, except
    for OOD sets, ``labels`` [N]; the likelihood columns (``_likelihood_columns``) of a model
    with a VAE outside the ``val`` role, else its ``logits`` [N, classes]; attacks on the ID set
    (``_attack_columns``); and in the ID shard holding image 0, ``images/*`` grids."""
    e = cfg.eval
    scores = shard.part == "scores"
    ks = sorted(set(int(k) for k in e.iwae_k))
    noise = dequant = None
    if model.has_vae:
        noise = _PerImage(e.seed, 0, (max(ks), model.fc_mu.out_features))
        if not model.split:
            dequant = _PerImage(e.seed, 1, (3, 32, 32), uniform=True)
    eps_grid = [float(v) for v in e.fgsm_eps]
    attack = shard.part == "attacks" and shard.role == "id" and model.has_head and eps_grid
    cols: dict[str, list[Any]] = {}

    def add(found: dict[str, Any]) -> None:
        for key, value in found.items():
            cols.setdefault(key, []).append(
                value.detach().cpu() if torch.is_tensor(value) else value
            )

    batches = data_lib.iterate_batches(
        data, e.batch_size, device=device, start=shard.start, stop=shard.stop
    )
    for indices, x, y in batches:
        add({"indices": indices} if shard.role == "ood" else {"indices": indices, "labels": y})
        with torch.no_grad():
            if scores and model.has_vae and shard.role != "val":
                add(
                    _likelihood_columns(
                        model, data, indices, x, noise, dequant, ks, trained_log_sigma
                    )
                )
            elif scores and model.has_head:
                add({"logits": model.classify(x).float()})
        if attack:
            add(_attack_columns(model, indices, x, y, eps_grid, e))
    arrays = _stack_columns(cols, eps_grid, e.pgd_steps)
    if scores and shard.role == "id" and shard.start == 0 and e.images:
        grids = val_lib.image_grids(model, data.images[: e.images], seed=e.seed, device=device)
        arrays.update({f"images/{k}": v.numpy() for k, v in grids.items()})
    return arrays


def evaluate_set(
    cfg: Any,
    checkpoint: str | Path,
    set_name: str,
    role: str,
    run_id: str = "",
    extra_attrs: dict[str, Any] | None = None,
    parts: tuple[str, ...] | None = None,
    checkpoint_name: Any = V.FINAL,
) -> list[Path]:
    """Evaluate ``parts`` (None: every part the set has) of every shard of one set at one
    checkpoint, skipping complete files; the eval stage's unit of work."""
    size = len(load_eval_set(cfg, set_name, role))
    if parts is None:
        parts = V.parts_of(role, cfg.model.name, V.settings_of(cfg.eval))
    return [
        evaluate(cfg, checkpoint, s, run_id, extra_attrs)
        for part in parts
        for s in plan_shards(cfg, set_name, role, size, part, checkpoint_name)
    ]


def evaluate_all(cfg: Any, checkpoint: str | Path, run_id: str = "") -> list[Path]:
    """Every set of a run at its final checkpoint: the local (single process) path."""
    return [
        p
        for name, role in eval_sets(cfg)
        for p in evaluate_set(cfg, checkpoint, name, role, run_id)
    ]
