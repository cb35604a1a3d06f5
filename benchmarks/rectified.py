"""Rectified flow on the checkerboard with the command line's defaults: 1-RF (train), 2-RF (reflow), and
the one-step generator distilled from 2-RF (distill). Prints wall-clock per stage, straightness, and W2/floor
and the share off the cells against Euler NFE for each run; writes quality_vs_nfe.png and
trajectories_1rf_2rf.png into --out.

    python benchmarks/rectified.py --out runs/rectified            # the whole pipeline (--reuse: existing runs)
"""

import argparse
import json
import time
from pathlib import Path

from flowmatch.cli import run as cli
from flowmatch.metrics import evaluate
from flowmatch.plots import compare_trajectories, quality_vs_nfe
from flowmatch.runs import load_run


def stage(args, out: Path, reuse: bool) -> float:
    if reuse and (out / "ema.safetensors").exists():
        return float("nan")
    t0 = time.perf_counter()
    if (rc := cli([*args, "--out", str(out), "--no-progress"])) != 0:
        raise SystemExit(f"{args[0]} failed with status {rc}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/rectified"))
    ap.add_argument("--reuse", action="store_true", help="skip stages whose run exists")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rf1, rf2, dist = args.out / "1rf", args.out / "2rf", args.out / "distilled"
    walls = {"1-RF": stage(["train"], rf1, args.reuse), "2-RF": stage(["reflow", str(rf1)], rf2, args.reuse),
             "distilled": stage(["distill", str(rf2)], dist, args.reuse)}
    nfes = [1, 2, 4, 8, 16, 100]
    results = {label: evaluate(load_run(d), nfes, seed=0, adaptive=None) for label, d in zip(walls, (rf1, rf2, dist))}
    print(f"{'run':>10} {'wall s':>7} {'straightness':>12} " + " ".join(f"{'NFE ' + str(k):>8}" for k in nfes))
    for label, res in results.items():
        ratios = " ".join(f"{res['nfe'][str(k)]['ratio']:8.3f}" for k in nfes)
        straight = f"{res['straightness']:12.4f}" if "straightness" in res else f"{'(a map)':>12}"  # distilled: no field
        print(f"{label:>10} {walls[label]:7.0f} {straight} {ratios}")
    print(f"(W2/floor, Euler; floor {results['1-RF']['floor']:.4f}, mean of {results['1-RF']['repeats']} reference draws)")
    print(f"\n{'run':>10} " + " ".join(f"{'NFE ' + str(k):>8}" for k in nfes))
    for label, res in results.items():
        print(f"{label:>10} " + " ".join(f"{100 * res['nfe'][str(k)]['off_support']:8.2f}" for k in nfes))
    print("(% of the samples off the cells, Euler; the data: 0)")
    quality_vs_nfe(results, args.out / "quality_vs_nfe.png", title="checkerboard: 1-RF, 2-RF, distilled")
    compare_trajectories({"1-RF": load_run(rf1), "2-RF": load_run(rf2)}, args.out / "trajectories_1rf_2rf.png")
    (args.out / "results.json").write_text(json.dumps({"wall_s": walls, "results": results}, indent=1))


if __name__ == "__main__":
    main()
