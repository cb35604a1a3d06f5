"""What blurs the checkerboard, one lever at a time: train variants of the defaults (NAME:KEY=VALUE,...,
TrainConfig fields; a run in OUT/NAME-sSEED is reused), then per variant the training wall-clock, the share of
4000 samples off the board's cells (the data: 0%) at 100 Euler steps, 8 midpoint and 16 Euler steps, and the
mean true log-density of samples and data; ``--nfe``: also W2/floor at those Euler NFEs and straightness;
``--nll-n N``: the NLL of N fresh points; ``--plot``: every variant's samples beside its data.

    python benchmarks/levers.py --out runs/levers --seeds 0,1,2 defaults: ff:fourier=64 ts:time_scale=100
    python benchmarks/levers.py --out runs/toys --plot toys.png moons:data=moons moons-before:data=moons,fourier=0
    python benchmarks/levers.py --out runs/variants --nfe 1,4,16,100 --nll-n 300 linear: ot:coupling=ot \
        vp:path=vp cosine:path=cosine logit-normal:time_dist=logit-normal   # paths, couplings, time sampling
"""

import argparse
import json
import time
from pathlib import Path

import torch

from flowmatch.config import TrainConfig
from flowmatch.likelihood import nll_summary
from flowmatch.metrics import evaluate, mean_log_density, off_support
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


def measure(run_dir: Path, seed: int, nfes: list[int], nll_n: int, weights: str = "ema", n: int = 4000) -> tuple[dict, dict]:
    """The run's measures (the module's docstring) and, for the picture, its samples (100 Euler steps) and data."""
    run = load_run(run_dir, weights=weights)
    toy, out, keep = run.dataset.name, {"data": run.dataset.name}, {}
    for s, k in SOLVERS:
        x = run.sample(n, nfe=k, solver=s, seed=seed)
        out[f"{s}{k}"] = off_support(toy, x)
        if (s, k) == SOLVERS[0]:
            out["log_p"], keep["samples"] = mean_log_density(toy, x), x
    keep["data"] = ref = run.dataset.reference(n, torch.Generator().manual_seed(seed + 1))
    out |= {"data_off": off_support(toy, ref), "data_log_p": mean_log_density(toy, ref)}
    if nfes:
        res = evaluate(run, nfes, seed=seed, adaptive=None)
        out |= {f"NFE {k}": res["nfe"][str(k)]["ratio"] for k in nfes} | {"straightness": res["straightness"]}
    if nll_n:
        x = run.dataset.reference(nll_n, torch.Generator(device=run.device).manual_seed(seed + 2)).cpu()
        nll = nll_summary(run.log_prob(x, tol=1e-5), 2)
        out |= {"nll": nll["nll"], "nll_se": nll["se"]}
    return out, keep


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME:KEY=VALUE,... (TrainConfig overrides)")
    ap.add_argument("--out", default="runs/levers")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--weights", default="ema", choices=("ema", "model"), help="sample with the EMA weights or the raw ones")
    ap.add_argument("--plot", help="a PNG of every variant's samples (first seed, 100 Euler steps) beside its data")
    ap.add_argument("--nfe", help="comma list of Euler NFEs: also W2/floor at each and straightness")
    ap.add_argument("--nll-n", type=int, default=0, help="also the NLL of this many fresh points")
    args = ap.parse_args()
    nfes = [int(k) for k in args.nfe.split(",")] if args.nfe else []
    rows, pictures = [], {}
    for name, over in map(parse_variant, args.variants):
        for seed in [int(s) for s in args.seeds.split(",")]:
            run_dir, wall = Path(args.out) / f"{name}-s{seed}", None
            if not (run_dir / "ema.safetensors").exists():
                t0 = time.perf_counter()
                train(TrainConfig(**{"plots": False, "seed": seed, **over}), out=run_dir, progress=False)
                wall = time.perf_counter() - t0
            measures, keep = measure(run_dir, seed, nfes, args.nll_n, args.weights)
            rows.append({"variant": name, "settings": over, "seed": seed, "wall_s": wall, "weights": args.weights, **measures})
            pictures.setdefault(name, (rows[-1], keep))
            print(json.dumps(rows[-1]), flush=True)
    cols = {f"{s}{k}": 100 for s, k in SOLVERS} | {"data_off": 100, "log_p": 1, "data_log_p": 1} | {f"NFE {k}": 1 for k in nfes}
    cols |= ({"straightness": 1} if nfes else {}) | ({"nll": 1, "nll_se": 1} if args.nll_n else {})
    print(f"\n{'variant':<16} {'seeds':>5} {'train s':>8}" + "".join(f" {c:>10}" for c in cols))
    for name in dict.fromkeys(r["variant"] for r in rows):  # the mean over seeds
        rs = [r for r in rows if r["variant"] == name]
        walls = [r["wall_s"] for r in rs if r["wall_s"] is not None]
        wall = f"{sum(walls) / len(walls):8.0f}" if walls else f"{'reused':>8}"
        print(f"{name:<16} {len(rs):>5} {wall}" + "".join(f" {scale * sum(r[c] for r in rs) / len(rs):10.3f}" for c, scale in cols.items()))
    print("(% of samples off the support, the data's own; mean true log-density of samples and data; W2/floor at Euler NFE k; "
          "straightness; NLL in nats and its standard error, the checkerboard's entropy log 32 = 3.466)")
    if args.plot:
        plot(pictures, args.plot)


def plot(pictures: dict, path) -> None:
    """A row per data set: the data, then each variant's samples with its share off the support."""
    import matplotlib.pyplot as plt
    plt.switch_backend("Agg")

    by_data = {}
    for name, (row, keep) in pictures.items():
        by_data.setdefault(row["data"], []).append((name, row, keep))
    cols = 1 + max(len(v) for v in by_data.values())
    fig, axes = plt.subplots(len(by_data), cols, figsize=(3.2 * cols, 3.3 * len(by_data)), squeeze=False)
    for r, (data, variants) in enumerate(by_data.items()):
        ref = variants[0][2]["data"]
        panels = [(f"{data}: data ({100 * variants[0][1]['data_off']:.2f}% off)", ref, "C0")]
        panels += [(f"{name}: {100 * row['euler100']:.2f}% off", keep["samples"], "C1") for name, row, keep in variants]
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(panels):
                title, x, color = panels[c]
                lim = float(ref.abs().max()) * 1.15
                ax.scatter(x[:, 0], x[:, 1], s=0.6, alpha=0.5, color=color)
                ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
