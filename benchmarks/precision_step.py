"""A checkerboard training step in fp32 against bf16 autocast, per batch size: what
``--precision`` buys the 2-D MLP of ``flowmatch train`` on this CPU.

    python benchmarks/precision_step.py                         # batches 512 and 2048, fp32 and bf16
    python benchmarks/precision_step.py --batches 512,1024,2048 --rounds 9 --objective meanflow

Each row is flowmatch's own ``Trainer.optimisation_step`` (draws, loss, backward, clipping, AdamW,
EMA) under one setting; rows run interleaved, in blocks of ``--steps`` steps, so that the machine's
drift hits every row alike. The table gives the median ms per step, samples per second, and the
ratio to fp32 at the same batch. Run it alone: timings on 2 shared cores drift by a quarter.
On a CPU without bfloat16 units (no AMX or AVX512-BF16) autocast emulates bf16 and the bf16 rows
are many times slower; they are still measured, since that is what a user would get.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from meanflow_step import make_step, median_ms  # noqa: I001 (benchmarks/ is the script's folder)


def main() -> None:
    from flowmatch.training import cpu_has_bf16

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="512,2048", help="comma-separated batch sizes")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--objective", default="cfm", help="cfm, meanflow or shortcut")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    precisions = args.precisions.split(",")
    rows = [(b, p) for b in batches for p in precisions]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {(b, p): make_step(Path(tmp) / f"{b}-{p}", objective=args.objective, batch_size=b, precision=p)
                    for b, p in rows}
        ms = median_ms(trainers, args.rounds, args.steps)
    print(f"objective {args.objective}; median of {args.rounds} rounds of {args.steps} steps; "
          f"{torch.get_num_threads()} torch threads; bf16 units: {'yes' if cpu_has_bf16() else 'no'}")
    print("| batch | precision | ms per step | samples/s | x fp32 at this batch |\n|---:|---|---:|---:|---:|")
    for b, p in rows:
        base = ms[(b, precisions[0])]
        print(f"| {b} | {p} | {ms[(b, p)]:.1f} | {b / ms[(b, p)] * 1e3:,.0f} | {base / ms[(b, p)]:.2f}x |")


if __name__ == "__main__":
    main()
