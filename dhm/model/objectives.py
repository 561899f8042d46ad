"""Likelihoods, bounds and the hybrid loss, as tensor functions (all in nats).

Conventions: a batch dimension B comes first; a leading k dimension holds importance samples.
Inputs in bf16 (autocast) are computed in float32; float32 and float64 keep their precision.
No function loops over batch items or samples in Python.

Two VAE objectives (``model.likelihood``):

* ``gaussian``: the observation model N(target; decoder mean, sigma^2 I) over every element of
  the target (the [0,1] image for vae_split_layer 0, classifier activations otherwise), so
  -ELBO is a negative log-likelihood bound in nats per image. The training objective is the
  beta-VAE one, rec_nll + kl_coeff * KL (or the IWAE bound with the KL terms so weighted).
* ``thesis``: what the thesis code minimized, the mean squared error per element of the
  normalized image (or of the activations) plus kl_coeff times the KL averaged over latent
  dimensions. Not a likelihood and without units; kept so the thesis' beta grid is reproduced
  as it was run. docs/results.md maps its beta onto the Gaussian one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least: half types widen, float32 and float64 stay as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor | float
) -> torch.Tensor:
    """log N(x; mean, sigma^2 I), summed over all non-batch dims.

    x, mean: [B, ...] (broadcastable to each other); log_sigma: a scalar, or broadcastable to
    x's trailing dims (e.g. [C, 1, 1] for one sigma per channel). Returns [B] in nats.
    """
    x, mean = wide(x), wide(mean)
    log_sigma = wide(torch.as_tensor(log_sigma, device=x.device))
    z = (x - mean) * torch.exp(-log_sigma)
    log_p = -0.5 * z.square() - log_sigma - 0.5 * LOG_2PI
    return log_p.flatten(1).sum(1)


OPTIMAL_SIGMA_MIN = 1e-3  # floor of the batch-optimal sigma: a perfect reconstruction has no log 0.
# It never binds on images: the 8-bit grid's quantization noise alone is 1/255/sqrt(12) = 1.1e-3.


def optimal_log_sigma(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """log of the sigma that maximises the Gaussian log-likelihood of ``target`` [B, ...] under
    decoder means ``recon`` [k, B, ...]: sigma^2 = the mean squared error over samples, images and
    elements (Rybkin et al. 2021, the "optimal sigma" of the sigma-VAE). Detached: at the
    optimum the objective's derivative in sigma is zero, so the gradient through it would add
    nothing. A scalar tensor; floored at OPTIMAL_SIGMA_MIN."""
    with torch.no_grad():
        mse = (wide(recon) - wide(target).unsqueeze(0)).square().mean()
        return 0.5 * torch.log(mse.clamp_min(OPTIMAL_SIGMA_MIN**2))


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) summed over latent dims: [B, D] -> [B] nats."""
    mu, logvar = wide(mu), wide(logvar)
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)


def diag_gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dim: [..., D] -> [...] nats."""
    z, mu, logvar = wide(z), wide(mu), wide(logvar)
    return -0.5 * ((z - mu).square() * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim: [..., D] -> [...] nats."""
    z = wide(z)
    return -0.5 * (z.square() + LOG_2PI).sum(-1)


def iwae_bound(
    log_px_given_z: torch.Tensor, log_pz: torch.Tensor, log_qz_given_x: torch.Tensor
) -> torch.Tensor:
    """Importance-weighted bound (Burda et al. 2016): [k, B] inputs -> [B] nats.

    logsumexp_k(log p(x|z_k) + log p(z_k) - log q(z_k|x)) - log k. With k = 1 it is the
    single-sample ELBO; it never decreases in expectation as k grows.
    """
    log_w = log_px_given_z + log_pz - log_qz_given_x
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size (sum w)^2 / sum w^2 of importance weights: log_w [k, B] -> [B].

    1 means one sample carries all the weight (the IWAE estimate has not converged); k means
    the weights are equal.
    """
    log_w = wide(log_w)
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))


def thesis_objective(
    target: torch.Tensor,
    recon: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    kl_coeff: float,
    target_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """The thesis' VAE term per image [B]: mean over elements and the k samples of
    ((recon - target) / target_scale)^2, plus kl_coeff x the KL averaged over latent dims.

    target [B, ...]; recon [k, B, ...]; ``target_scale`` the pixel std per channel ([C, 1, 1])
    for images, so the error is the one of the normalized image the thesis code computed.
    """
    diff = (wide(recon) - wide(target).unsqueeze(0)) / torch.as_tensor(
        target_scale, device=target.device
    )
    mse = diff.square().flatten(2).mean(2).mean(0)
    return mse + kl_coeff * gaussian_kl(mu, logvar) / mu.shape[-1]


@dataclass
class VAETerms:
    """Per-image VAE quantities, each [B] (nats except ``objective`` under the thesis one)."""

    rec_nll: torch.Tensor  # -E_q log p(target|z) under the Gaussian with the model's sigma
    kl: torch.Tensor  # analytic KL(q(z|x) || p(z))
    neg_elbo: torch.Tensor  # rec_nll + kl: -ELBO with beta = 1
    objective: torch.Tensor  # what training minimizes (see vae_terms)


def vae_terms(
    target: torch.Tensor,
    recon: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    log_sigma: torch.Tensor | float,
    kl_coeff: float = 1.0,
    likelihood: str = "gaussian",
    target_scale: torch.Tensor | float = 1.0,
) -> VAETerms:
    """Reconstruction, KL, -ELBO and the training objective for one batch.

    target [B, ...]; recon [k, B, ...] decoder means for z [k, B, D]; mu, logvar [B, D].
    ``objective``: ``gaussian`` with k = 1, rec_nll + kl_coeff * KL (beta-VAE); with k > 1,
    -IWAE with kl_coeff weighting log p(z) - log q(z|x) inside the importance weights (the true
    bound only when kl_coeff = 1); ``thesis``, :func:`thesis_objective`. The -ELBO reported
    always uses beta = 1.
    """
    k, b = recon.shape[:2]
    target_k = target.unsqueeze(0).expand(k, *target.shape)
    log_px = gaussian_log_likelihood(
        target_k.reshape(k * b, *target.shape[1:]),
        recon.reshape(k * b, *recon.shape[2:]),
        log_sigma,
    ).view(k, b)
    kl = gaussian_kl(mu, logvar)
    rec_nll = -log_px.mean(0)
    if likelihood == "thesis":
        objective = thesis_objective(target, recon, mu, logvar, kl_coeff, target_scale)
    elif k > 1:
        log_pz = standard_normal_log_prob(z)
        log_qz = diag_gaussian_log_prob(z, mu.unsqueeze(0), logvar.unsqueeze(0))
        objective = -iwae_bound(log_px, kl_coeff * log_pz, kl_coeff * log_qz)
    else:
        objective = rec_nll + kl_coeff * kl
    return VAETerms(rec_nll=rec_nll, kl=kl, neg_elbo=rec_nll + kl, objective=objective)


def hybrid_loss(
    logits: torch.Tensor | None,
    labels: torch.Tensor,
    vae: VAETerms | None,
    *,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * CE + beta * (the VAE objective), batch means.

    Returns the scalar loss and a dict of detached terms (ce, accuracy, rec_nll, kl, neg_elbo,
    vae_objective, loss); a term is absent when the model lacks the branch it comes from.
    """
    terms: dict[str, torch.Tensor] = {}
    loss = torch.zeros((), device=labels.device)
    if logits is not None:
        ce = F.cross_entropy(wide(logits), labels)
        terms["ce"] = ce.detach()
        terms["accuracy"] = (logits.argmax(1) == labels).to(ce.dtype).mean()
        if alpha:
            loss = loss + alpha * ce
    if vae is not None:
        terms["rec_nll"] = vae.rec_nll.mean().detach()
        terms["kl"] = vae.kl.mean().detach()
        terms["neg_elbo"] = vae.neg_elbo.mean().detach()
        terms["vae_objective"] = vae.objective.mean().detach()
        if beta:
            loss = loss + beta * vae.objective.mean()
    terms["loss"] = loss.detach()
    return loss, terms
