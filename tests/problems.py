"""ODE test problems with exact solutions, kept apart from the tests that use them.

Each problem is ``v(x, t)`` (t of shape (B,)) with ``exact(x0, t_end)`` from ``t = 0``.
"""

import math

import torch

from flowmatch.data import Batch, Dataset


class LinearDecay:
    """``dx/dt = -(1 + sin 3t) x``:  ``x(t) = x0 exp(-(t + (1 - cos 3t) / 3))``."""

    def v(self, x, t):
        return -(1 + torch.sin(3 * t))[:, None] * x

    def exact(self, x0, t_end=1.0):
        return x0 * math.exp(-(t_end + (1 - math.cos(3 * t_end)) / 3))


class Rotation:
    """``dx/dt = w(t) J x`` with ``w = 1 + t``: rotation by ``t + t^2 / 2``."""

    def v(self, x, t):
        w = (1 + t)[:, None]
        return w * torch.stack([-x[:, 1], x[:, 0]], dim=1)

    def exact(self, x0, t_end=1.0):
        a = t_end + t_end**2 / 2
        c, s = math.cos(a), math.sin(a)
        return torch.stack([c * x0[:, 0] - s * x0[:, 1], s * x0[:, 0] + c * x0[:, 1]], dim=1)


class TimeOnly:
    """``dx/dt = t``: ``x(1) = x0 + 1/2``; Euler with K steps on ``t_k = k/K`` gives
    ``x0 + (K - 1) / (2K)`` exactly, which pins down the time grid."""

    def v(self, x, t):
        return t[:, None].expand_as(x)

    def exact(self, x0, t_end=1.0):
        return x0 + t_end**2 / 2


PROBLEMS = {"linear-decay": LinearDecay(), "rotation": Rotation()}


# Gaussian data N(MU, S^2 I) from noise N(0, I) on the straight path: the flow is linear, so the
# marginal velocity and the average velocity over any interval are known exactly.
MU, S = torch.tensor([2.0, -1.0]), 0.5  # data N(MU, S^2 I); noise N(0, I)


def sigma(t):
    """Std of x_t = (1 - t) x0 + t x1 (marginal N(t MU, sigma(t)^2 I))."""
    return ((1 - t) ** 2 + (t * S) ** 2).sqrt()


def exact_u(z, t, h):
    """Exact average velocity over [t, t + h] from z at t: the flow maps z to
    (t+h) MU + sigma(t+h)/sigma(t) (z - t MU); at h = 0 the marginal velocity."""
    t_, h_ = t[:, None].double(), h[:, None].double()
    ds = -(1 - t_) + t_ * S**2  # sigma sigma'
    v = MU + ds / sigma(t_) ** 2 * (z - t_ * MU)
    end = (t_ + h_) * MU + sigma(t_ + h_) / sigma(t_) * (z - t_ * MU)
    avg = (end - z) / torch.where(h_ > 0, h_, torch.ones_like(h_))
    return torch.where(h_ > 0, avg, v).to(z.dtype)


def one_step_error(cfg, run, n: int = 4000):
    """A trained interval network of ``run`` (its EMA weights; settings ``cfg``) on ``n`` noise draws: the
    draws ``z``, its average velocity ``u`` over [0, 1], and the RMS error and size of the exact one."""
    from safetensors.torch import load_file

    from flowmatch.models import make_model

    model = make_model(cfg.model_spec((2,)), (2,))
    model.load_state_dict(load_file(run / "ema.safetensors"))
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    zeros, ones = torch.zeros(n), torch.ones(n)
    with torch.no_grad():
        u = model(z, zeros, h=ones)
    exact = exact_u(z, zeros, ones)
    return model, z, u, (u - exact).pow(2).sum(1).mean().sqrt(), exact.pow(2).sum(1).mean().sqrt()


def exact_model(z, t, label=None, h=None):
    return exact_u(z.double(), t.double(), h.double()).to(z.dtype)


class Gaussian(Dataset):
    """N(MU, S^2 I) in model space (no standardisation), drawn from the trainer's generator."""

    shape, spec = (2,), {"name": "gaussian-test"}

    def sample(self, n, generator):
        return Batch(x1=MU + S * torch.randn(n, 2, generator=generator))

    def reference(self, n, generator):
        return self.sample(n, generator).x1
