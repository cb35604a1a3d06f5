"""What the stable target (``--stf N``) costs a training step: the default checkerboard setup (the
MLP of ``flowmatch train``, batch 512) with N extra data points per step, against the plain target.

    python benchmarks/stf_step.py                       # N = 0, 1024, 4096, 16384; 5 rounds of 20 steps
    python benchmarks/stf_step.py --refs 0,4096 --rounds 9

Each row is flowmatch's own ``Trainer.optimisation_step`` (draws, the target, loss, backward,
clipping, AdamW, EMA); rows run interleaved in blocks of ``--steps`` steps, so the machine's drift
hits them alike. The table gives the median ms per step and the ratio to the first row's (the plain target). Run it
alone: timings on 2 shared cores drift by a quarter between runs.
"""

from __future__ import annotations

import argparse

from meanflow_step import compare_steps  # noqa: I001 (benchmarks/ is the script's folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", default="0,1024,4096,16384", help="comma-separated --stf values (0: the plain target)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    args = ap.parse_args()
    refs = [int(r) for r in args.refs.split(",")]
    ms = compare_steps({r: {"stf": r} for r in refs}, args.rounds, args.steps)
    print(f"median of {args.rounds} rounds of {args.steps} steps, batch 512")
    print(f"| --stf | ms per step | x --stf {refs[0]} |\n|---:|---:|---:|")
    for r in refs:
        print(f"| {r} | {ms[r]:.1f} | {ms[r] / ms[refs[0]]:.2f}x |")


if __name__ == "__main__":
    main()
