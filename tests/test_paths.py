import pytest
import torch

from flowmatch.errors import UserError
from flowmatch.paths import PATHS, LinearPath, make_path, marginal_velocity


def _paths():
    return [LinearPath(), LinearPath(sigma_min=0.05), make_path("vp"), make_path("cosine")]


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _batch(seed=0, n=64, d=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), 2 + torch.randn(n, d, generator=g), torch.rand(n, generator=g)


@pytest.mark.parametrize("path", _paths(), ids=lambda p: str(p.config()))
def test_velocity_is_time_derivative_of_x_t(path):
    x0, x1, t = _batch()
    t = t.clamp(0.02, 0.98)
    h = 1e-6
    fd = (path.sample(x0, x1, t + h).x_t - path.sample(x0, x1, t - h).x_t) / (2 * h)
    torch.testing.assert_close(path.sample(x0, x1, t).u_t, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", _paths(), ids=lambda p: str(p.config()))
def test_endpoints_are_noise_and_data(path):
    x0, x1, _ = _batch()
    n = len(x0)
    # VP only approaches pure noise: alpha(0) = exp(-(beta_min + beta_max) / 4) ~ 0.0066
    alpha0, sigma0 = (v.item() for v in path.schedule(torch.zeros(1))[:2])
    assert alpha0 < 0.01 and abs(sigma0 - 1) < 1e-4
    err0 = (path.sample(x0, x1, torch.zeros(n)).x_t - x0).abs().max().item()
    assert err0 <= alpha0 * x1.abs().max().item() + 1e-4 * x0.abs().max().item() + 1e-12
    sigma_end = path.schedule(torch.ones(1))[1].item()
    err = (path.sample(x0, x1, torch.ones(n)).x_t - x1).abs().max().item()
    assert err <= sigma_end * x0.abs().max().item() + 1e-9
    assert sigma_end < 0.06


def test_linear_path_is_the_articles_line():
    x0, x1, t = _batch()
    s = LinearPath().sample(x0, x1, t)
    torch.testing.assert_close(s.x_t, (1 - t[:, None]) * x0 + t[:, None] * x1)
    torch.testing.assert_close(s.u_t, x1 - x0)


@pytest.mark.parametrize("path", _paths(), ids=lambda p: str(p.config()))
def test_parameterisations_round_trip(path):
    x0, x1, t = _batch()
    t = t.clamp(0.05, 0.95)
    s = path.sample(x0, x1, t)
    torch.testing.assert_close(path.velocity_to_x1(s.u_t, s.x_t, t), x1)
    torch.testing.assert_close(path.velocity_to_x0(s.u_t, s.x_t, t), x0)
    torch.testing.assert_close(path.x1_to_velocity(x1, s.x_t, t), s.u_t)
    torch.testing.assert_close(path.x0_to_velocity(x0, s.x_t, t), s.u_t)


def test_marginal_field_of_the_line_is_softmax_average():
    g = torch.Generator().manual_seed(1)
    data = torch.randn(7, 2, generator=g) * 3
    x, t = torch.randn(50, 2, generator=g), torch.rand(50, generator=g) * 0.9
    v = marginal_velocity(LinearPath(), x, t, data)
    # the formula: sum_i w_i (x1_i - x) / (1 - t), w = softmax(-|x - t x1_i|^2 / (2 (1 - t)^2))
    logits = -((x[:, None] - t[:, None, None] * data[None]) ** 2).sum(-1) / (2 * (1 - t[:, None]) ** 2)
    w = torch.softmax(logits, 1)
    expected = (w[:, :, None] * (data[None] - x[:, None])).sum(1) / (1 - t[:, None])
    torch.testing.assert_close(v, expected)


def test_unknown_path_lists_valid_names():
    with pytest.raises(UserError, match="linear, vp, cosine"):
        make_path("spline")
    assert set(PATHS) == {"linear", "vp", "cosine"}


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        LinearPath().sample(torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(3))
