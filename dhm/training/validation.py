"""The validation split, used: per-epoch metrics, the closed-form sigma fit, image grids.

``validation_pass`` runs the model in eval mode over fixed blocks of the validation images
(a rank of a DDP job takes blocks r, r + W, ...; the caller reduces the sums) and returns
sums from which accuracy, NLL, -ELBO and the maximum-likelihood sigma follow. For a Gaussian
observation model with one sigma, the ELBO is maximised in closed form by sigma^2 = the mean
squared reconstruction error over images and elements (the KL does not depend on sigma): that
is how a model trained with a fixed sigma or the thesis objective gets a proper likelihood
bound at evaluation (``fitted_log_sigma``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dhm.data import loaders as data_lib
from dhm.model.objectives import gaussian_kl, gaussian_log_likelihood, wide

SUMS = ("images", "labelled", "correct", "nll", "kl", "rec_nll", "sse", "elements")


@dataclass
class ValStats:
    """Sums over the validation images of one pass (every rank's, once reduced)."""

    sums: dict[str, float]  # SUMS
    learned_sigma: bool  # the model's own sigma is learned (else the fitted one is reported)

    def fitted_log_sigma(self) -> float | None:
        """log of the sigma that maximises the ELBO on these images (None: no VAE)."""
        if not self.sums["elements"]:
            return None
        return 0.5 * math.log(max(self.sums["sse"] / self.sums["elements"], 1e-30))

    def metrics(self) -> dict[str, float]:
        """val_accuracy, val_nll (nats), val_neg_elbo (nats per image) and val_sigma_fitted
        (the closed-form sigma on these images) where available."""
        s, out = self.sums, {}
        if s["labelled"]:
            out["val_accuracy"] = s["correct"] / s["labelled"]
            out["val_nll"] = s["nll"] / s["labelled"]
        if s["elements"]:
            n, d = s["images"], s["elements"] / s["images"]
            if self.learned_sigma:
                rec = s["rec_nll"] / n
            else:  # the closed form at the fitted sigma: D/2 (log(2 pi sigma^2) + 1)
                rec = 0.5 * d * (math.log(2 * math.pi) + 2 * self.fitted_log_sigma() + 1)
            out["val_neg_elbo"] = rec + s["kl"] / n
            out["val_sigma_fitted"] = math.exp(self.fitted_log_sigma())
        return out


def validation_set(cfg: Any, max_images: int | None) -> data_lib.ImageSet | None:
    """The run's validation split (the first ``max_images`` of it), None when it is empty."""
    d = cfg.data
    val = data_lib.load_split(
        d.name, d.root, "val", download=d.download, val_size=d.val_size, split_seed=d.split_seed
    )
    if len(val) == 0:
        return None
    if max_images is not None and len(val) > max_images:
        val = data_lib.ImageSet(val.name, val.images[:max_images], val.labels[:max_images])
    return val


def block_noise(seed: int, block: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal VAE noise of one evaluation block, drawn on the CPU."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + block)
    return torch.randn(shape, generator=g)


@torch.no_grad()
def validation_pass(
    model: Any,
    data: data_lib.ImageSet,
    batch_size: int,
    device: torch.device,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    reduce: Any = None,
) -> ValStats:
    """Sums over this rank's blocks of ``data``, added over ranks by ``reduce`` (a function of
    a tensor, e.g. Accelerate's sum-reduce) when given. Leaves the model in eval mode."""
    model.eval()
    acc = torch.zeros(len(SUMS), dtype=torch.float64, device=device)  # read once, at the end
    batches = data_lib.iterate_batches(data, batch_size, device=device)
    for block, (_, x, y) in enumerate(batches):
        if block % world_size != rank:
            continue
        eps = None
        if model.has_vae:
            eps = block_noise(seed, block, (1, x.shape[0], model.fc_mu.out_features))
            eps = eps.to(device=device, dtype=x.dtype)
        out = model(x, eps=eps)
        part = dict.fromkeys(SUMS, torch.zeros((), device=device))
        part["images"] = torch.tensor(float(x.shape[0]), device=device)
        if out.logits is not None:
            logits = wide(out.logits)
            part["labelled"] = part["images"]
            part["correct"] = (logits.argmax(1) == y).sum()
            part["nll"] = F.cross_entropy(logits, y, reduction="sum")
        if out.mu is not None:
            recon, target = wide(out.recon[0]), wide(out.target)
            part["sse"] = (recon - target).square().sum()
            part["elements"] = torch.tensor(float(target.numel()), device=device)
            part["rec_nll"] = -gaussian_log_likelihood(target, recon, out.log_sigma).sum()
            part["kl"] = gaussian_kl(out.mu, out.logvar).sum()
        acc += torch.stack([part[k].double() for k in SUMS])
    if reduce is not None:
        acc = reduce(acc)
    sums = dict(zip(SUMS, acc.tolist(), strict=True))
    learned = bool(model.has_vae and model.log_sigma.requires_grad)
    return ValStats(sums, learned_sigma=learned)


@torch.no_grad()
def image_grids(
    model: Any, images: torch.Tensor, *, seed: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """uint8 [n, 3, 32, 32] each: ``inputs``, their ``recon`` (decoder mean at z = mu) and
    ``samples`` from the prior (n draws of z ~ N(0, I)); {} unless the VAE models images."""
    if not model.has_vae or model.split:
        return {}
    model.eval()
    x = images.to(device).to(torch.get_default_dtype()).div(255)
    eps = torch.zeros((1, x.shape[0], model.fc_mu.out_features), device=device, dtype=x.dtype)
    recon = model(x, eps=eps).recon[0]
    z = block_noise(seed, 0, (x.shape[0], model.fc_mu.out_features)).to(device, x.dtype)
    samples = model.decoder(z)

    def to_uint8(t: torch.Tensor) -> torch.Tensor:
        return wide(t).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()

    return {"inputs": images.cpu(), "recon": to_uint8(recon), "samples": to_uint8(samples)}
