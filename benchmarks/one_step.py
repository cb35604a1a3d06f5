"""One-step generators side by side on the 2-D toys: MeanFlow and shortcut runs (one training run
each) beside the rectified-flow pipeline's distilled run, by the sharpness measures at 1, 2, 4
steps and the training wall-clock.

    flowmatch train --objective meanflow --out runs/meanflow
    flowmatch train --objective shortcut --out runs/shortcut
    python benchmarks/one_step.py runs/distilled runs/meanflow runs/shortcut --plot one_step.png

Each run is sampled with its own k-step sampler (Euler; MeanFlow and shortcut runs step with the
average velocity over each step), 4000 samples, W2 over 3 fresh reference draws. The wall-clock is
the run's own training time from metrics.jsonl; for a distilled or reflowed run its teacher's
training time is added when the teacher's run directory is still there (the teacher's pair
generation is not counted).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flowmatch.metrics import evaluate
from flowmatch.runs import load_run


def train_seconds(run_dir: Path) -> float:
    """The run's training wall-clock plus its teachers' (those still on disk)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    total = float(json.loads(lines[-1])["time"]) if lines else float("nan")
    teacher = json.loads((run_dir / "config.json").read_text())["train"].get("lineage", {}).get("teacher", {})
    if teacher.get("kind") == "flowmatch" and (Path(teacher["run"]) / "metrics.jsonl").exists():
        total += train_seconds(Path(teacher["run"]))
    return total


def own_trajectories(cfg) -> str:
    """MeanFlow's --meanflow-distill settings, where a run has them."""
    if not cfg.meanflow_distill:
        return ""
    return (f", own trajectories {cfg.meanflow_distill:g} of the batch (whole step {cfg.meanflow_distill_whole:g}) from "
            f"{cfg.meanflow_distill_start:g} of the steps, {cfg.meanflow_distill_pairs} x {cfg.meanflow_distill_nfe} NFE "
            f"every {cfg.meanflow_distill_every}")


def describe(run) -> str:
    cfg = run.cfg
    if cfg.lineage.get("kind") in ("distill", "reflow"):
        return f"{cfg.lineage['kind']} ({cfg.lineage.get('pairs')} pairs)"
    tangent = ", model tangent" if cfg.meanflow_tangent == "model" else ""
    tangent += f", flow-matching times {cfg.meanflow_fm_time}"
    extra = {"meanflow": f", share {cfg.meanflow_share:g}, power {cfg.meanflow_power:g}{tangent}",
             "shortcut": f", share {cfg.shortcut_share:g}, finest 1/{cfg.shortcut_steps}"}.get(cfg.objective, "")
    times = {"uniform": "", "logit-normal": f", times logit-normal({cfg.time_mean:g}, {cfg.time_std:g})"}.get(
        cfg.time_dist, f", times {cfg.time_dist}")
    # what else sets a run apart: the coupling, the batch and the step count, a non-default Fourier scale
    setup = "".join([", OT coupling" if cfg.coupling == "ot" else "", f", batch {cfg.batch_size}, {cfg.steps} steps",
                     f", Fourier scale {cfg.fourier_scale:g}" if cfg.fourier and cfg.fourier_scale != 1.0 else "",
                     own_trajectories(cfg)])
    return f"{cfg.objective} ({cfg.model_spec()['prediction']} prediction{extra}{times}{setup})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--nfe", default="1,2,4", help="comma-separated step counts")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--plot", type=Path, default=None, help="one-step samples of every run, side by side (PNG)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    nfes = [int(k) for k in args.nfe.split(",")]
    rows = []
    for run_dir in args.runs:
        run = load_run(run_dir)
        res = evaluate(run, nfes=nfes, n=args.n, adaptive=None)
        rows.append({"run": str(run_dir), "what": describe(run), "train_s": train_seconds(run_dir), **res})
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
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.plot:
        plot(args.runs, rows, nfes[0], args.n, args.plot)


def plot(run_dirs, rows, nfe: int, n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(run_dirs), figsize=(3.6 * len(run_dirs), 3.8), squeeze=False)
    for ax, run_dir, r in zip(axes[0], run_dirs, rows):
        x = load_run(run_dir).sample(n, nfe=nfe, seed=0)
        ax.scatter(x[:, 0], x[:, 1], s=1.0, alpha=0.5, color="C1")
        off = 100 * r["nfe"][str(nfe)]["off_support"]
        ax.set(title=f"{Path(run_dir).name}\n{nfe} step: {off:.1f}% off", xlim=(-4.5, 4.5), ylim=(-4.5, 4.5), aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
