"""Where a checkerboard run misses: its samples off the cells against their distance to the
nearest cell, and the NLL of fresh points against their distance to the nearest cell edge.

    python benchmarks/edges.py runs/checkerboard runs/curve/steps16k-s0
    python benchmarks/edges.py RUN --n 300 --seed 0      # the points `flowmatch nll RUN --n 300` scores

Two tables per run set: the share of 4000 samples (100 Euler steps) off the cells, by distance to
the nearest cell (a blurred edge puts them within a tenth; bridges between cells further); and the
mean NLL (dopri5 at 1e-5, exact divergence) of fresh data points in bands of distance to the nearest
cell edge (the data's own density is 1/32 everywhere on the cells: log 32 = 3.466 nats in every band).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from flowmatch.data.toy2d import on_support
from flowmatch.runs import load_run

EDGE_BANDS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0 + 1e-9)
OFF_BANDS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, math.inf)


def cells() -> torch.Tensor:
    """(8, 2, 2): the checkerboard's cells as [[x_lo, y_lo], [x_hi, y_hi]] (column i, row j, i + j odd)."""
    lo = [(-4.0 + 2 * i, -4.0 + 2 * j) for i in range(4) for j in range(4) if (i + j) % 2 == 1]
    lo_t = torch.tensor(lo, dtype=torch.float64)
    return torch.stack([lo_t, lo_t + 2], dim=1)


def distance_to_cells(x: torch.Tensor) -> torch.Tensor:
    """(N,) Euclidean distance from each point to the nearest cell (0 inside one)."""
    c = cells()
    p = x.double()[:, None, :]
    gap = torch.clamp(torch.maximum(c[None, :, 0] - p, p - c[None, :, 1]), min=0)
    return gap.norm(dim=-1).min(dim=1).values


def distance_to_edge(x: torch.Tensor) -> torch.Tensor:
    """(N,) for points inside the cells: distance to the nearest cell edge (every edge lies on an
    even coordinate, so it is the nearest even number in either coordinate)."""
    x = x.double()
    return (x - 2 * torch.round(x / 2)).abs().min(dim=1).values


def bands(values: torch.Tensor, key: torch.Tensor, edges) -> list[tuple[int, float, float]]:
    """(count, mean, max) of ``values`` per band ``[a, b)`` of ``key``."""
    out = []
    for a, b in zip(edges, edges[1:]):
        m = (key >= a) & (key < b)
        v = values[m]
        out.append((int(m.sum()), v.mean().item() if len(v) else math.nan, v.max().item() if len(v) else math.nan))
    return out


def label(a: float, b: float) -> str:
    return f"{a:g}-{b:.2g}" if math.isfinite(b) else f">= {a:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="checkerboard run directories")
    ap.add_argument("--n", type=int, default=300, help="fresh points to score (as flowmatch nll --n)")
    ap.add_argument("--seed", type=int, default=0, help="as flowmatch nll --seed: the same points")
    ap.add_argument("--samples", type=int, default=4000)
    args = ap.parse_args()
    off_rows, nll_rows = [], []
    for d in args.runs:
        run = load_run(d)
        if run.dataset.name != "checkerboard":
            raise SystemExit(f"{d}: a checkerboard run is needed, this one models {run.dataset.name}")
        x = run.sample(args.samples, nfe=100, seed=args.seed)
        off = ~on_support("checkerboard", x)
        dist = distance_to_cells(x[off])
        counts = [c for c, _, _ in bands(torch.ones(len(dist)), dist, OFF_BANDS)]
        off_rows.append(f"| {d} | {off.float().mean().item():.2%} | "
                        + " | ".join(f"{c / max(1, len(dist)):.0%}" for c in counts) + " |")
        pts = run.dataset.reference(args.n, torch.Generator(device=run.device).manual_seed(args.seed + 2)).cpu()
        nll = -run.log_prob(pts, tol=1e-5, seed=args.seed)
        edge = distance_to_edge(pts)
        per = bands(nll, edge, EDGE_BANDS)
        rim = edge >= EDGE_BANDS[1]
        nll_rows.append(f"| {d} | " + " | ".join(f"{m:.2f} (max {mx:.1f})" for _, m, mx in per)
                        + f" | {nll.mean().item():.2f} ± {(nll.std() / math.sqrt(len(nll))).item():.2f} | "
                        f"{nll[rim].mean().item():.2f} |")
        print(f"{d}: done", flush=True)
    print(f"\nsamples off the cells ({args.samples}, 100 Euler steps) by distance to the nearest cell:\n")
    print("| run | off the cells | " + " | ".join(label(a, b) for a, b in zip(OFF_BANDS, OFF_BANDS[1:])) + " |")
    print("|---|---:|" + "---:|" * (len(OFF_BANDS) - 1))
    print("\n".join(off_rows))
    counts = [c for c, _, _ in bands(torch.ones(args.n), edge, EDGE_BANDS)]
    print(f"\nNLL (nats) of {args.n} fresh points by distance to the nearest cell edge (log 32 = {math.log(32):.3f}):\n")
    print("| run | " + " | ".join(f"{label(a, b)} ({c})" for (a, b), c in zip(zip(EDGE_BANDS, EDGE_BANDS[1:]), counts))
          + f" | all {args.n} | beyond {EDGE_BANDS[1]:g} of an edge |")
    print("|---|" + "---:|" * (len(EDGE_BANDS) + 1))
    print("\n".join(nll_rows))


if __name__ == "__main__":
    main()
