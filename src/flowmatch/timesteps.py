"""Time samplers for training: ``t`` of shape (B,) in [0, 1] (0 = noise, 1 = data).

A sampler is anything with ``sample(n, generator=None, device=None) -> Tensor`` (:class:`~flowmatch.protocols.TimeSampler`):
the draws come from ``generator`` when given, else from torch's global generator, on ``device``
(by default the generator's)."""

from __future__ import annotations

import math

import torch

from .errors import SettingError


def _device(generator: torch.Generator | None, device):
    """Where draws land: ``device`` if given, else the generator's device (the CPU without one)."""
    return device if device is not None else (generator.device if generator is not None else "cpu")


class UniformTime:
    """``t ~ U[0, 1]``, the article's choice."""

    name = "uniform"

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        device = _device(generator, device)
        return torch.rand(n, generator=generator, device=device)

    def config(self) -> dict:
        return {"name": self.name}


class LogitNormalTime:
    """``t = sigmoid(m + s * n)``, ``n ~ N(0, 1)``: more weight on middle times (Esser et al. 2024, SD3);
    ``m > 0`` leans towards the data. With ``uniform = u`` each time is instead drawn from U[0, 1]
    with probability ``u``, so no stretch of [0, 1] is left untrained (the density is at least ``u``)."""

    name = "logit-normal"

    def __init__(self, mean: float = 0.0, std: float = 1.0, uniform: float = 0.0):
        if not std > 0:
            raise SettingError("time_std", f"expected a positive value, got {std}")
        if not 0 <= uniform <= 1:
            raise SettingError("time_uniform", f"expected a share in [0, 1], got {uniform}")
        self.mean, self.std, self.uniform = float(mean), float(std), float(uniform)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        device = _device(generator, device)
        t = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=device))
        if self.uniform > 0:
            pick = torch.rand(n, generator=generator, device=device) < self.uniform
            t = torch.where(pick, torch.rand(n, generator=generator, device=device), t)
        return t

    def config(self) -> dict:
        return {"name": self.name, "mean": self.mean, "std": self.std, "uniform": self.uniform}


class UShapedTime:
    """RF++'s U-shaped times for reflow (Lee et al. 2024, "Improving the Training of Rectified
    Flows"): density ``a (e^(a t) + e^(a (1 - t))) / (2 (e^a - 1))`` on [0, 1], highest at both ends,
    where a reflowed field is hardest to fit (``a = 4``: 27x more weight at the ends than at 1/2).
    Drawn exactly: the truncated exponential by its inverse CDF, mirrored with probability 1/2."""

    name = "u-shaped"

    def __init__(self, a: float = 4.0):
        if not a > 0:
            raise SettingError("a", f"the u-shaped density's a: expected a positive value, got {a}")
        self.a = float(a)

    def density(self, t: torch.Tensor) -> torch.Tensor:
        a = self.a
        return a * (torch.exp(a * t) + torch.exp(a * (1 - t))) / (2 * math.expm1(a))

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        device = _device(generator, device)
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        t = torch.log1p(u * math.expm1(self.a)) / self.a  # density a e^(a t) / (e^a - 1)
        mirror = torch.rand(n, generator=generator, device=device) < 0.5
        return torch.where(mirror, 1 - t, t).float()

    def config(self) -> dict:
        return {"name": self.name, "a": self.a}


class GridTime:
    """``t`` uniform on ``{0, 1/k, ..., (k-1)/k}``: the times a k-step Euler sampler visits
    (k-step distillation; ``k = 1`` trains the one-step map ``z0 -> z0 + v(z0, 0)``)."""

    name = "grid"

    def __init__(self, k: int = 1):
        if not (isinstance(k, int) and k >= 1):
            raise SettingError("k", f"expected a positive integer number of steps, got {k}")
        self.k = k

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        device = _device(generator, device)
        return torch.randint(self.k, (n,), generator=generator, device=device).float() / self.k

    def config(self) -> dict:
        return {"name": self.name, "k": self.k}


TIME_SAMPLERS = {"uniform": UniformTime, "logit-normal": LogitNormalTime, "u-shaped": UShapedTime, "grid": GridTime}


def make_time_sampler(name: str, **kwargs):
    if name not in TIME_SAMPLERS:
        raise SettingError("time_dist", f"unknown time distribution {name!r}; expected one of {', '.join(TIME_SAMPLERS)}")
    return TIME_SAMPLERS[name](**kwargs)


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift a sampling grid towards noise (``shift > 1``) as in SD3: ``s t / (1 + (s - 1) t)``.

    Written in this package's convention (t = 1 is data), it keeps 0 and 1 fixed.
    """
    if not shift > 0:
        raise SettingError("time_shift", f"expected a positive value, got {shift}")
    return t / (shift - (shift - 1) * t)
