"""Where checkerboard samples leave the cells: outside the board ([-4, 4]^2) or in the gaps between
its cells, for each run's one step (its own k-step sampler at k = 1) and its instantaneous field
integrated by the midpoint rule.

    python benchmarks/off_where.py runs/mf20/d50sh25-s0 runs/mf20/p-data-s0 --n 20000 --field-nfe 32

A field that spills past the board's edge sends its one-step student there too; a one step that
blurs across a cell's edge fills the gaps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flowmatch.data.toy2d import on_support
from flowmatch.runs import load_run


def split(x: torch.Tensor) -> tuple[float, float, float]:
    """Shares (percent) of ``x`` off the cells, outside the board, and in the gaps between cells."""
    off = ~on_support("checkerboard", x)
    outside = (x.abs() > 4).any(1)
    pct = lambda m: 100 * m.double().mean().item()  # noqa: E731
    return pct(off), pct(off & outside), pct(off & ~outside)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=20000, help="samples per measurement")
    ap.add_argument("--field-nfe", type=int, default=32, help="midpoint evaluations of the instantaneous field")
    ap.add_argument("--seed", type=int, default=1, help="noise seed")
    args = ap.parse_args()
    print("| run | sampler | off the cells | outside the board | in the gaps |")
    print("|---|---|---:|---:|---:|")
    for run_dir in args.runs:
        run = load_run(run_dir)
        for label, kw in (("1 step", {"nfe": 1, "solver": "euler"}),
                          (f"field, {args.field_nfe} midpoint", {"nfe": args.field_nfe, "solver": "midpoint"})):
            off, outside, gaps = split(run.sample(args.n, seed=args.seed, **kw))
            print(f"| {run_dir} | {label} | {off:.2f}% | {outside:.2f}% | {gaps:.2f}% |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
