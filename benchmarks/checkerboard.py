"""Default setup on the checkerboard: training steps/s, wall-clock, and W2/floor against NFE.

    python benchmarks/checkerboard.py                      # the defaults, seed 0
    python benchmarks/checkerboard.py --seeds 0,1,2        # quality over seeds
    python benchmarks/checkerboard.py --set batch_size=256 --set steps=15000   # a variant

Prints a table (W2 on 4000 generated vs 4000 fresh points, exact EMD; floor = the same
distance between two fresh draws) for Euler and midpoint at each NFE, and dopri5's NFE.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from flowmatch.config import TrainConfig
from flowmatch.metrics import evaluate
from flowmatch.runs import load_run
from flowmatch.training import train


def parse_set(items):
    out = {}
    hints = TrainConfig.__annotations__
    for item in items:
        key, value = item.split("=", 1)
        out[key] = json.loads(value) if hints.get(key) != "str" else value
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--set", action="append", default=[], help="override a TrainConfig field, e.g. steps=4000")
    ap.add_argument("--nfe", default="1,2,4,8,16,100")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    overrides = parse_set(args.set)
    nfes = [int(k) for k in args.nfe.split(",")]
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = TrainConfig(seed=seed, plots=False, **overrides)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run_dir = train(cfg, out=Path(tmp) / "run", progress=False)
            wall = time.perf_counter() - t0
            run = load_run(run_dir)
            euler = evaluate(run, nfes, seed=seed, solver="euler", adaptive="dopri5")
            mid = evaluate(run, [k for k in nfes if k % 2 == 0], seed=seed, solver="midpoint", adaptive=None)
        rows.append({"seed": seed, "wall_s": wall, "steps_per_s": cfg.steps / wall, "euler": euler, "midpoint": mid})
        print(f"seed {seed}: {cfg.steps} steps in {wall:.1f} s ({cfg.steps / wall:.1f} steps/s incl. checkpoints)",
              flush=True)
    print(f"\nsettings: {json.dumps(overrides) if overrides else 'defaults'}")
    header = f"{'solver':>9} {'NFE':>5} " + " ".join(f"{'seed ' + str(r['seed']):>8}" for r in rows) + f" {'mean':>7}"
    print("W2 / floor\n" + header)
    for solver in ("euler", "midpoint"):
        for k in rows[0][solver]["nfe"]:
            vals = [r[solver]["nfe"][k]["ratio"] for r in rows]
            print(f"{solver:>9} {k:>5} " + " ".join(f"{v:8.3f}" for v in vals) + f" {sum(vals) / len(vals):7.3f}")
    ad = [r["euler"]["adaptive"] for r in rows]
    print(f"{'dopri5':>9} {'':>5} " + " ".join(f"{a['ratio']:8.3f}" for a in ad) + "   (W2/floor)")
    print(f"{'dopri5':>9} {'NFE':>5} " + " ".join(f"{a['nfe']:8d}" for a in ad))
    print("straightness " + " ".join(f"{r['euler']['straightness']:.3f}" for r in rows))
    print("train wall-clock s " + " ".join(f"{r['wall_s']:.1f}" for r in rows))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
