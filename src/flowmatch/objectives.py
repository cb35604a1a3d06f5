"""Training objectives: what one micro-batch of data costs a network.

An objective has two steps, so that the training loop needs to know nothing of it:

- ``draw(batch, generator)``: the randomness of the step (noise, times, pairing, label
  dropout), outside autocast and in a fixed order, so that a run is reproducible;
- ``loss(model, drawn)``: the scalar loss of the network on those draws (run under autocast).

:class:`CFM` is conditional flow matching; other objectives (one-step generators) plug in
beside it through :func:`make_objective`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Batch
from .paths import AffinePath


def cfm_loss(model, path: AffinePath, x0, x1, t, label=None, loss: str = "mse", huber_c: float | None = None) -> torch.Tensor:
    """Conditional flow matching: ``E || v(x_t, t) - u_t ||^2`` (mean over all entries).

    ``loss="pseudo-huber"``: ``E [sqrt(||v - u||^2 + c^2) - c]`` per sample (Song & Dhariwal
    2023; RF++, Lee et al. 2024), with ``c = 0.00054 sqrt(D)`` unless given. Its minimiser is a
    (geometric) median, not the mean: meant for fixed pairs (distillation), where the target is
    a function of the noise and a network too smooth to follow it should pick a side rather
    than land between two cells.
    """
    ps = path.sample(x0, x1, t)
    pred = model(ps.x_t, t, label) if label is not None else model(ps.x_t, t)
    if loss == "mse":
        return torch.nn.functional.mse_loss(pred.float(), ps.u_t.float())
    d2 = (pred.float() - ps.u_t.float()).flatten(1).pow(2).sum(1)
    c = huber_c if huber_c is not None else 0.00054 * d2.new_tensor(x0[0].numel()).sqrt()
    return ((d2 + c**2).sqrt() - c).mean()


@dataclass
class Drawn:
    """One micro-batch's draws: noise ``x0`` paired with data ``x1``, times ``t``, labels
    (``-1`` = dropped, for classifier-free guidance) or ``None``."""

    x0: torch.Tensor
    x1: torch.Tensor
    t: torch.Tensor
    label: torch.Tensor | None


class CFM:
    """Conditional flow matching: noise ``x0 ~ N(0, I)`` (or a batch's fixed ``x0``: teacher
    pairs), times from ``time_sampler``, pairs from ``coupling``, the path's velocity as target."""

    name = "cfm"

    def __init__(self, path: AffinePath, time_sampler, coupling, label_dropout: float = 0.0, loss: str = "mse",
                 huber_c: float | None = None):
        self.path, self.time_sampler, self.coupling = path, time_sampler, coupling
        self.label_dropout, self.loss_name, self.huber_c = label_dropout, loss, huber_c

    def draw(self, batch: Batch, gen: torch.Generator) -> Drawn:
        x1 = batch.x1
        x0 = batch.x0 if batch.x0 is not None else torch.randn(x1.shape, generator=gen, device=x1.device)
        t = self.time_sampler.sample(len(x1), gen, device=x1.device)
        x0, x1, label = self.coupling.pair(x0, x1, gen, batch.label)
        if label is not None and self.label_dropout > 0:
            drop = torch.rand(len(label), generator=gen, device=x1.device) < self.label_dropout
            label = torch.where(drop, -1, label)
        return Drawn(x0, x1, t, label)

    def loss(self, model, d: Drawn) -> torch.Tensor:
        return cfm_loss(model, self.path, d.x0, d.x1, d.t, d.label, self.loss_name, self.huber_c)


def make_objective(cfg, parts) -> CFM:
    """The objective of a :class:`~flowmatch.config.TrainConfig` and its built parts."""
    return CFM(parts.path, parts.time_sampler, parts.coupling, cfg.label_dropout, cfg.loss, cfg.huber_c)
