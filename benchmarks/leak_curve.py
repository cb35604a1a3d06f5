"""Leak against training minutes: one long checkerboard run, and at each checkpoint the share of
its EMA model's samples that land off the board's 8 cells (100 Euler steps, 8 midpoint
evaluations; 4000 samples). Training time excludes the measurements.

    python benchmarks/leak_curve.py --out runs/curve --set steps=30000 --set checkpoint_every=3000
    python benchmarks/leak_curve.py --out runs/curve-ff --set fourier=64 --set steps=30000 --plot curve.png

The learning-rate schedule is the run's own (its cosine decay spans all ``steps``), so an early
point is a run that has not yet annealed, not a shorter run. Prints one JSON line per checkpoint,
then a table; ``--plot`` draws leak against minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from levers import parse_variant  # noqa: I001 (benchmarks/ is the script's folder)

from flowmatch.config import TrainConfig
from flowmatch.metrics import off_support
from flowmatch.solvers import integrate
from flowmatch.training import train


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], help="a TrainConfig override, e.g. steps=30000")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--plot")
    args = ap.parse_args()
    _, over = parse_variant("run:" + ",".join(args.set))
    cfg = TrainConfig(**{"plots": False, **over})
    points, paused = [], [0.0]
    t0 = time.perf_counter()

    def measure(step, ema):
        start = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(args.n, 2, generator=g)
        with torch.inference_mode():
            row = {"step": step, "train_min": (start - t0 - paused[0]) / 60}
            for solver, nfe in (("euler", 100), ("midpoint", 8)):
                x = integrate(lambda x, t: ema(x, t), x0, solver, nfe).x
                row[f"{solver}{nfe}"] = off_support("checkerboard", x)
        points.append(row)
        print(json.dumps(row), flush=True)
        paused[0] += time.perf_counter() - start

    train(cfg, out=Path(args.out), progress=False, on_checkpoint=measure)
    print(f"\nsettings: {json.dumps(over)}\n{'step':>7} {'train min':>9} {'euler100 %':>10} {'midpoint8 %':>11}")
    for p in points:
        print(f"{p['step']:>7} {p['train_min']:9.2f} {100 * p['euler100']:10.2f} {100 * p['midpoint8']:11.2f}")
    if args.plot:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key in ("euler100", "midpoint8"):
            ax.plot([p["train_min"] for p in points], [100 * p[key] for p in points], marker="o", label=key)
        ax.set(xlabel="training minutes (this machine)", ylabel="% of samples off the cells", yscale="log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
