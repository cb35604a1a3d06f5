"""Likelihood against closed forms: the exact flow between Gaussians."""

import math

import pytest
import torch

from flowmatch.likelihood import log_prob


def gaussian_field(mu, cov):
    """The straight path's exact marginal field for data N(mu, cov) and noise N(0, I):
    v(x, t) = mu + (t cov - (1 - t) I) C_t^{-1} (x - t mu), C_t = t^2 cov + (1 - t)^2 I."""
    eye = torch.eye(len(mu), dtype=mu.dtype)

    def v(x, t):
        t = t[0]
        c = t**2 * cov + (1 - t) ** 2 * eye
        a = (t * cov - (1 - t) * eye) @ torch.linalg.inv(c)
        return mu + (x - t * mu) @ a.T

    return v


def gaussian_log_prob(x, mu, cov):
    return torch.distributions.MultivariateNormal(mu, covariance_matrix=cov).log_prob(x)


@pytest.mark.parametrize("dim", [2, 5])
def test_exact_flow_gives_the_gaussian_log_density(dim):
    g = torch.Generator().manual_seed(dim)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.T / dim + 0.3 * torch.eye(dim, dtype=torch.float64)
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    x = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov).sample((64,))
    lp = log_prob(gaussian_field(mu, cov), x, atol=1e-9, rtol=1e-9, divergence="exact", t_data=1.0 - 1e-9)
    torch.testing.assert_close(lp.log_prob, gaussian_log_prob(x, mu, cov), atol=1e-3, rtol=0)
    # the mean NLL is the Gaussian's entropy (in expectation)
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * cov).item()
    nll = -lp.log_prob
    assert abs(nll.mean().item() - entropy) < 4 * nll.std().item() / 8


def test_hutchinson_agrees_with_exact_within_its_error():
    dim = 20
    g = torch.Generator().manual_seed(1)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.T / dim + 0.5 * torch.eye(dim, dtype=torch.float64)
    mu = torch.zeros(dim, dtype=torch.float64)
    x = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov).sample((400,))
    v = gaussian_field(mu, cov)
    exact = log_prob(v, x, atol=1e-6, rtol=1e-6, divergence="exact", t_data=1 - 1e-7).log_prob
    hutch = log_prob(v, x, atol=1e-6, rtol=1e-6, divergence="hutchinson", generator=g, t_data=1 - 1e-7).log_prob
    d = hutch - exact
    assert abs(d.mean().item()) < 4 * d.std().item() / math.sqrt(len(d))
    assert d.std() > 0  # the estimate is noisy per sample, unbiased on average
    torch.testing.assert_close(exact, gaussian_log_prob(x, mu, cov), atol=5e-3, rtol=0)
