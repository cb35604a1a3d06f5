"""Digits with the command line's defaults: wall-clock of `flowmatch train --data digits`, then
Fréchet distance over its floor (classifier features and PCA) of 1000 unconditional samples at
100 Euler steps, and the accuracy of samples asked for each digit with guidance 2.

    python benchmarks/digits.py --out runs/digits          # train, evaluate, copy the grids
    python benchmarks/digits.py --out runs/digits --reuse  # evaluate an existing run
    python benchmarks/digits.py --out runs/digits-sc --objective shortcut   # one-step generators:
                                                           # measured at their one step (--nfe)
    python benchmarks/digits.py --out runs/digits-sc1000 --objective shortcut --train "--time-scale 1000"
    python benchmarks/digits.py --out runs/d14/dist --reuse --cond-guidance 1,2   # also class-conditional
                                                           # samples (100 per class) at each weight: their
                                                           # Fréchet distances and the judge's accuracy

A student distilled from labelled pairs (`flowmatch distill --guidance W`) learns a one-step map per
class; its unconditional samples are the average over classes, so it is measured by `--cond-guidance`.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path

from flowmatch.cli import run as cli
from flowmatch.image_metrics import class_samples, evaluate_digits, image_scores, label_accuracy, run_data_name
from flowmatch.runs import load_run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/digits"))
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--objective", default="cfm", help="train --objective (cfm, meanflow, shortcut)")
    ap.add_argument("--steps", type=int, default=None, help="train --steps (default: the command line's)")
    ap.add_argument("--nfe", type=int, default=None, help="Euler steps to evaluate (default: the run's own, 100 or 1)")
    ap.add_argument("--train", default="", help="more train options, as one string (e.g. '--time-scale 1000')")
    ap.add_argument("--cond-guidance", default="", help="comma list of guidance weights: score class-conditional "
                    "samples (100 per class) at each")
    args = ap.parse_args()
    try:
        weights = [float(w) for w in args.cond_guidance.split(",")] if args.cond_guidance else []
    except ValueError:
        weights = [float("nan")]
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        ap.error(f"--cond-guidance: expected a comma list of finite weights >= 0, got {args.cond_guidance!r}")
    wall = float("nan")
    if not (args.reuse and (args.out / "ema.safetensors").exists()):
        t0 = time.perf_counter()
        extra = (["--steps", str(args.steps)] if args.steps else []) + shlex.split(args.train)
        if cli(["train", "--data", "digits", "--objective", args.objective, "--out", str(args.out), "--no-progress", *extra]) != 0:
            raise SystemExit("training failed")
        wall = time.perf_counter() - t0
    run = load_run(args.out)
    nfe = args.nfe or run.default_nfe
    res = evaluate_digits(run, n=1000, nfe=nfe, guidance=args.guidance)
    print(f"train wall-clock: {wall:.0f} s ({run.cfg.steps} steps, batch {run.cfg.batch_size}, model {run.cfg.model}, "
          f"objective {run.cfg.objective}); {nfe} Euler step(s)")
    print("| measure | value | floor (real vs real) | ratio |\n|---|---|---|---|")
    for space in ("classifier", "pca"):
        r = res[space]
        print(f"| Fréchet distance, {space} features | {r['fd']:.3f} | {r['floor']:.3f} | {r['ratio']:.2f} |")
    if "conditional" in res:
        c = res["conditional"]
        print(f"| accuracy of class-conditional samples (guidance {c['guidance']:g}, {c['per_class']} per class) "
              f"| {c['accuracy']:.3f} | judge on real test digits: {c['judge_accuracy_on_test']:.3f} | |")
    if weights:
        if not run.num_classes:
            ap.error(f"--cond-guidance: {args.out} has no classes to condition on")
        res["class_conditional"] = [conditional_scores(run, nfe, w) for w in weights]
        print("| class-conditional samples (100 per class) | classifier FD / floor | PCA FD / floor | label accuracy |\n|---|---|---|---|")
        for r in res["class_conditional"]:
            print(f"| guidance {r['guidance']:g} | {r['classifier']['ratio']:.2f} | {r['pca']['ratio']:.2f} | {r['accuracy']:.3f} |")
    (args.out / "digits_eval.json").write_text(json.dumps({"wall_s": wall, **res}, indent=1))


def conditional_scores(run, nfe: int, guidance: float, per_class: int = 100, seed: int = 0) -> dict:
    """Fréchet distances (classifier and PCA features, over their floors) of ``per_class`` samples
    of each class at ``guidance``, and how often the pixel judge reads them as their class."""
    data = run_data_name(run) or "digits"
    x, labels = class_samples(run, per_class, nfe, seed=seed, guidance=guidance)
    return {"guidance": guidance, "per_class": per_class, **image_scores(x, data, seed),
            "accuracy": label_accuracy(x, labels, data)}


if __name__ == "__main__":
    main()
