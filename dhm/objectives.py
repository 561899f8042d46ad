"""Likelihoods, bounds and the hybrid loss, as tensor functions (all in nats, float32).

Conventions: a batch dimension B comes first; a leading k dimension holds importance samples.
The VAE's observation model is a Gaussian N(x; x_hat, sigma^2 I) over every element of its
target (the [0,1] image for vae_split_layer 0, classifier activations otherwise), so -ELBO is a
real negative log-likelihood bound in nats per image, unlike the thesis code's mean MSE.
No function loops over batch items or samples in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor | float
) -> torch.Tensor:
    """log N(x; mean, sigma^2 I), summed over all non-batch dims.

    x, mean: [B, ...] (broadcastable to each other); log_sigma: scalar or broadcastable to x.
    Returns [B] in nats.
    """
    x, mean = x.float(), mean.float()
    log_sigma = torch.as_tensor(log_sigma, dtype=torch.float32, device=x.device)
    z = (x - mean) * torch.exp(-log_sigma)
    log_p = -0.5 * z.square() - log_sigma - 0.5 * LOG_2PI
    return log_p.flatten(1).sum(1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) summed over latent dims: [B, D] -> [B] nats."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)


def diag_gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dim: [..., D] -> [...] nats."""
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    return -0.5 * ((z - mu).square() * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim: [..., D] -> [...] nats."""
    z = z.float()
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


@dataclass
class VAETerms:
    """Per-image VAE quantities, each [B] in nats."""

    rec_nll: torch.Tensor  # -E_q log p(x|z), mean over the k samples
    kl: torch.Tensor  # analytic KL(q(z|x) || p(z))
    neg_elbo: torch.Tensor  # rec_nll + kl: -ELBO with beta = 1
    neg_iwae: torch.Tensor | None  # -IWAE bound over the k samples (None when k = 1)


def vae_terms(
    target: torch.Tensor,
    recon: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    log_sigma: torch.Tensor | float,
    kl_coeff: float = 1.0,
) -> VAETerms:
    """Reconstruction, KL, -ELBO and -IWAE for one batch.

    target [B, ...]; recon [k, B, ...] decoder means for z [k, B, D]; mu, logvar [B, D].
    ``kl_coeff`` weights log p(z) - log q(z|x) inside the importance weights (a beta-VAE IWAE;
    1 gives the true bound). The -ELBO reported here always uses beta = 1.
    """
    k, b = recon.shape[:2]
    target_k = target.unsqueeze(0).expand(k, *target.shape)
    log_px = gaussian_log_likelihood(
        target_k.reshape(k * b, *target.shape[1:]),
        recon.reshape(k * b, *recon.shape[2:]),
        log_sigma,
    ).view(k, b)
    kl = gaussian_kl(mu, logvar)
    neg_iwae = None
    if k > 1:
        log_pz = standard_normal_log_prob(z)
        log_qz = diag_gaussian_log_prob(z, mu.unsqueeze(0), logvar.unsqueeze(0))
        neg_iwae = -iwae_bound(log_px, kl_coeff * log_pz, kl_coeff * log_qz)
    rec_nll = -log_px.mean(0)
    return VAETerms(rec_nll=rec_nll, kl=kl, neg_elbo=rec_nll + kl, neg_iwae=neg_iwae)


def hybrid_loss(
    logits: torch.Tensor | None,
    labels: torch.Tensor,
    vae: VAETerms | None,
    *,
    alpha: float,
    beta: float,
    kl_coeff: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * CE + beta * (-ELBO_kl_coeff, or -IWAE when k > 1), batch means.

    Returns the scalar loss and a dict of detached terms (ce, accuracy, rec_nll, kl, neg_elbo,
    neg_iwae, loss); a term is absent when the model lacks the branch it comes from.
    """
    terms: dict[str, torch.Tensor] = {}
    loss = torch.zeros((), device=labels.device)
    if logits is not None:
        ce = F.cross_entropy(logits.float(), labels)
        terms["ce"] = ce.detach()
        terms["accuracy"] = (logits.argmax(1) == labels).float().mean()
        if alpha:
            loss = loss + alpha * ce
    if vae is not None:
        vae_objective = (
            vae.neg_iwae if vae.neg_iwae is not None else vae.rec_nll + kl_coeff * vae.kl
        )
        terms["rec_nll"] = vae.rec_nll.mean().detach()
        terms["kl"] = vae.kl.mean().detach()
        terms["neg_elbo"] = vae.neg_elbo.mean().detach()
        if vae.neg_iwae is not None:
            terms["neg_iwae"] = vae.neg_iwae.mean().detach()
        if beta:
            loss = loss + beta * vae_objective.mean()
    terms["loss"] = loss.detach()
    return loss, terms
