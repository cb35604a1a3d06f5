"""One-step generators side by side on the 2-D toys (MeanFlow and shortcut runs beside the rectified-flow
pipeline's distilled run): the share off the cells at 1, 2, 4 steps of each run's own sampler, W2/floor,
precision/recall and C2ST at one step (4000 samples), and the training wall-clock (a distilled or reflowed
run's teacher's, or the run that a `train --init` run started from, added while its run directory is there).
"what": the settings that differ from the defaults.

    flowmatch train --objective meanflow --out runs/meanflow
    python benchmarks/one_step.py runs/distilled runs/meanflow runs/shortcut --plot one_step.png
"""

import argparse
import json
from pathlib import Path

import torch

from flowmatch.config import TrainConfig
from flowmatch.metrics import evaluate
from flowmatch.runs import load_run

BOOKKEEPING = {"data", "seed", "plots", "log_every", "checkpoint_every", "eval_every", "eval_n", "eval_nfe", "lineage", "objective"}


def train_seconds(run_dir: Path) -> float:
    """The run's training wall-clock plus its teachers' (those still on disk)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    total = float(json.loads(lines[-1])["time"]) if lines else float("nan")
    train = json.loads((run_dir / "config.json").read_text())["train"]
    teacher = train.get("lineage", {}).get("teacher", {})
    if teacher.get("kind") == "flowmatch" and (Path(teacher["run"]) / "metrics.jsonl").exists():
        total += train_seconds(Path(teacher["run"]))
    if train.get("init") and (Path(train["init"]) / "metrics.jsonl").exists():  # started from a run (train --init)
        total += train_seconds(Path(train["init"]))
    return total


def describe(cfg: TrainConfig) -> str:
    if cfg.lineage.get("kind") in ("distill", "reflow"):
        return f"{cfg.lineage['kind']} ({cfg.lineage.get('pairs')} pairs)"
    base = TrainConfig(objective=cfg.objective)
    base.time_scale = base.model_spec()["time_scale"]  # runs save the resolved value
    changed = [f"{k} {v}" for k, v in vars(cfg).items() if k not in BOOKKEEPING and getattr(base, k) != v]
    return f"{cfg.objective} ({', '.join(changed) or 'defaults'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--nfe", default="1,2,4", help="comma-separated step counts")
    ap.add_argument("--plot", type=Path, default=None, help="one-step samples of every run, side by side (PNG)")
    args = ap.parse_args()
    nfes = [int(k) for k in args.nfe.split(",")]
    rows = []
    for run_dir in args.runs:
        run = load_run(run_dir)
        res = evaluate(run, nfes=nfes, n=4000, adaptive=None)
        rows.append({"run": str(run_dir), "what": describe(run.cfg), "train_s": train_seconds(run_dir), **res})
    head = " | ".join(f"off, {k} step{'s' * (k > 1)}" for k in nfes)
    print(f"| run | what | train s | {head} | W2/floor, 1 step | precision / recall, 1 step | C2ST, 1 step |")
    print("|---|---|---|" + "---|" * len(nfes) + "---|---|---|")
    for r in rows:
        one = r["nfe"][str(nfes[0])]
        offs = " | ".join(f"{100 * r['nfe'][str(k)]['off_support']:.1f}%" for k in nfes)
        print(f"| {r['run']} | {r['what']} | {r['train_s']:.0f} | {offs} | {one['ratio']:.2f} | "
              f"{one['precision']:.3f} / {one['recall']:.3f} | {one['c2st']:.3f} |")
    print(f"(data against data: off {100 * rows[0]['data']['off_support']:.1f}%, C2ST {rows[0]['data']['c2st']:.3f}; "
          f"W2 floor {rows[0]['floor']:.4f})")
    if args.plot:
        import matplotlib.pyplot as plt
        plt.switch_backend("Agg")

        fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.8), squeeze=False)
        for ax, run_dir, r in zip(axes[0], args.runs, rows):
            x = load_run(run_dir).sample(4000, nfe=nfes[0], seed=0)
            ax.scatter(x[:, 0], x[:, 1], s=1.0, alpha=0.5, color="C1")
            off = 100 * r["nfe"][str(nfes[0])]["off_support"]
            ax.set(title=f"{run_dir.name}\n{nfes[0]} step: {off:.1f}% off", xlim=(-4.5, 4.5), ylim=(-4.5, 4.5), aspect="equal")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
