"""Digits with the command line's defaults: wall-clock of `flowmatch train --data digits` (or ``--data mnist``, 28x28),
and at each NFE of ``--nfe`` (Euler steps; default: the run's own, 100 or 1) the Fréchet distance over its floor
(classifier features, PCA) and precision/recall of 1000 unconditional samples, the accuracy of samples asked for
each digit at guidance 2, and the seconds those samples took; ``--cond-guidance``: 100 samples per class at each
weight, scored alike (how a student distilled from labelled pairs, one map per class, is measured). With
``--reuse`` it evaluates the run in ``--out`` as it is (a reflowed, distilled or `train --init` run too).

    python benchmarks/digits.py --out runs/mnist --data mnist --nfe 10,20,50,100   # train, evaluate
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


def _weights(text: str) -> list[float] | None:
    try:
        values = [float(w) for w in text.split(",")] if text else []
    except ValueError:
        return None
    return values if all(math.isfinite(w) and w >= 0 for w in values) else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/digits"))
    ap.add_argument("--data", default="digits", choices=("digits", "mnist"), help="train --data (8x8 digits or 28x28 MNIST)")
    ap.add_argument("--reuse", action="store_true", help="evaluate the run in --out when it exists")
    ap.add_argument("--objective", default="cfm", help="train --objective (cfm, meanflow, shortcut)")
    ap.add_argument("--steps", type=int, default=None, help="train --steps (default: the command line's)")
    ap.add_argument("--nfe", default="", help="comma list of Euler step counts to evaluate (default: the run's own, 100 or 1)")
    ap.add_argument("--train", default="", help="more train options, as one string (e.g. '--time-scale 1000')")
    ap.add_argument("--cond-guidance", default="", help="comma list of guidance weights: score class-conditional samples")
    args = ap.parse_args()
    weights, nfes = _weights(args.cond_guidance), _weights(args.nfe)
    if weights is None:
        ap.error(f"--cond-guidance: expected a comma list of finite weights >= 0, got {args.cond_guidance!r}")
    if nfes is None or not all(k >= 1 and k == int(k) for k in nfes):
        ap.error(f"--nfe: expected a comma list of step counts >= 1, got {args.nfe!r}")
    wall = float("nan")  # an evaluated run's training time is in its metrics.jsonl
    if not (args.reuse and (args.out / "ema.safetensors").exists()):
        t0 = time.perf_counter()
        extra = (["--steps", str(args.steps)] if args.steps else []) + shlex.split(args.train)
        if cli(["train", "--data", args.data, "--objective", args.objective, "--out", str(args.out), "--no-progress", *extra]) != 0:
            raise SystemExit("training failed")
        wall = time.perf_counter() - t0
    run = load_run(args.out)
    rows = []
    for nfe in [int(k) for k in nfes] or [run.default_nfe]:
        t0 = time.perf_counter()
        res = evaluate_digits(run, n=1000, nfe=nfe, guidance=2.0)
        rows.append({**res, "eval_s": time.perf_counter() - t0})
    print(f"train wall-clock: {wall:.0f} s ({run.cfg.steps} steps, batch {run.cfg.batch_size}, model {run.cfg.model}, "
          f"objective {run.cfg.objective}); 1000 samples, floors: classifier {rows[0]['classifier']['floor']:.3f}, "
          f"PCA {rows[0]['pca']['floor']:.3f}\n| Euler steps | Fréchet/floor, classifier | Fréchet/floor, PCA "
          f"| precision | recall | label accuracy (guidance 2) | eval s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nfe']} | {r['classifier']['ratio']:.2f} | {r['pca']['ratio']:.2f} | {r['prdc']['precision']['value']:.3f} | "
              f"{r['prdc']['recall']['value']:.3f} | {r.get('conditional', {}).get('accuracy', float('nan')):.3f} | {r['eval_s']:.0f} |")
    print(f"(real training digits: precision {rows[0]['prdc']['precision']['data']:.3f}, recall {rows[0]['prdc']['recall']['data']:.3f})")
    res = {"wall_s": wall, "nfe": rows}
    if weights:
        if not run.num_classes:
            ap.error(f"--cond-guidance: {args.out} has no classes to condition on")
        nfe = rows[0]["nfe"]
        res["class_conditional"] = [conditional_scores(run, nfe, w) for w in weights]
        print(f"| class-conditional samples (100 per class, {nfe} steps) | classifier FD / floor | PCA FD / floor | precision "
              f"| recall | label accuracy |\n|---|---|---|---|---|---|")
        for r in res["class_conditional"]:
            print(f"| guidance {r['guidance']:g} | {r['classifier']['ratio']:.2f} | {r['pca']['ratio']:.2f} "
                  f"| {r['prdc']['precision']['value']:.3f} | {r['prdc']['recall']['value']:.3f} | {r['accuracy']:.3f} |")
    (args.out / "digits_eval.json").write_text(json.dumps(res, indent=1))


def conditional_scores(run, nfe: int, guidance: float, per_class: int = 100, seed: int = 0) -> dict:
    """Fréchet distances over their floors of ``per_class`` samples of each class, and the judge's accuracy."""
    data = run_data_name(run) or "digits"
    x, labels = class_samples(run, per_class, nfe, seed=seed, guidance=guidance)
    return {"guidance": guidance, "per_class": per_class, **image_scores(x, data, seed), "accuracy": label_accuracy(x, labels, data)}


if __name__ == "__main__":
    main()
