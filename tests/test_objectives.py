"""Each loss term against an independent computation (torch.distributions, direct formulas)."""

import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from dhm.model.objectives import (
    diag_gaussian_log_prob,
    effective_sample_size,
    gaussian_kl,
    gaussian_log_likelihood,
    hybrid_loss,
    iwae_bound,
    standard_normal_log_prob,
    thesis_objective,
    vae_terms,
)


def test_gaussian_log_likelihood_matches_torch_distributions():
    torch.manual_seed(0)
    x, mean = torch.rand(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    for log_sigma in (math.log(0.1), 0.0, torch.tensor(0.7)):
        sigma = torch.exp(torch.as_tensor(log_sigma))
        expected = Independent(Normal(mean, sigma.expand_as(mean)), 3).log_prob(x)
        torch.testing.assert_close(gaussian_log_likelihood(x, mean, log_sigma), expected)


def test_per_channel_sigma_matches_torch_distributions():
    # model.sigma=channel: one learned sigma per channel of the target, [C, 1, 1].
    torch.manual_seed(0)
    x, mean = torch.rand(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    log_sigma = torch.tensor([-2.0, 0.3, 1.1]).view(3, 1, 1)
    scale = torch.exp(log_sigma).expand_as(mean)
    expected = Independent(Normal(mean, scale), 3).log_prob(x)
    torch.testing.assert_close(gaussian_log_likelihood(x, mean, log_sigma), expected)


def test_float64_inputs_keep_their_precision():
    # DDP equivalence is checked in float64 (tests/test_train.py): nothing may round to float32.
    x, mean = (
        torch.rand(2, 3, 4, 4, dtype=torch.float64),
        torch.rand(2, 3, 4, 4, dtype=torch.float64),
    )
    assert gaussian_log_likelihood(x, mean, 0.0).dtype == torch.float64
    mu = torch.randn(2, 5, dtype=torch.float64)
    assert gaussian_kl(mu, mu).dtype == torch.float64
    logits = torch.randn(2, 3, dtype=torch.float64)
    loss, _ = hybrid_loss(logits, torch.tensor([0, 1]), None, alpha=1.0, beta=0.0)
    assert loss.dtype == torch.float64


def test_thesis_objective_is_mean_squared_error_of_the_normalized_image_plus_mean_kl():
    # The thesis code: per-pixel mean MSE on normalized inputs + kl_coeff * mean KL.
    g = torch.Generator().manual_seed(0)
    x, recon = torch.rand(2, 3, 4, 4, generator=g), torch.rand(1, 2, 3, 4, 4, generator=g)
    mu, logvar = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3])
    xn, rn = (x - mean) / std.view(3, 1, 1), (recon[0] - mean) / std.view(3, 1, 1)
    kl_per_dim = 0.5 * (mu**2 + logvar.exp() - 1 - logvar)  # [2, 6]
    expected = ((rn - xn) ** 2).mean(dim=(1, 2, 3)) + 0.1 * kl_per_dim.mean(1)
    got = thesis_objective(x, recon, mu, logvar, 0.1, std.view(3, 1, 1))
    torch.testing.assert_close(got, expected)
    terms = vae_terms(x, recon, mu[None], mu, logvar, 0.0, kl_coeff=0.1, likelihood="thesis",
                      target_scale=std.view(3, 1, 1))  # fmt: skip
    torch.testing.assert_close(terms.objective, expected)


def test_effective_sample_size_by_hand():
    # Columns are images, rows the k = 3 samples. Weights (1, 1, 2): (sum w)^2 / sum w^2 =
    # 16 / 6; equal weights give k = 3; one weight carrying everything gives 1.
    w = torch.tensor([[1.0, 1.0, 5.0], [1.0, 1.0, 0.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    ess = effective_sample_size(torch.log(w) + 100.0)  # invariant to a common shift
    torch.testing.assert_close(ess, torch.tensor([16 / 6, 3.0, 1.0], dtype=torch.float64))


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 8), torch.randn(5, 8)
    q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    p = Independent(Normal(torch.zeros(8), torch.ones(8)), 1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), kl_divergence(q, p))


def test_log_probs_match_torch_distributions():
    torch.manual_seed(0)
    z, mu, logvar = torch.randn(3, 5, 8), torch.randn(5, 8), torch.randn(5, 8)
    q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    torch.testing.assert_close(diag_gaussian_log_prob(z, mu, logvar), q.log_prob(z))
    p = Independent(Normal(torch.zeros(8), torch.ones(8)), 1)
    torch.testing.assert_close(standard_normal_log_prob(z), p.log_prob(z))


def test_iwae_bound_is_logmeanexp_of_weights():
    log_px = torch.tensor([[-1.0, -2.0], [-3.0, -0.5], [-2.0, -4.0]])
    log_pz = torch.tensor([[-0.1, -0.2], [-0.3, -0.4], [-0.5, -0.6]])
    log_qz = torch.tensor([[-0.2, -0.1], [-0.1, -0.3], [-0.2, -0.2]])
    log_w = (log_px + log_pz - log_qz).double()
    expected = torch.log(torch.exp(log_w).mean(0)).float()
    torch.testing.assert_close(iwae_bound(log_px, log_pz, log_qz), expected)


def _toy_posterior(k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, d = 4, 3
    target = torch.rand(b, 2, 2, generator=g)
    mu, logvar = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g) * 0.3
    z = mu + torch.randn(k, b, d, generator=g) * torch.exp(0.5 * logvar)
    # A fixed linear "decoder" so the likelihood depends on z.
    w = torch.randn(d, 4, generator=g)
    recon = (z @ w).view(k, b, 2, 2)
    return target, recon, z, mu, logvar


def test_iwae_with_k1_equals_the_single_sample_elbo_with_beta_1():
    target, recon, z, mu, logvar = _toy_posterior(k=1)
    log_sigma = math.log(0.5)
    log_px = gaussian_log_likelihood(target, recon[0], log_sigma)
    log_pz, log_qz = standard_normal_log_prob(z[0]), diag_gaussian_log_prob(z[0], mu, logvar)
    single_sample_elbo = log_px + log_pz - log_qz
    bound = iwae_bound(log_px[None], log_pz[None], log_qz[None])
    torch.testing.assert_close(bound, single_sample_elbo)


def test_monte_carlo_elbo_agrees_with_the_analytic_kl_elbo_and_iwae_is_tighter():
    k = 20000
    target, recon, z, mu, logvar = _toy_posterior(k=k)
    log_sigma = math.log(0.5)
    terms = vae_terms(target, recon, z, mu, logvar, log_sigma, kl_coeff=1.0)
    # E_q[log p(x|z) + log p(z) - log q(z|x)] = ELBO with the analytic KL.
    log_px = gaussian_log_likelihood(
        target.expand(k, *target.shape).reshape(-1, 2, 2), recon.reshape(-1, 2, 2), log_sigma
    ).view(k, -1)
    mc_elbo = (log_px + standard_normal_log_prob(z) - diag_gaussian_log_prob(z, mu, logvar)).mean(0)
    torch.testing.assert_close(-terms.neg_elbo, mc_elbo, rtol=0, atol=0.1)
    iwae = -iwae_bound(log_px, standard_normal_log_prob(z), diag_gaussian_log_prob(z, mu, logvar))
    # With kl_coeff = 1 the training objective with k samples is the -IWAE bound: tighter.
    torch.testing.assert_close(terms.objective, iwae)
    assert torch.all(terms.objective <= terms.neg_elbo + 1e-4)
    assert terms.neg_elbo.shape == terms.kl.shape == terms.rec_nll.shape == (4,)


def test_hybrid_loss_combines_terms():
    torch.manual_seed(0)
    target, recon, z, mu, logvar = _toy_posterior(k=1)
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    vae = vae_terms(target, recon, z, mu, logvar, 0.0, kl_coeff=0.1)
    loss, terms = hybrid_loss(logits, labels, vae, alpha=2.0, beta=3.0)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    expected = 2.0 * ce + 3.0 * (vae.rec_nll + 0.1 * vae.kl).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(terms["neg_elbo"], (vae.rec_nll + vae.kl).mean())
    assert set(terms) == {"ce", "accuracy", "rec_nll", "kl", "neg_elbo", "vae_objective", "loss"}
    torch.testing.assert_close(terms["vae_objective"], (vae.rec_nll + 0.1 * vae.kl).mean())
    only_ce, t2 = hybrid_loss(logits, labels, None, alpha=1.0, beta=0.0)
    torch.testing.assert_close(only_ce, ce)
    assert "neg_elbo" not in t2


@pytest.mark.parametrize("kl_coeff", [0.1, 1.0])
def test_iwae_training_objective_uses_kl_coeff_inside_the_weights(kl_coeff):
    target, recon, z, mu, logvar = _toy_posterior(k=5)
    vae = vae_terms(target, recon, z, mu, logvar, 0.0, kl_coeff=kl_coeff)
    log_px = gaussian_log_likelihood(
        target.expand(5, *target.shape).reshape(-1, 2, 2), recon.reshape(-1, 2, 2), 0.0
    ).view(5, -1)
    log_w = log_px + kl_coeff * (
        standard_normal_log_prob(z) - diag_gaussian_log_prob(z, mu, logvar)
    )
    expected = -(torch.logsumexp(log_w, 0) - math.log(5))
    torch.testing.assert_close(vae.objective, expected)
