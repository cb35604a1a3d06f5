"""What blurs the checkerboard, one lever at a time: train a variant of the defaults, then
count the samples that land off the board's 8 cells (the data: 0%).

    python benchmarks/levers.py --out runs/levers base: ff:fourier=64 ts:time_scale=100
    python benchmarks/levers.py --out runs/levers --seeds 0,1,2 defaults:

Each argument is NAME:KEY=VALUE,KEY=VALUE (TrainConfig fields; empty for the defaults). A run
already in OUT/NAME-sSEED is reused. Prints, per variant and seed, the training wall-clock and
the share of 4000 samples off the support with 100 Euler steps, 8 midpoint evaluations and 16
Euler steps, then the mean over seeds (``--weights model``: sampled with the raw weights instead of
the EMA's); ``--json FILE`` keeps every row; ``--plot FILE`` draws the
first seed's samples (100 Euler steps) of every variant beside its data, a row per data set:

    python benchmarks/levers.py --out runs/toys --plot toys.png moons:data=moons \
        moons-before:data=moons,fourier=0,prediction=velocity
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flowmatch.config import TrainConfig
from flowmatch.metrics import mean_log_density, off_support
from flowmatch.runs import load_run
from flowmatch.training import train

SOLVERS = (("euler", 100), ("midpoint", 8), ("euler", 16))


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    hints = TrainConfig.__annotations__
    over = {}
    for item in filter(None, body.split(",")):
        key, value = item.split("=", 1)
        if key not in hints:
            raise SystemExit(f"{text}: unknown TrainConfig field {key!r}")
        if hints[key] == "str":
            over[key] = value
            continue
        try:  # numbers, booleans, null; a bare word (logit-normal) for a str | None setting
            over[key] = json.loads(value)
        except json.JSONDecodeError:
            if "str" not in str(hints[key]):
                raise SystemExit(f"{text}: {key}={value} is not a value of type {hints[key]}") from None
            over[key] = value
    return name, over


def measure(run_dir: Path, seed: int, n: int = 4000, keep: dict | None = None, weights: str = "ema") -> dict:
    """Share off the support per solver; the data's own share and, where the density is
    positive everywhere, the mean true log-density of samples (100 Euler steps) and of data."""
    import torch

    run = load_run(run_dir, weights=weights)
    toy = run.dataset.name
    out = {"data": run.dataset.name}
    for s, k in SOLVERS:
        x = run.sample(n, nfe=k, solver=s, seed=seed)
        out[f"{s}{k}"] = off_support(toy, x)
        if (s, k) == SOLVERS[0]:
            out["log_p"] = mean_log_density(toy, x)
            if keep is not None:
                keep["samples"] = x
    ref = run.dataset.reference(n, torch.Generator().manual_seed(seed + 1))
    if keep is not None:
        keep["data"] = ref
    return out | {"data_off": off_support(toy, ref), "data_log_p": mean_log_density(toy, ref)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME:KEY=VALUE,... (TrainConfig overrides)")
    ap.add_argument("--out", default="runs/levers")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--json", help="append every row to this JSON-lines file")
    ap.add_argument("--weights", default="ema", choices=("ema", "model"),
                    help="sample with the EMA weights or the raw ones (model); the training run is the same")
    ap.add_argument("--plot", help="a PNG of every variant's samples (first seed, 100 Euler steps) beside its data")
    args = ap.parse_args()
    rows, pictures = [], {}
    for text in args.variants:
        name, over = parse_variant(text)
        for seed in [int(s) for s in args.seeds.split(",")]:
            run_dir = Path(args.out) / f"{name}-s{seed}"
            wall = None
            if not (run_dir / "ema.safetensors").exists():
                t0 = time.perf_counter()
                train(TrainConfig(**{"plots": False, "seed": seed, **over}), out=run_dir, progress=False)
                wall = time.perf_counter() - t0
            keep = {} if args.plot and name not in pictures else None
            row = {"variant": name, "settings": over, "seed": seed, "wall_s": wall, "weights": args.weights,
                   **measure(run_dir, seed, keep=keep, weights=args.weights)}
            if keep is not None:
                pictures[name] = (row, keep)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(f"\n{'variant':<16} {'seeds':>5} {'train s':>8} " + " ".join(f"{s + str(k):>11}" for s, k in SOLVERS)
          + f" {'data':>6} {'log p':>7} {'data':>7}   (% of samples off the support; mean true log-density)")
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        walls = [r["wall_s"] for r in rs if r["wall_s"] is not None]
        wall = f"{sum(walls) / len(walls):8.0f}" if walls else f"{'reused':>8}"
        cells = " ".join(f"{100 * sum(r[s + str(k)] for r in rs) / len(rs):11.2f}" for s, k in SOLVERS)
        m = {key: sum(r[key] for r in rs) / len(rs) for key in ("data_off", "log_p", "data_log_p")}
        print(f"{name:<16} {len(rs):>5} {wall} {cells} {100 * m['data_off']:6.2f} {m['log_p']:7.3f} {m['data_log_p']:7.3f}")
    if args.plot:
        plot(pictures, args.plot)


def plot(pictures: dict, path) -> None:
    """A row per data set: the data, then each variant's samples with its share off the support."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_data = {}
    for name, (row, keep) in pictures.items():
        by_data.setdefault(row["data"], []).append((name, row, keep))
    cols = 1 + max(len(v) for v in by_data.values())
    fig, axes = plt.subplots(len(by_data), cols, figsize=(3.2 * cols, 3.3 * len(by_data)), squeeze=False)
    for r, (data, variants) in enumerate(by_data.items()):
        ref = variants[0][2]["data"]
        lim = float(ref.abs().max()) * 1.15
        panels = [(f"{data}: data ({100 * variants[0][1]['data_off']:.2f}% off)", ref, "C0")]
        panels += [(f"{name}: {100 * row['euler100']:.2f}% off", keep["samples"], "C1") for name, row, keep in variants]
        for c, ax in enumerate(axes[r]):
            if c >= len(panels):
                ax.axis("off")
                continue
            title, x, color = panels[c]
            ax.scatter(x[:, 0], x[:, 1], s=0.6, alpha=0.5, color=color)
            ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
