"""A MeanFlow training step against a flow-matching one, on the default checkerboard setup (the
MLP of ``flowmatch train``, batch 512): what the Jacobian-vector product costs, and what taking it
on the interval rows only saves (the flow-matching rows, ``t_end = t``, multiply it by zero).

    python benchmarks/meanflow_step.py                  # 7 rounds of 20 steps per row, interleaved
    python benchmarks/meanflow_step.py --rounds 11 --steps 30 --share 0.5

Rows: ``--objective cfm``; ``--objective meanflow`` with the JVP on every row (``MeanFlow(...,
jvp_rows="all")``, how the step was written before); ``--objective meanflow`` as it trains (the
JVP on the interval rows). Each row is flowmatch's own ``Trainer.optimisation_step`` (draws, loss,
backward, clipping, AdamW, EMA); the table gives the median ms per step and the ratio to the
flow-matching step. Run it alone: timings on 2 shared cores drift by a quarter between runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_step(out: Path, jvp_rows: str | None = None, seed: int = 0, **settings):
    """A prepared Trainer of the defaults with ``settings`` (TrainConfig fields), whose
    ``optimisation_step()`` is one timed training step (``benchmarks/precision_step.py`` too)."""
    from accelerate import Accelerator

    from flowmatch.config import TrainConfig
    from flowmatch.training import Trainer

    cfg = TrainConfig(steps=10**9, checkpoint_every=10**9, log_every=10**9, plots=False, seed=seed, **settings)
    tr = Trainer(cfg, cfg.build(), Accelerator(cpu=True), out, progress=False)
    tr.prepare()  # what Trainer.run sets up before its loop
    if jvp_rows is not None:
        tr.objective.jvp_rows = jvp_rows
    return tr


def compare_steps(settings: dict, rounds: int, steps: int) -> dict:
    """The median ms per training step of the defaults with each named set of TrainConfig
    ``settings`` ({name: {field: value}}), timed interleaved by :func:`median_ms`."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: make_step(Path(tmp) / str(i), **over) for i, (name, over) in enumerate(settings.items())}
        return median_ms(trainers, rounds, steps)


def median_ms(trainers: dict, rounds: int, steps: int) -> dict:
    """The median ms per ``optimisation_step`` of each trainer, after 3 warm-up steps each (oneDNN
    picks its kernels on the first calls); rows run interleaved in blocks of ``steps`` steps, so
    that the machine's drift hits every row alike."""
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--share", type=float, default=None, help="MeanFlow's share of interval rows (default: its default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {"flow matching (cfm)": ("cfm", "all"), "MeanFlow, JVP on every row": ("meanflow", "all"),
            "MeanFlow, JVP on the interval rows": ("meanflow", "interval")}
    with tempfile.TemporaryDirectory() as tmp:
        share = {} if args.share is None else {"meanflow_share": args.share}
        steps = {name: make_step(Path(tmp) / str(i), jr if obj == "meanflow" else None, objective=obj,
                                 **(share if obj == "meanflow" else {}))
                 for i, (name, (obj, jr)) in enumerate(rows.items())}
        ms = median_ms(steps, args.rounds, args.steps)
    share = steps["MeanFlow, JVP on the interval rows"].objective.share
    print(f"median of {args.rounds} rounds of {args.steps} steps; batch {steps['flow matching (cfm)'].cfg.batch_size}, "
          f"MeanFlow share of interval rows {share:g}, {torch.get_num_threads()} torch threads")
    base = ms["flow matching (cfm)"]
    print("| step | ms | x flow matching |\n|---|---:|---:|")
    for name, m in ms.items():
        print(f"| {name} | {m:.1f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
