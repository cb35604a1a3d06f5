"""Two curricula for MeanFlow's one step on the checkerboard, measured and not landed: each trains
one run of ``--objective meanflow`` (any TrainConfig settings beside) with a schedule that the
library's objective does not have, then ``benchmarks/one_step.py`` scores it like any run.

    python benchmarks/meanflow_curricula.py --out runs/mf/ramp-s0 --curriculum ramp
    python benchmarks/meanflow_curricula.py --out runs/mf/alpha-s0 --curriculum alpha
    python benchmarks/meanflow_curricula.py --out runs/mf/alpha-b2048bf-s0 --curriculum alpha \
        --set precision=bf16 --set batch_size=2048 --set steps=3500
    python benchmarks/one_step.py runs/mf/ramp-s0 runs/mf/alpha-s0 runs/mf/alpha-b2048bf-s0

- ``ramp``: flow matching first. The share of interval pairs is 0 for the first quarter of the
  steps, then grows linearly to ``--meanflow-share`` at half of them (``--ramp A,B``).
- ``alpha``: the alpha-flow curriculum (Zhang et al. 2025, "AlphaFlow"), a finite-difference
  MeanFlow without a JVP. An interval pair ``[t, t_end]`` (``h = t_end - t``) splits at ``s = t +
  alpha h``; on the straight path the point at ``s`` is the same pair's ``z_s``, so the average
  velocity's identity ``h u(z_t, t, t_end) = alpha h v + (1 - alpha) h u(z_s, s, t_end)`` gives the
  target ``alpha v + (1 - alpha) u(z_s, s, t_end)`` (stop-gradient, one extra forward pass), its
  squared error scaled by ``1/alpha``. ``alpha = 1`` is trajectory flow matching (every interval
  regresses ``v``); ``alpha -> 0`` is MeanFlow's identity. ``alpha`` stays 1 for the first 20% of
  the steps, then falls log-linearly to 0.01 at 70%, and stays there (``--alpha A,B,MIN``).
  The adaptive weight (``--meanflow-power``) applies on top, as in MeanFlow.

The training loop is flowmatch's own (``flowmatch.training.train``); the curriculum sets the
objective's schedule before each optimisation step.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from levers import parse_variant  # noqa: I001 (benchmarks/ is the script's folder)

from flowmatch import training
from flowmatch.config import TrainConfig
from flowmatch.objectives import MeanFlow


class AlphaFlow(MeanFlow):
    """MeanFlow's pairs with the alpha-flow target (see the module's docstring)."""

    alpha = 1.0

    def target(self, model, d):
        shape = (-1,) + (1,) * (d.x0.dim() - 1)
        ps = self.path.sample(d.x0, d.x1, d.t)
        v, h = ps.u_t, d.t_end - d.t
        pred = model(ps.x_t, d.t, d.label, h=h)
        if self.alpha >= 1:
            return pred, v.detach()
        s = d.t + self.alpha * h
        z_s = self.path.sample(d.x0, d.x1, s).x_t
        with torch.no_grad():
            rest = model(z_s, s, d.label, h=(1 - self.alpha) * h)
        target = torch.where((h > 0).view(shape), self.alpha * v + (1 - self.alpha) * rest.to(v.dtype), v)
        return pred, target.detach()

    def loss(self, model, d):
        pred, target = self.target(model, d)
        err = (pred.float() - target.float()).flatten(1).pow(2).sum(1)
        err = err * torch.where(d.t_end > d.t, 1 / self.alpha, 1.0)
        return (err / (err.detach() + self.c) ** self.power).mean()


def alpha_at(frac: float, start: float, end: float, low: float) -> float:
    """1 before ``start``, log-linear to ``low`` at ``end``, then ``low``."""
    if frac < start:
        return 1.0
    return low if frac >= end else math.exp(math.log(low) * (frac - start) / (end - start))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--curriculum", choices=("ramp", "alpha"), required=True)
    ap.add_argument("--ramp", default="0.25,0.5", help="ramp: the fractions of the steps where the share starts and ends growing")
    ap.add_argument("--alpha", default="0.2,0.7,0.01", help="alpha: start, end (fractions of the steps), lowest alpha")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig setting (JSON value)")
    args = ap.parse_args()
    _, over = parse_variant("curriculum:" + ",".join(args.set))  # levers.py's KEY=VALUE reading, with its type checks
    cfg = TrainConfig(**{"objective": "meanflow", "plots": False, **over})
    if cfg.objective != "meanflow":
        raise SystemExit("--set objective: the curricula are MeanFlow's")

    full = cfg.meanflow_share
    ramp = [float(x) for x in args.ramp.split(",")]
    alpha = [float(x) for x in args.alpha.split(",")]
    step = training.Trainer.optimisation_step
    make = training.make_objective

    def scheduled_step(self):
        frac = self.step / self.cfg.steps
        if args.curriculum == "ramp":
            self.objective.share = full * min(1.0, max(0.0, (frac - ramp[0]) / max(ramp[1] - ramp[0], 1e-9)))
        else:
            self.objective.alpha = alpha_at(frac, *alpha)
        return step(self)

    def make_alpha(cfg, parts):
        obj = make(cfg, parts)
        obj.__class__ = AlphaFlow  # the same MeanFlow, its target and loss replaced
        return obj

    training.Trainer.optimisation_step = scheduled_step
    if args.curriculum == "alpha":
        training.make_objective = make_alpha
    training.train(cfg, args.out, progress=True)
    print(f"wrote {args.out}; score it with python benchmarks/one_step.py {args.out}")


if __name__ == "__main__":
    main()
