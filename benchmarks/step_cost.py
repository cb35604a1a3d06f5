"""What a setting costs a training step: flowmatch's ``Trainer.optimisation_step`` on the checkerboard's
defaults (batch 512), each comparison's rows timed interleaved in blocks; the median ms per step and its ratio
to the row's base. ``objective``: MeanFlow with every row an interval and with its recipe's share against
cfm; ``film``; ``stf``: 0, 1024, 4096, 16384 points; ``precision``: fp32 and bf16 at batch 512 and 2048 (without
AMX or AVX512-BF16 bf16 is emulated); ``notebook``: peers.py's task (batch 256, raw-coordinate velocity MLP).

    python benchmarks/step_cost.py --compare objective,film,stf,precision --objectives cfm,meanflow
    python benchmarks/step_cost.py --compare notebook --profile 300      # where the time goes (torch.profiler)
"""

import argparse
import statistics
import time

import torch

TIMING = {"objective": (7, 20), "film": (5, 20), "stf": (5, 20), "precision": (5, 10), "notebook": (5, 10)}  # rounds, block
NOTEBOOK = dict(n_points=1000, batch_size=256, lr=1e-4, warmup_steps=0, schedule="constant", grad_clip=None, fourier=0,
                prediction="velocity")


def rows_of(name: str, objectives: list[str]) -> list[tuple[str, dict, str]]:
    """A comparison's rows: (label, TrainConfig settings, its base row's label)."""
    if name == "objective":
        return [("cfm", {}, "cfm"), ("meanflow, every row an interval", {"objective": "meanflow", "meanflow_share": 1.0}, "cfm"),
                ("meanflow, its recipe's share of intervals", {"objective": "meanflow"}, "cfm")]
    if name == "film":
        return [(f"{o}{' + film' * f}", {"objective": o, "film": f}, o) for o in objectives for f in (False, True)]
    if name == "stf":
        return [(f"stf {n}", {"stf": n}, "stf 0") for n in (0, 1024, 4096, 16384)]
    if name == "notebook":
        return [(f"notebook, {p}", {**NOTEBOOK, "precision": p}, "notebook, fp32") for p in ("fp32", "bf16")]
    return [(f"{o}, batch {b}, {p}", {"objective": o, "batch_size": b, "precision": p}, f"{o}, batch {b}, fp32")
            for o in objectives for b in (512, 2048) for p in ("fp32", "bf16")]


def make_step(**settings):
    """A prepared Trainer of the defaults with ``settings``: ``optimisation_step()`` is one training step."""
    from accelerate import Accelerator

    from flowmatch.config import TrainConfig
    from flowmatch.training import Trainer

    cfg = TrainConfig(steps=10**9, checkpoint_every=10**9, log_every=10**9, plots=False, **settings)
    tr = Trainer(cfg, cfg.build(), Accelerator(cpu=True), progress=False)
    tr.prepare()  # what Trainer.run sets up before its loop
    return tr


def compare_steps(settings: dict, rounds: int, steps: int) -> dict:
    """Median ms per step of each named set of settings; 3 warm-up steps each (oneDNN picks its kernels), then
    the rows interleaved, a block of ``steps`` steps each per round."""
    trainers = {name: make_step(**over) for name, over in settings.items()}
    times = {key: [] for key in trainers}
    for tr in trainers.values():
        for _ in range(3):
            tr.optimisation_step()
    for _ in range(rounds):
        for key, tr in trainers.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                tr.optimisation_step()
            times[key].append((time.perf_counter() - t0) / steps * 1e3)
    return {key: statistics.median(ts) for key, ts in times.items()}


def main() -> None:
    from flowmatch.training import cpu_has_bf16

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", default="objective,film,stf,precision", help=f"comma list of {', '.join(TIMING)}")
    ap.add_argument("--objectives", default="cfm", help="film and precision rows: comma list of cfm, meanflow, shortcut")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also the top operators over N steps of each row")
    args = ap.parse_args()
    if set(names := args.compare.split(",")) - set(TIMING):
        ap.error(f"--compare: expected a comma list of {', '.join(TIMING)}")
    print(f"{torch.get_num_threads()} torch threads; bf16 units: {'yes' if cpu_has_bf16() else 'no'}")
    for name in names:
        rows = rows_of(name, args.objectives.split(","))
        rounds, steps = TIMING[name]
        ms = compare_steps({label: over for label, over, _ in rows}, rounds, steps)
        print(f"\n{name}: median of {rounds} rounds of {steps} steps\n| row | ms per step | samples/s | x its base |\n|---|---:|---:|---:|")
        for label, over, base in rows:
            batch = over.get("batch_size", 512)  # TrainConfig's
            print(f"| {label} | {ms[label]:.1f} | {batch / ms[label] * 1e3:,.0f} | {ms[label] / ms[base]:.2f}x ({base}) |")
        for label, over, _ in rows if args.profile else []:  # where a step's time goes
            tr = make_step(**over)
            with torch.profiler.profile() as prof:
                for _ in range(args.profile):
                    tr.optimisation_step()
            print(f"\n{label}, {args.profile} steps\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
