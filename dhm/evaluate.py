"""evaluate(cfg, checkpoint, shard) -> one HDF5 shard: logits, ELBO/IWAE and FGSM per image.

A shard is (set, index range) of the in-distribution test set (role "id": logits, labels,
-ELBO, -IWAE, FGSM predictions) or of an OOD set (role "ood": logits, -ELBO, -IWAE). The model
runs in eval mode (no dropout, BatchNorm running statistics) and the VAE noise of image i is a
function of (eval.seed, i), so the union of shards is identical whatever the split.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dhm import checkpoint as ckpt_io
from dhm import data as data_lib
from dhm import provenance, results
from dhm.attacks import fgsm_predictions
from dhm.config import from_yaml, to_yaml
from dhm.model import DeepHybridModel, build_model
from dhm.nets import encoder_stage_shape
from dhm.objectives import (
    diag_gaussian_log_prob,
    gaussian_kl,
    gaussian_log_likelihood,
    standard_normal_log_prob,
)

NOISE_BLOCK = 256  # images per block of pre-drawn VAE noise
# Cap on images x samples per decoder call. A GPU wants large calls (2048 bounds memory); on a
# CPU, calls of 256 stay in cache and ran ~2x faster than 2048 (k = 10 and 100, width 8).
DECODER_IMAGES = {"cuda": 2048, "cpu": 256}


@dataclass(frozen=True)
class ShardSpec:
    set_name: str
    role: str  # "id" | "ood"
    start: int
    stop: int
    set_size: int

    @property
    def filename(self) -> str:
        return results.shard_name(self.set_name, self.start, self.stop)


def eval_sets(cfg: Any) -> list[tuple[str, str]]:
    """(set name, role) pairs: the in-distribution test set, then the OOD sets."""
    ood = cfg.eval.ood_sets or cfg.data.ood_sets or data_lib.DATASETS[cfg.data.name].ood_sets
    return [(cfg.data.name, "id")] + [(name, "ood") for name in ood]


def load_eval_set(cfg: Any, set_name: str, role: str) -> data_lib.ImageSet:
    if role == "id":
        data = data_lib.load_split(set_name, cfg.data.root, "test", download=cfg.data.download)
    else:
        data = data_lib.load_ood(set_name, cfg.data.root, download=cfg.data.download)
    if cfg.eval.max_images is not None and len(data) > cfg.eval.max_images:
        data = data_lib.ImageSet(
            data.name, data.images[: cfg.eval.max_images], data.labels[: cfg.eval.max_images]
        )
    return data


def eval_id(cfg: Any) -> str:
    """10 hex chars identifying the eval settings that change a shard's contents or range."""
    e = cfg.eval
    key = {
        "iwae_k": sorted(int(k) for k in e.iwae_k),
        "fgsm_eps": [float(x) for x in e.fgsm_eps],
        "seed": int(e.seed),
        "max_images": e.max_images,
        "shard_size": int(e.shard_size),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def shard_eval_id(path: str | Path) -> str | None:
    """The eval_id a shard file was written with (None if unreadable or absent)."""
    try:
        value = results.read_attrs(path, ["eval_id"]).get("eval_id")
    except (OSError, KeyError, ValueError):
        return None
    return value.decode() if isinstance(value, bytes) else value


def plan_shards(cfg: Any, set_name: str, role: str, set_size: int) -> list[ShardSpec]:
    """Index ranges of one set: eval.shard_size images each (0 = the whole set)."""
    size = cfg.eval.shard_size or set_size
    return [
        ShardSpec(set_name, role, start, min(start + size, set_size), set_size)
        for start in range(0, set_size, size)
    ]


class _Noise:
    """Standard-normal VAE noise per image index, drawn in fixed blocks of NOISE_BLOCK images."""

    def __init__(self, seed: int, k: int, latent_dim: int):
        self.seed, self.k, self.dim = seed, k, latent_dim
        self._cache: dict[int, torch.Tensor] = {}

    def _block(self, b: int) -> torch.Tensor:
        if b not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            self._cache = {b: torch.randn((self.k, NOISE_BLOCK, self.dim), generator=g)}
        return self._cache[b]

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        """[k, B, D] noise for image indices [B] (CPU)."""
        idx = indices.cpu()
        out = torch.empty((self.k, len(idx), self.dim))
        for b in torch.unique(idx // NOISE_BLOCK).tolist():
            sel = (idx // NOISE_BLOCK) == b
            out[:, sel] = self._block(b)[:, idx[sel] % NOISE_BLOCK]
        return out


def _bounds(
    model: DeepHybridModel, x: torch.Tensor, eps: torch.Tensor, ks: list[int]
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Logits (or None), -ELBO [B] and {k: -IWAE_k [B]} for one batch with noise [kmax, B, D].

    -ELBO uses beta = 1 and averages the reconstruction term over the kmax samples. The decoder
    sees sub-batches of at most DECODER_IMAGES[device type] images x samples, each in one call.
    """
    kmax = eps.shape[0]
    per_call = max(1, DECODER_IMAGES.get(x.device.type, DECODER_IMAGES["cuda"]) // kmax)
    logits, neg_elbo, log_w = [], [], []
    for s in range(0, x.shape[0], per_call):
        out = model(x[s : s + per_call], eps=eps[:, s : s + per_call].to(x.device))
        k, b = out.recon.shape[:2]
        target = out.target.unsqueeze(0).expand(k, *out.target.shape)
        log_px = gaussian_log_likelihood(
            target.reshape(k * b, *out.target.shape[1:]),
            out.recon.reshape(k * b, *out.recon.shape[2:]),
            out.log_sigma,
        ).view(k, b)
        neg_elbo.append(-log_px.mean(0) + gaussian_kl(out.mu, out.logvar))
        log_qz = diag_gaussian_log_prob(out.z, out.mu.unsqueeze(0), out.logvar.unsqueeze(0))
        log_w.append(log_px + standard_normal_log_prob(out.z) - log_qz)
        if out.logits is not None:
            logits.append(out.logits)
    log_w_all = torch.cat(log_w, 1)
    iwae = {k: -(torch.logsumexp(log_w_all[:k], 0) - math.log(k)) for k in ks}
    return (torch.cat(logits) if logits else None), torch.cat(neg_elbo), iwae


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[DeepHybridModel, Any]:
    """The model of a checkpoint, in eval mode on ``device``, and its resolved config."""
    state = ckpt_io.load(checkpoint)
    cfg = from_yaml(state["config_yaml"])
    info = data_lib.DATASETS[cfg.data.name]
    model = build_model(cfg.model, info.num_classes, info.mean, info.std)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ckpt_io.CheckpointError(
            f"{checkpoint}: weights do not fit its config: {err}"
        ) from None
    return model.to(device).eval(), cfg


def evaluate(
    cfg: Any,
    checkpoint: str | Path,
    shard: ShardSpec,
    run_id: str = "",
    extra_attrs: dict[str, Any] | None = None,
) -> Path:
    """Evaluate one shard of one checkpoint into ``<run_dir>/eval/<shard file>``; return its path.

    ``cfg`` supplies run_dir, data.root and eval settings; the model comes from the checkpoint.
    An existing complete file is kept and returned (evaluation is deterministic).
    """
    out_path = Path(cfg.run_dir) / "eval" / shard.filename
    if out_path.exists():
        if shard_eval_id(out_path) == eval_id(cfg):
            return out_path
        raise results.ShardError(
            f"{out_path} was written with other eval settings (eval_id "
            f"{shard_eval_id(out_path)}, now {eval_id(cfg)}); relaunching moves it to eval-stale/"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, train_cfg = load_model(checkpoint, device)
    data = load_eval_set(cfg, shard.set_name, shard.role)
    if len(data) != shard.set_size:
        raise ValueError(f"{shard.set_name} has {len(data)} images, the plan said {shard.set_size}")
    ks = sorted(set(int(k) for k in cfg.eval.iwae_k))
    noise = _Noise(cfg.eval.seed, max(ks), train_cfg.model.latent_dim) if model.has_vae else None
    eps_grid = [float(e) for e in cfg.eval.fgsm_eps]
    cols: dict[str, list[torch.Tensor]] = {}

    def add(key: str, value: torch.Tensor) -> None:
        cols.setdefault(key, []).append(value.detach().cpu())

    batches = data_lib.iterate_batches(
        data, cfg.eval.batch_size, device=device, start=shard.start, stop=shard.stop
    )
    for indices, x, y in batches:
        add("indices", indices)
        if shard.role == "id":
            add("labels", y)
        with torch.no_grad():
            if model.has_vae:
                logits, neg_elbo, iwae = _bounds(model, x, noise(indices), ks)
                add("neg_elbo", neg_elbo)
                for k, value in iwae.items():
                    add(f"neg_iwae_k{k}", value)
            else:
                logits = model.classify(x)
        if logits is not None:
            add("logits", logits.float())
        if shard.role == "id" and model.has_head and eps_grid:
            add("fgsm/pred", fgsm_predictions(model.classify, x, y, eps_grid).T)

    arrays: dict[str, np.ndarray] = {}
    for key, parts in cols.items():
        value = torch.cat(parts).numpy()
        if key == "fgsm/pred":
            value = value.T.astype(np.int16)  # [E, N]
        elif value.dtype == np.float64:
            value = value.astype(np.float32)
        arrays[key] = value
    if "fgsm/pred" in arrays:
        arrays["fgsm/eps"] = np.asarray(eps_grid, dtype=np.float32)
        arrays["fgsm/accuracy"] = (arrays["fgsm/pred"] == arrays["labels"][None]).mean(1)
    attrs = {
        "role": shard.role,
        "set_size": shard.set_size,
        "start": shard.start,
        "stop": shard.stop,
        "run_id": run_id or Path(cfg.run_dir).name,
        "model": train_cfg.model.name,
        "config_yaml": to_yaml(train_cfg),
        "eval_config_yaml": to_yaml(cfg.eval),
        "eval_id": eval_id(cfg),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": ckpt_io.sha256(checkpoint),
        # Dimensions of what the likelihood covers (image or split-layer activations): bits/dim.
        "num_dims": math.prod(encoder_stage_shape(model.split, train_cfg.model.width))
        if model.has_vae
        else 0,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **provenance.record(),
        **(extra_attrs or {}),
    }
    return results.write_shard(out_path, shard.set_name, arrays, attrs)


def evaluate_set(
    cfg: Any,
    checkpoint: str | Path,
    set_name: str,
    role: str,
    run_id: str = "",
    extra_attrs: dict[str, Any] | None = None,
) -> list[Path]:
    """Evaluate every shard of one set (skipping complete ones); the eval stage's unit of work."""
    size = len(load_eval_set(cfg, set_name, role))
    return [
        evaluate(cfg, checkpoint, s, run_id, extra_attrs)
        for s in plan_shards(cfg, set_name, role, size)
    ]


def evaluate_all(cfg: Any, checkpoint: str | Path, run_id: str = "") -> list[Path]:
    """Every set of a run: the local (single process) path."""
    return [
        p
        for name, role in eval_sets(cfg)
        for p in evaluate_set(cfg, checkpoint, name, role, run_id)
    ]
