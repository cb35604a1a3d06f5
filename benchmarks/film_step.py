"""What FiLM time conditioning (``--film``) costs a training step: the default checkerboard setup
(the MLP of ``flowmatch train``, batch 512) with and without it, per objective.

    python benchmarks/film_step.py                      # cfm and meanflow, 5 rounds of 20 steps
    python benchmarks/film_step.py --objectives cfm --rounds 9

Each row is flowmatch's own ``Trainer.optimisation_step`` (draws, loss, backward, clipping, AdamW,
EMA); rows run interleaved in blocks of ``--steps`` steps, so the machine's drift hits them alike.
The table gives the median ms per step and the ratio to the same objective without FiLM. Run it
alone: timings on 2 shared cores drift by a quarter between runs.
"""

from __future__ import annotations

import argparse

from meanflow_step import compare_steps  # noqa: I001 (benchmarks/ is the script's folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", default="cfm,meanflow", help="comma-separated: cfm, meanflow, shortcut")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    args = ap.parse_args()
    rows = [(o, film) for o in args.objectives.split(",") for film in (False, True)]
    ms = compare_steps({(o, film): {"objective": o, "film": film} for o, film in rows}, args.rounds, args.steps)
    print(f"median of {args.rounds} rounds of {args.steps} steps, batch 512")
    print("| objective | FiLM | ms per step | x without FiLM |\n|---|---|---:|---:|")
    for o, film in rows:
        print(f"| {o} | {'yes' if film else 'no'} | {ms[(o, film)]:.1f} | {ms[(o, film)] / ms[(o, False)]:.2f}x |")


if __name__ == "__main__":
    main()
