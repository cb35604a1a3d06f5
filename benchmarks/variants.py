"""Paths, couplings and time sampling on the checkerboard, each with the default settings
otherwise: W2/floor at NFE 1, 4, 16, 100 (Euler), straightness, and NLL (nats per sample).

    python benchmarks/variants.py --out runs/variants                  # all variants, one after another
    python benchmarks/variants.py --out runs/variants --only ot        # one variant (parallel jobs)
    python benchmarks/variants.py --out runs/variants --table          # print the table of finished ones

Each variant trains into ``--out/NAME`` and leaves ``--out/NAME.json``; the table reads those.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from flowmatch.config import TrainConfig
from flowmatch.likelihood import nll_summary
from flowmatch.metrics import evaluate
from flowmatch.runs import load_run
from flowmatch.training import train

VARIANTS = {
    "linear": {},
    "ot": {"coupling": "ot"},
    "vp": {"path": "vp"},
    "cosine": {"path": "cosine"},
    "logit-normal": {"time_dist": "logit-normal"},
}
NFES = (1, 4, 16, 100)


def run_variant(name: str, out: Path, nll_n: int, seed: int) -> dict:
    run_dir = out / name
    t0 = time.perf_counter()
    if not (run_dir / "ema.safetensors").exists():
        train(TrainConfig(seed=seed, plots=False, **VARIANTS[name]), out=run_dir, progress=False)
    wall = time.perf_counter() - t0
    run = load_run(run_dir)
    res = evaluate(run, NFES, seed=seed, adaptive=None)
    x = run.dataset.reference(nll_n, torch.Generator(device=run.device).manual_seed(seed + 2)).cpu()
    nll = nll_summary(run.log_prob(x, tol=1e-5), 2)
    row = {"variant": name, "settings": VARIANTS[name], "train_wall_s": wall, "device": str(run.device),
           "ratio": {k: res["nfe"][str(k)]["ratio"] for k in NFES}, "straightness": res["straightness"],
           "nll": nll["nll"], "nll_se": nll["se"]}
    (out / f"{name}.json").write_text(json.dumps(row, indent=1))
    return row


def table(out: Path) -> str:
    lines = ["| variant | W2/floor NFE 1 | NFE 4 | NFE 16 | NFE 100 | straightness | NLL (nats) |",
             "|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        f = out / f"{name}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        ratios = " | ".join(f"{r['ratio'][str(k)]:.2f}" for k in NFES)
        lines.append(f"| {name} | {ratios} | {r['straightness']:.3f} | {r['nll']:.3f} ± {r['nll_se']:.3f} |")
    lines.append(f"(NLL lower bound: the data's entropy log 32 = {math.log(32):.3f})")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/variants"))
    ap.add_argument("--only", choices=list(VARIANTS))
    ap.add_argument("--table", action="store_true", help="only print the table of finished variants")
    ap.add_argument("--nll-n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for name in [args.only] if args.only else VARIANTS:
            row = run_variant(name, args.out, args.nll_n, args.seed)
            print(f"{name}: {json.dumps(row)}", flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
