"""Probability paths between noise and data.

Time convention, stated once for the whole package: ``t = 0`` is noise ``x0 ~ N(0, I)``,
``t = 1`` is data ``x1``. Every velocity field is called as ``v(x, t)`` with ``t`` of shape
``(B,)`` and integrated forward from 0 to 1.

All paths here are *affine Gaussian* paths (Lipman et al. 2023, "Flow Matching for
Generative Modeling"; Albergo & Vanden-Eijnden 2023, "stochastic interpolants")::

    x_t = alpha(t) * x1 + sigma(t) * x0          u_t = alpha'(t) * x1 + sigma'(t) * x0

with ``alpha(0) = 0, sigma(0) = 1`` (noise) and ``alpha(1) = 1, sigma(1) ~ 0`` (data). The
network regresses ``u_t`` at ``x_t`` with MSE (conditional flow matching); its minimiser
is the marginal field ``v*(x, t) = E[u_t | x_t = x]``, which has a closed form for a finite
data set (:func:`marginal_velocity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import SettingError


@dataclass
class PathSample:
    """A point on the path and its target velocity. Shapes: ``x_t, u_t`` like ``x1``; ``t`` (B,)."""

    x_t: torch.Tensor
    u_t: torch.Tensor
    t: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor


def expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape ``t`` of shape (B,) to broadcast against ``like`` of shape (B, ...)."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


class AffinePath:
    """Base class: a path given by its schedule ``alpha(t), sigma(t)`` and their derivatives."""

    name = "affine"

    def schedule(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(alpha, sigma, d alpha/dt, d sigma/dt)`` at times ``t``."""
        raise NotImplementedError

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`schedule` at ``t`` (B,), shaped to broadcast against ``like`` (B, ...), in its dtype."""
        return tuple(expand(w, like).to(like.dtype) for w in self.schedule(t))

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> PathSample:
        """Point ``x_t`` and target velocity ``u_t`` for noise ``x0``, data ``x1``, times ``t`` (B,)."""
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
        a, s, da, ds = self.coefficients(t, x0)
        return PathSample(x_t=a * x1 + s * x0, u_t=da * x1 + ds * x0, t=t, x0=x0, x1=x1)

    # Parameterisations: a velocity at (x, t) determines the x1- and x0-predictions.
    def velocity_to_x1(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Data prediction ``x1 = (sigma' x - sigma v) / (sigma' alpha - sigma alpha')``."""
        a, s, da, ds = self.coefficients(t, x)
        return (ds * x - s * v) / (ds * a - s * da)

    def velocity_to_x0(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise (epsilon) prediction ``x0 = (alpha' x - alpha v) / (alpha' sigma - alpha sigma')``; by
        Tweedie, ``sigma * score(x, t) = -x0`` (the stochastic sampler's drift, :func:`~flowmatch.solvers.integrate_sde`)."""
        a, s, da, ds = self.coefficients(t, x)
        return (da * x - a * v) / (da * s - a * ds)

    def x1_to_velocity(self, x1: torch.Tensor, x: torch.Tensor, t: torch.Tensor, min_sigma: float = 0.0) -> torch.Tensor:
        """Velocity from a data prediction: ``v = alpha' x1 + sigma' (x - alpha x1) / sigma``, with
        ``sigma`` clipped below at ``min_sigma`` (a network's prediction, near t = 1)."""
        a, s, da, ds = self.coefficients(t, x)
        return da * x1 + ds * (x - a * x1) / (s.clamp_min(min_sigma) if min_sigma > 0 else s)

    def x0_to_velocity(self, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity from a noise prediction: ``v = alpha' (x - sigma x0) / alpha + sigma' x0``."""
        a, s, da, ds = self.coefficients(t, x)
        return da * (x - s * x0) / a + ds * x0

    def config(self) -> dict:
        return {"name": self.name}


class LinearPath(AffinePath):
    """The straight line of rectified flow / CondOT: ``x_t = t x1 + (1 - (1 - sigma_min) t) x0``.

    With ``sigma_min = 0`` (default) ``u_t = x1 - x0``, the article's target.
    """

    name = "linear"

    def __init__(self, sigma_min: float = 0.0):
        if not 0.0 <= sigma_min < 1.0:
            raise SettingError("sigma_min", f"expected a value in [0, 1), got {sigma_min}")
        self.sigma_min = float(sigma_min)

    def schedule(self, t):
        one = torch.ones_like(t)
        return t, 1 - (1 - self.sigma_min) * t, one, -(1 - self.sigma_min) * one

    def config(self) -> dict:
        return {"name": self.name, "sigma_min": self.sigma_min}


class CosinePath(AffinePath):
    """Trigonometric interpolant: ``alpha = sin(pi t / 2)``, ``sigma = cos(pi t / 2)``."""

    name = "cosine"

    def schedule(self, t):
        h = 0.5 * math.pi
        return torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t)


class VPPath(AffinePath):
    """Variance-preserving (DDPM) path in flow-matching time (Lipman et al. 2023, eq. 19).

    ``alpha(t) = exp(-T(1 - t) / 2)``, ``sigma = sqrt(1 - alpha^2)`` with
    ``T(s) = beta_min s + (beta_max - beta_min) s^2 / 2``. At ``t = 1`` sigma is small but
    not zero (about 0.006 for the defaults), as in DDPM.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def schedule(self, t):
        s = 1 - t
        T = self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2
        dT_ds = self.beta_min + (self.beta_max - self.beta_min) * s
        a = torch.exp(-0.5 * T)
        da = 0.5 * dT_ds * a  # d/dt = -d/ds
        sig = torch.sqrt((1 - a**2).clamp_min(1e-12))
        dsig = -a * da / sig
        return a, sig, da, dsig

    def config(self) -> dict:
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}


PATHS = {"linear": LinearPath, "vp": VPPath, "cosine": CosinePath}


def make_path(name: str, **kwargs) -> AffinePath:
    """Build a path by name; an unknown name raises, listing the valid ones."""
    if name not in PATHS:
        raise SettingError("path", f"unknown path {name!r}; expected one of {', '.join(PATHS)}")
    return PATHS[name](**kwargs)


def posterior_mean(path: AffinePath, x: torch.Tensor, t: torch.Tensor, data: torch.Tensor, label=None,
                   data_label=None) -> torch.Tensor:
    """``E[x1 | x_t = x]`` when ``x1`` is uniform on the rows of ``data`` (N, ...): given ``x1 =
    data[j]``, ``x_t ~ N(alpha x1, sigma^2 I)``, so the posterior over ``j`` is a softmax of ``-||x -
    alpha data[j]||^2 / (2 sigma^2)``. With labels (B,) and ``data_label`` (N,), a row averages over
    the data of its own label (a negative label: over all). The logits are one matmul in float64
    (their common scale ``alpha / sigma^2`` is large near the data), taken a few rows at a time;
    the softmax in the data's precision once each row's largest logit is subtracted."""
    a, s = (expand(w, x) for w in path.schedule(t)[:2])
    ref = data.flatten(1)
    al, s2, xt = a.flatten(1).double(), s.flatten(1).double().pow(2).clamp_min(1e-200), x.flatten(1).double()
    # -||x - a r||^2 / (2 s^2), less the row's own constant -||x||^2 / (2 s^2): one matmul
    lhs = torch.cat([al * xt / s2, -al.pow(2) / (2 * s2)], 1)
    refd = ref.double()
    rhs = torch.cat([refd, refd.pow(2).sum(1, keepdim=True)], 1).T.contiguous()
    rows = max(1, (1 << 18) // len(ref))  # rows at a time: 2 MB of float64 logits stay in cache (4x faster)
    parts = []
    for i in range(0, len(x), rows):
        logits = lhs[i:i + rows] @ rhs
        if label is not None:
            lab = label[i:i + rows, None]
            logits = logits.masked_fill((lab != data_label[None]) & (lab >= 0), float("-inf"))
        logits = logits - logits.amax(1, keepdim=True)  # the largest 0: the rest of the softmax in the data's precision
        parts.append(logits.to(ref.dtype).softmax(1) @ ref)
    m = torch.cat(parts)
    return m.reshape(x.shape)


def marginal_velocity(path: AffinePath, x: torch.Tensor, t: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Exact marginal field ``v*(x, t) = E[u_t | x_t = x]`` when ``x1`` is uniform on ``data``: the
    conditional velocity at the posterior mean of ``x1`` (:func:`posterior_mean`), ``alpha' m +
    sigma' (x - alpha m) / sigma``. For the straight path this is the softmax-weighted average of
    ``(data[i] - x) / (1 - t)``. Shapes: ``x`` (B, D), ``t`` (B,), ``data`` (N, D) -> (B, D).
    Valid for ``sigma(t) > 0``."""
    return path.x1_to_velocity(posterior_mean(path, x, t, data), x, t)
