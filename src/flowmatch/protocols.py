"""The small interfaces a class of your own implements to plug into :class:`~flowmatch.objectives.CFM`
and :class:`~flowmatch.objectives.MeanFlow` (structural typing: no base class to inherit).

    class MyTimes:
        def sample(self, n, generator=None, device=None):
            return torch.rand(n, generator=generator, device=device) ** 2   # more weight near the noise

    objective = flowmatch.CFM(time_sampler=MyTimes())
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .paths import PathSample


@runtime_checkable
class Path(Protocol):
    """A probability path from noise (``t = 0``) to data (``t = 1``): the point ``x_t`` and its
    target velocity ``u_t`` for noise ``x0``, data ``x1`` (same shape) and times ``t`` of shape (B,).
    The stable target and the SDE sampler need an affine path (:class:`~flowmatch.paths.AffinePath`)."""

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> PathSample: ...


@runtime_checkable
class TimeSampler(Protocol):
    """Training times: ``n`` draws in [0, 1] from ``generator`` (None: torch's global one) on
    ``device`` (None: the generator's device)."""

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor: ...


@runtime_checkable
class Coupling(Protocol):
    """How noise rows meet data rows in a batch: returns ``(x0, x1, labels)`` re-paired (labels
    follow their data rows; ``None`` stays ``None``)."""

    def pair(self, x0: torch.Tensor, x1: torch.Tensor, generator: torch.Generator | None = None,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


__all__ = ["Path", "TimeSampler", "Coupling"]
