"""Digits with the command line's defaults: wall-clock of `flowmatch train --data digits`, Fréchet distance
over its floor (classifier features, PCA) of 1000 samples at 100 Euler steps (one-step objectives: one), and
the accuracy of samples asked for each digit at guidance 2; ``--cond-guidance``: 100 samples per class at each
weight, scored alike (how a student distilled from labelled pairs, one map per class, is measured).

    python benchmarks/digits.py --out runs/digits                          # train, evaluate
    python benchmarks/digits.py --out runs/digits-sc --objective shortcut --train "--time-scale 1000"
    python benchmarks/digits.py --out runs/d14/dist --reuse --cond-guidance 1,2
"""

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
    ap.add_argument("--reuse", action="store_true", help="evaluate the run in --out when it exists")
    ap.add_argument("--objective", default="cfm", help="train --objective (cfm, meanflow, shortcut)")
    ap.add_argument("--steps", type=int, default=None, help="train --steps (default: the command line's)")
    ap.add_argument("--nfe", type=int, default=None, help="Euler steps to evaluate (default: the run's own, 100 or 1)")
    ap.add_argument("--train", default="", help="more train options, as one string (e.g. '--time-scale 1000')")
    ap.add_argument("--cond-guidance", default="", help="comma list of guidance weights: score class-conditional samples")
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
    res = evaluate_digits(run, n=1000, nfe=nfe, guidance=2.0)
    print(f"train wall-clock: {wall:.0f} s ({run.cfg.steps} steps, batch {run.cfg.batch_size}, model {run.cfg.model}, "
          f"objective {run.cfg.objective}); {nfe} Euler step(s)\n| measure | value | floor (real vs real) | ratio |\n|---|---|---|---|")
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
    """Fréchet distances over their floors of ``per_class`` samples of each class, and the judge's accuracy."""
    data = run_data_name(run) or "digits"
    x, labels = class_samples(run, per_class, nfe, seed=seed, guidance=guidance)
    return {"guidance": guidance, "per_class": per_class, **image_scores(x, data, seed), "accuracy": label_accuracy(x, labels, data)}


if __name__ == "__main__":
    main()
