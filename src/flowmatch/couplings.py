"""How noise ``x0`` and data ``x1`` are paired in a training batch.

A coupling takes a batch of noise and a batch of data and returns them re-paired; any
coupling works with any path. ``independent`` keeps the product coupling of the article;
``ot`` pairs them by an exact minibatch optimal-transport plan (Tong et al. 2023,
Pooladian et al. 2023) computed with POT; ``fixed`` keeps pairs that came together from the
data source (reflow and distillation, where ``x0`` is the teacher's noise).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .errors import SettingError


class IndependentCoupling:
    """Product coupling: ``x0`` and ``x1`` drawn independently (the article's choice)."""

    name = "independent"

    def pair(self, x0, x1, generator=None, labels=None):
        return x0, x1, labels

    def config(self) -> dict:
        return {"name": self.name}


class FixedCoupling(IndependentCoupling):
    """Pairs given by the data source (teacher noise -> teacher sample); kept as they are."""

    name = "fixed"


class OTCoupling:
    """Minibatch optimal transport: re-pair a batch by the OT plan for squared Euclidean cost.

    ``method="exact"`` solves the assignment with ``ot.emd`` (fine up to ~1024 per batch);
    ``method="sinkhorn"`` uses entropic OT (``ot.sinkhorn``, ``reg`` relative to the mean
    cost). Pairs are drawn from the plan, one per row. With ``by_class=True`` and labels,
    noise is matched only with data of the same class. No silent fallback: a plan that POT
    reports as failed raises.
    """

    name = "ot"

    def __init__(self, method: str = "exact", reg: float = 0.05, by_class: bool = False):
        if method not in ("exact", "sinkhorn"):
            raise SettingError("ot_method", f"expected exact or sinkhorn, got {method!r}")
        self.method, self.reg, self.by_class = method, float(reg), bool(by_class)

    def _plan(self, x0: torch.Tensor, x1: torch.Tensor) -> np.ndarray:
        import ot  # POT takes 3 s to import (scikit-learn, its backends): only runs that pair by OT pay it

        a = x0.reshape(len(x0), -1).double().cpu().numpy()
        b = x1.reshape(len(x1), -1).double().cpu().numpy()
        cost = ot.dist(a, b)  # squared Euclidean
        w0, w1 = ot.unif(len(a)), ot.unif(len(b))
        if self.method == "exact":
            plan, log = ot.emd(w0, w1, cost, numItermax=1_000_000, log=True)
            if log["warning"] is not None:
                raise RuntimeError(f"minibatch OT did not converge: {log['warning']}")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence is checked below, on the marginals
                plan = ot.sinkhorn(w0, w1, cost / cost.mean(), self.reg, numItermax=10_000)
            if np.abs(plan.sum(1) - w0).max() > 1e-3 * w0[0] or np.abs(plan.sum(0) - w1).max() > 1e-3 * w1[0]:
                raise RuntimeError(f"Sinkhorn did not converge at reg={self.reg}; use a larger reg or method='exact'")
        if not np.isfinite(plan).all() or plan.sum() <= 0:
            raise RuntimeError("minibatch OT returned an invalid plan")
        return plan

    def _match(self, x0, x1, generator) -> torch.Tensor:
        """For each row of ``x1``, the index of the noise row it is paired with (CPU, long)."""
        plan = torch.from_numpy(self._plan(x0, x1)).clamp_min(0)
        # one noise sample per data sample: draw x0's index for each row of x1
        return torch.multinomial(plan.T.float() + 1e-30, 1, generator=_cpu(generator)).squeeze(1)

    def indices(self, x0, x1, generator=None, labels=None) -> torch.Tensor:
        """The pairing as indices: row ``i`` of ``x1`` goes with row ``j[i]`` of ``x0`` (within its
        class with ``by_class``)."""
        if not self.by_class or labels is None:
            return self._match(x0, x1, generator)
        labels = labels.cpu()
        j = torch.empty(len(x1), dtype=torch.long)
        for c in labels.unique():
            idx = (labels == c).nonzero().squeeze(1)
            j[idx] = idx[self._match(x0[idx.to(x0.device)], x1[idx.to(x1.device)], generator)]
        return j

    def pair(self, x0, x1, generator=None, labels=None):
        """Re-pair the batch: ``x1`` and its labels stay, ``x0`` is reordered. The trainer pairs the
        whole global batch on every process (the same plan everywhere), then splits it."""
        return x0[self.indices(x0, x1, generator, labels).to(x0.device)], x1, labels

    def config(self) -> dict:
        return {"name": self.name, "method": self.method, "reg": self.reg, "by_class": self.by_class}


def _cpu(generator):
    """torch.multinomial on a CPU tensor needs a CPU generator; derive one from a device one."""
    if generator is None or generator.device.type == "cpu":
        return generator
    g = torch.Generator()
    g.manual_seed(int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item()))
    return g


COUPLINGS = {"independent": IndependentCoupling, "ot": OTCoupling, "fixed": FixedCoupling}


def make_coupling(name: str, **kwargs):
    if name not in COUPLINGS:
        raise SettingError("coupling", f"unknown coupling {name!r}; expected one of {', '.join(COUPLINGS)}")
    return COUPLINGS[name](**kwargs)
