"""Two-dimensional toy distributions. Each sampler is ``f(n, generator) -> (n, 2)`` float32.

All take an optional ``torch.Generator`` (None: torch's global one); the tensor lands on the
generator's device. Scales are chosen so that each fits roughly in [-4, 4]^2, like the
article notebook's checkerboard.
"""

from __future__ import annotations

import math

import torch


def _rand(n, generator, *shape):
    return torch.rand(n, *shape, generator=generator, device=generator.device if generator is not None else "cpu")


def _randn(n, generator, *shape):
    return torch.randn(n, *shape, generator=generator, device=generator.device if generator is not None else "cpu")


def checkerboard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
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


def moons(n: int, generator: torch.Generator | None = None, noise: float = 0.08) -> torch.Tensor:
    """Two interleaving half circles (as scikit-learn's ``make_moons``), scaled by 2.5."""
    upper = _rand(n, generator) < 0.5
    theta = math.pi * _rand(n, generator)
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 2.5
    return pts + noise * 2.5 * _randn(n, generator, 2)


def eight_gaussians(n: int, generator: torch.Generator | None = None, radius: float = 3.0, std: float = 0.35) -> torch.Tensor:
    """A mixture of 8 equal Gaussians on a circle of ``radius``."""
    k = torch.floor(8 * _rand(n, generator))
    angle = k * (2 * math.pi / 8)
    centers = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + std * _randn(n, generator, 2)


def spirals(n: int, generator: torch.Generator | None = None, noise: float = 0.1) -> torch.Tensor:
    """Two interleaved Archimedean spirals."""
    u = torch.sqrt(_rand(n, generator))
    theta = 3 * math.pi * u
    sign = torch.where(_rand(n, generator) < 0.5, -1.0, 1.0)
    r = 3.5 * u
    pts = sign[:, None] * torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
    return pts + noise * _randn(n, generator, 2)


def rings(n: int, generator: torch.Generator | None = None, noise: float = 0.08) -> torch.Tensor:
    """Four concentric circles of radii 1..4, points spread in proportion to circumference."""
    r = torch.floor(torch.sqrt(16 * _rand(n, generator))).clamp(0, 3) + 1  # P(r) ∝ r
    theta = 2 * math.pi * _rand(n, generator)
    pts = r[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    return pts + noise * _randn(n, generator, 2)


# --- Known densities: what a sample "off the support" means, and log p(x) ------------------
#
# The checkerboard is uniform on its 8 cells (density 1/32 there, 0 elsewhere). The other toys
# are a curve (or 8 points) blurred by isotropic Gaussian noise of std ``sigma``: their density
# is the mixture ``p(x) = sum_m w_m N(x; c_m, sigma^2 I)`` over the curve's points ``c_m``,
# exact up to a quadrature of the curve's parameter on a fine grid (spacing << sigma). Their
# support is taken as the points within 3 sigma of the curve, which the data itself leaves
# about 1% of the time (the 2-D chi-square tail exp(-4.5)); report that beside the samples'.


def in_checkerboard(x: torch.Tensor) -> torch.Tensor:
    """(N, 2) -> (N,) bool: inside one of the checkerboard's 8 cells."""
    i, j = torch.floor((x[:, 0] + 4) / 2), torch.floor((x[:, 1] + 4) / 2)
    return (x.abs() < 4).all(1) & ((i + j).remainder(2) == 1)


def _grid(m: int) -> torch.Tensor:
    return (torch.arange(m, dtype=torch.float64) + 0.5) / m  # midpoints of [0, 1]


def _moons_curve(m=500):
    theta = math.pi * _grid(m)
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
    pts = (torch.cat([upper, lower]) - torch.tensor([0.5, 0.25], dtype=torch.float64)) * 2.5
    return pts, torch.full((2 * m,), 1 / (2 * m), dtype=torch.float64), 0.08 * 2.5


def _eight_gaussians_curve():
    angle = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return 3.0 * torch.stack([torch.cos(angle), torch.sin(angle)], 1), torch.full((8,), 1 / 8, dtype=torch.float64), 0.35


def _spirals_curve(m=1500):
    u = _grid(m)  # u = sqrt(U) has density 2u on [0, 1]
    r, theta = 3.5 * u, 3 * math.pi * u
    arm = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1)
    w = 2 * u / m
    w = w / w.sum()
    return torch.cat([arm, -arm]), torch.cat([w, w]) / 2, 0.1


def _rings_curve(m=1000):
    theta = 2 * math.pi * _grid(m)
    circle = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    radii = torch.arange(1, 5, dtype=torch.float64)  # floor(sqrt(16 U)) + 1: P(r) = (2 r - 1) / 16
    pts = torch.cat([r * circle for r in radii])
    w = torch.cat([torch.full((m,), float(2 * r - 1) / 16 / m, dtype=torch.float64) for r in radii])
    return pts, w, 0.08


CURVES = {"moons": _moons_curve, "8gaussians": _eight_gaussians_curve, "spirals": _spirals_curve, "rings": _rings_curve}


def log_density(name: str, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """True log-density (nats) of toy ``name`` at points ``x`` (N, 2); ``-inf`` off the
    checkerboard's cells."""
    x = x.detach().double().cpu()
    if name == "checkerboard":
        return torch.where(in_checkerboard(x), -math.log(32.0), -math.inf).double()
    pts, w, sigma = CURVES[name]()
    out = []
    for xb in x.split(chunk):
        d2 = torch.cdist(xb, pts).pow(2)
        out.append(torch.logsumexp(w.log() - d2 / (2 * sigma**2), dim=1) - math.log(2 * math.pi * sigma**2))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def on_support(name: str, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(N,) bool: inside the checkerboard's cells, or within 3 sigma of a blurred toy's curve."""
    x = x.detach().double().cpu()
    if name == "checkerboard":
        return in_checkerboard(x)
    pts, _, sigma = CURVES[name]()
    near = [torch.cdist(xb, pts).min(1).values <= 3 * sigma for xb in x.split(chunk)]
    return torch.cat(near) if near else torch.empty(0, dtype=torch.bool)


TOY2D = {
    "checkerboard": checkerboard,
    "moons": moons,
    "8gaussians": eight_gaussians,
    "spirals": spirals,
    "rings": rings,
}
