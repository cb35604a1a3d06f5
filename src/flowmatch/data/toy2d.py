"""Two-dimensional toy distributions. Each sampler is ``f(n, generator) -> (n, 2)`` float32.

All take a ``torch.Generator`` (no global random state); the tensor lands on the
generator's device. Scales are chosen so that each fits roughly in [-4, 4]^2, like the
article notebook's checkerboard.
"""

from __future__ import annotations

import math

import torch


def _rand(n, generator, *shape):
    return torch.rand(n, *shape, generator=generator, device=generator.device)


def _randn(n, generator, *shape):
    return torch.randn(n, *shape, generator=generator, device=generator.device)


def checkerboard(n: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform on the 8 cells of a 4x4 board of 2x2 cells on [-4, 4]^2 with ``(i + j)`` odd.

    ``i`` indexes columns (x), ``j`` rows (y), both from -4: the notebook's
    ``checkerboard[j, i] == 1`` with ``np.indices((4, 4)).sum(0) % 2``. Area 32, so the
    density is 1/32 on its support and its entropy is ``log 32``.
    """
    x = -4 + 8 * _rand(n, generator)
    i = torch.floor((x + 4) / 2).clamp(0, 3)
    k = torch.floor(2 * _rand(n, generator))  # which of the two admissible rows
    j = 2 * k + (1 - i.remainder(2))  # (i + j) odd
    y = -4 + 2 * j + 2 * _rand(n, generator)
    return torch.stack([x, y], dim=1)


def checkerboard_points(n: int, generator: torch.Generator) -> torch.Tensor:
    """The notebook's finite training set: ``n`` points drawn once from :func:`checkerboard`."""
    return checkerboard(n, generator)


def moons(n: int, generator: torch.Generator, noise: float = 0.08) -> torch.Tensor:
    """Two interleaving half circles (as scikit-learn's ``make_moons``), scaled by 2.5."""
    upper = _rand(n, generator) < 0.5
    theta = math.pi * _rand(n, generator)
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 2.5
    return pts + noise * 2.5 * _randn(n, generator, 2)


def eight_gaussians(n: int, generator: torch.Generator, radius: float = 3.0, std: float = 0.35) -> torch.Tensor:
    """A mixture of 8 equal Gaussians on a circle of ``radius``."""
    k = torch.floor(8 * _rand(n, generator))
    angle = k * (2 * math.pi / 8)
    centers = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + std * _randn(n, generator, 2)


def spirals(n: int, generator: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    """Two interleaved Archimedean spirals."""
    u = torch.sqrt(_rand(n, generator))
    theta = 3 * math.pi * u
    sign = torch.where(_rand(n, generator) < 0.5, -1.0, 1.0)
    r = 3.5 * u
    pts = sign[:, None] * torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
    return pts + noise * _randn(n, generator, 2)


def rings(n: int, generator: torch.Generator, noise: float = 0.08) -> torch.Tensor:
    """Four concentric circles of radii 1..4, points spread in proportion to circumference."""
    r = torch.floor(torch.sqrt(16 * _rand(n, generator))).clamp(0, 3) + 1  # P(r) ∝ r
    theta = 2 * math.pi * _rand(n, generator)
    pts = r[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    return pts + noise * _randn(n, generator, 2)


TOY2D = {
    "checkerboard": checkerboard,
    "moons": moons,
    "8gaussians": eight_gaussians,
    "spirals": spirals,
    "rings": rings,
}
