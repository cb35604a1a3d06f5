"""ODE test problems with exact solutions, kept apart from the tests that use them.

Each problem is ``v(x, t)`` (t of shape (B,)) with ``exact(x0, t_end)`` from ``t = 0``.
"""

import math

import torch


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
