"""Where a training step's time goes: the torch profiler over flowmatch's own loop on the article
notebook's task (1000 checkerboard points, the 1.58 M-parameter MLP, batch 256).

    python benchmarks/profile_step.py                      # fp32 and bf16, 300 profiled steps each
    python benchmarks/profile_step.py --precision bf16 --steps 500 --rows 20

Prints, per precision, the operators with the most CPU time (self time: the operator's own
kernels, not its children) and the share of the step they take. Run it on an otherwise idle
machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from flowmatch.config import TrainConfig
from flowmatch.training import train


def profile_precision(precision: str, steps: int, batch: int, rows: int) -> None:
    cfg = TrainConfig(n_points=1000, steps=steps, batch_size=batch, lr=1e-4, warmup_steps=0, schedule="constant",
                      grad_clip=None, plots=False, precision=precision, checkpoint_every=steps, log_every=steps)
    with tempfile.TemporaryDirectory() as tmp:  # the whole run (setup and one checkpoint included), per step
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train(cfg, out=Path(tmp) / "run", progress=False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    n = cfg.steps
    print(f"\n{precision}: {n} steps, batch {batch}; {total / 1e3 / n:.2f} ms of operator time per step")
    print(f"{'operator':<44}{'calls/step':>11}{'ms/step':>10}{'share':>8}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"{e.key[:43]:<44}{e.count / n:11.1f}{e.self_cpu_time_total / 1e3 / n:10.3f}{e.self_cpu_time_total / total:8.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    for precision in args.precision.split(","):
        profile_precision(precision.strip(), args.steps, args.batch, args.rows)


if __name__ == "__main__":
    main()
