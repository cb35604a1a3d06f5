"""The stochastic sampler (euler-maruyama): the score from the velocity, and the same marginals as
the ODE on Gaussian data, where both are known in closed form."""

import numpy as np
import pytest
import torch

from flowmatch.paths import LinearPath
from flowmatch.solvers import integrate, integrate_sde

from helpers import one_line_error
from problems import MU, S, exact_u, sigma


def exact_v(x, t):
    return exact_u(x.double(), t.double(), torch.zeros_like(t).double()).to(x.dtype)


def test_the_score_from_the_velocity_is_the_gaussians():
    """x_t ~ N(t MU, sigma(t)^2 I): sigma * score = -sigma (x - t MU) / sigma(t)^2."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64) * 2
    for t0 in (0.0, 0.1, 0.5, 0.9, 0.999):
        t = torch.full((200,), t0, dtype=torch.float64)
        want = -(1 - t0) * (x - t0 * MU.double()) / sigma(t[:1]) ** 2
        # sigma * score = -E[x0 | x]: the path's noise prediction, negated
        torch.testing.assert_close(-LinearPath().velocity_to_x0(exact_v(x, t), x, t), want, rtol=1e-9, atol=1e-9)


def test_no_noise_is_euler_on_the_ode():
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sde = integrate_sde(exact_v, x0, LinearPath(), nfe=20, noise=0.0, generator=torch.Generator().manual_seed(3))
    ode = integrate(exact_v, x0, "euler", 20)
    torch.testing.assert_close(sde.x, ode.x, rtol=1e-12, atol=1e-12)
    assert sde.nfe == 20


@pytest.mark.parametrize("noise", [1.0, 3.0])
def test_the_sde_lands_on_the_data_distribution(noise):
    """With the exact velocity, Euler-Maruyama ends at N(MU, S^2) like the ODE, though each
    sample took another way (the noise moved it: far from its ODE end)."""
    n = 20000
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = integrate_sde(exact_v, x0, LinearPath(), nfe=200, noise=noise, generator=torch.Generator().manual_seed(5))
    assert (res.x.mean(0) - MU.double()).abs().max() < 0.02, res.x.mean(0)
    assert (res.x.std(0) - S).abs().max() < 0.015, res.x.std(0)
    ode = integrate(exact_v, x0, "euler", 200).x
    assert (res.x - ode).pow(2).sum(1).mean().sqrt() > 0.1  # not the ODE's map
    again = integrate_sde(exact_v, x0, LinearPath(), nfe=200, noise=noise, generator=torch.Generator().manual_seed(5)).x
    torch.testing.assert_close(again, res.x)  # the seed fixes the Brownian path
    other = integrate_sde(exact_v, x0[:100], LinearPath(), nfe=200, noise=noise, generator=torch.Generator().manual_seed(6)).x
    assert (other - res.x[:100]).abs().max() > 1e-3


def test_sampling_with_noise_from_the_command_line(cli, tiny_run, tmp_path):
    rc, _, err = cli("sample", tiny_run, "--solver", "euler-maruyama", "--nfe", "20", "--n", "50",
                     "--out", tmp_path / "a.npy", "--no-progress")
    assert rc == 0, err
    rc, _, err = cli("sample", tiny_run, "--solver", "euler-maruyama", "--noise", "0", "--nfe", "20", "--n", "50",
                     "--out", tmp_path / "b.npy", "--no-progress")
    assert rc == 0, err
    rc, _, err = cli("sample", tiny_run, "--nfe", "20", "--n", "50", "--out", tmp_path / "c.npy", "--no-progress")
    assert rc == 0, err
    a, b, c = (np.load(tmp_path / f"{k}.npy") for k in "abc")
    np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-5)  # no noise: the ODE's Euler
    assert np.abs(a - c).max() > 1e-2
    rc, out, err = cli("eval", tiny_run, "--solver", "euler-maruyama", "--nfe", "10", "--n", "100", "--repeats", "1",
                       "--json", "--tol", "1e-3")
    assert rc == 0, err
    line = one_line_error(*cli("sample", tiny_run, "--noise", "1", "--out", tmp_path / "d.npy")[::2])
    assert "--noise" in line and not (tmp_path / "d.npy").exists()
    line = one_line_error(*cli("sample", tiny_run, "--solver", "euler-maruyama", "--noise", "-1",
                               "--out", tmp_path / "d.npy")[::2])
    assert "--noise" in line
