"""flowmatch against peer libraries on the article notebook's task: training speed, time to quality,
and quality against sampling steps.

    . .venv/bin/activate && bash benchmarks/install_peers.sh       # once: the peers, torch untouched
    python benchmarks/peers.py --work runs/peers/work --plots runs/peers/plots --json runs/peers/peers.json
                                                                    # every row, 10000 steps each (about 55 min on 2 cores)
    python benchmarks/peers.py --libs flowmatch,torchcfm --speed-rounds 0
    python benchmarks/peers.py --steps 40 --eval-every 20 --eval-n 500 --rf-pairs 600 --rf-steps 30 --sample-n 20000 --tol 1e-3
                                                                    # smoke test (about 9 minutes: the exact W2s)
    python benchmarks/peers.py --list                               # which peers import here

Rows (``--libs``, comma list; default all but ``notebook``, ``flowmatch-bf16-compile`` and
``rectified-flow-meanflow-recipe``):

    flowmatch            flowmatch's own loop (train), AdamW lr 1e-4, batch 256, constant lr, no clipping
    flowmatch-bf16       the same with --precision bf16 (autocast; AMX on recent Intel CPUs)
    flowmatch-bf16-compile  the same with --precision bf16 --compile (compilation counted as training time)
    flowmatch-defaults   flowmatch's own loop with `flowmatch train`'s defaults (the stable target, 3500 steps;
                         its steps capped by --steps)
    flowmatch-distilled  2-rectified flow from the defaults run, then distilled to one step (CLI defaults,
                         but the reflow teacher integrates with 64 midpoint NFE instead of dopri5);
                         its "time to" is the whole pipeline: teacher, pairs, reflow, pairs, distillation
    torchcfm             torchcfm ConditionalFlowMatcher(sigma=0)
    torchcfm-ot          torchcfm ExactOptimalTransportConditionalFlowMatcher(sigma=0)
    flow_matching        Meta's flow_matching AffineProbPath(CondOTScheduler())
    rectified-flow       rectified-flow-pytorch RectifiedFlow wrapping the same network
    flowmatch-meanflow   flowmatch's loop with TrainConfig(objective="meanflow")'s defaults, at --steps
    flowmatch-shortcut   the same with objective="shortcut"
    rectified-flow-meanflow  rectified-flow-pytorch MeanFlow (its defaults) around the network of the
                         flowmatch-meanflow row; these three are judged at one step during training, and
                         side by side (with flowmatch-distilled) at NFE 1, 2, 4 in a table of their own
    rectified-flow-meanflow-recipe  the same MeanFlow trained by flowmatch's recipe for the objective
                         (TrainConfig(objective="meanflow")'s batch 512, fused AdamW, warm-up and cosine
                         schedule, clipping, EMA sampled), so the objectives compare apart from the loop
    notebook             the notebook's hand-written loop in plain torch (a control row)

The same in every row: the notebook's 1000 checkerboard points
(``ToyDataset("checkerboard", n_points=1000, seed=0)``); a fresh ``MLP(2)`` (1.58 M parameters)
initialised under ``torch.manual_seed(0)``; batches of random indices, noise and ``t ~ U[0, 1]``
drawn in that order from ``torch.Generator().manual_seed(0)``, which is exactly what flowmatch's
own loop draws, so every row sees the same batches; the straight path ``x_t = (1 - t) x0 + t x1``
with target ``x1 - x0``, each peer through its own path/loss objects. Each row runs in its own
process, one after another, on the CPU (workers get ``CUDA_VISIBLE_DEVICES=''``). Timings are
wall-clock: run it on an otherwise idle machine.

What is measured, per row:

- steps/s: measured first, side by side: --speed-rounds rounds in which every row trains
  --speed-steps steps in a fresh process with nothing else in the loop (no evaluation, no
  checkpoint), the rows interleaved so that drift in the machine's speed hits all alike; the
  median is the table's figure (the long run's own, evaluations in between, is kept in --json);
- time to W2/floor <= --target (1.3): every --eval-every steps, W2 of --eval-n samples at 100 Euler
  steps; the first training time (evaluations excluded) at which the ratio is at most the target;
- W2/floor at NFE 1, 2, 4, 8, 100 on 4000 samples with the library's own sampler (same noise for
  every row); dopri5's NFE at tol 1e-5 through ``flowmatch.solvers.integrate`` for every model (so
  it is comparable); the seconds the library's sampler takes for 4000 samples at 100 Euler steps;
- resident memory at each evaluation (does training memory grow with steps?);
- after the rows, ``flowmatch sample --n --sample-n`` on the distilled run (one step) and on the
  defaults run (8 midpoint NFE) in a fresh process under ``/usr/bin/time -v``: wall-clock,
  samples/s and peak resident memory.

W2 is exact (``flowmatch.metrics.w2``) against fresh continuous checkerboard draws; as in
``flowmatch.metrics.evaluate``, the floor is the mean over 3 pairs of independent draws of the same
size and a model's W2 is the mean over the same 3 reference draws.

Differences that are the libraries' own (printed again with the results): flowmatch samples its
EMA weights (decay 0.999) and steps with fused AdamW; the peers ship no training loop, so their rows
use a loop as a user would write it: ``torch.optim.AdamW`` in torch's default implementation
(weight decay 0, as flowmatch's config) and the raw weights (``--peer-adamw fused`` gives them fused
AdamW too).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowmatch.data import ToyDataset
from flowmatch.models import MLP
from flowmatch.solvers import integrate

from peer_adapters import NETWORKS, PEERS, PeerUnavailable, counting_calls, list_peers, noise
from peer_common import (
    DEFAULT_LIBS,
    FM_DEFAULT_ROWS,
    FM_SETTINGS,
    FROM_SCRATCH_ONE_STEP,
    N_FINAL,
    NFES,
    RECIPE_ROWS,
    ROWS,
    SEED,
    SPEED_ROWS,
    Quality,
    eval_nfe,
    w2_floor,
)
from peer_report import one_step_table, plot, ratio_tables, sampling_table, sharp_table, speed_table, table, verdicts

# ---------------------------------------------------------------- the shared harness (one worker process per row)


class Log:
    def __init__(self, lib: str):
        self.lib, self.notes = lib, []

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.say(msg)

    def say(self, msg: str) -> None:
        print(f"[{self.lib}] {msg}", flush=True)


def final_measures(sample, velocity, model: nn.Module, quality: Quality, tol: float) -> dict:
    """W2/floor at each NFE (4000 samples, the library's sampler), dopri5's NFE (flowmatch's
    integrate, for every row) and the sampling time at 100 steps."""
    x0 = noise(N_FINAL)
    out = {"nfe": {}}
    for k in NFES:
        with torch.inference_mode(), counting_calls(model) as calls:
            t0 = time.perf_counter()
            x = sample(x0, k)
            seconds = time.perf_counter() - t0
        out["nfe"][str(k)] = {**quality(x.float()), "calls": calls[0], "sample_s": seconds}
    with torch.inference_mode():
        out["dopri5_nfe"] = integrate(velocity, x0, "dopri5", None, atol=tol, rtol=tol).nfe
    out["sample_s"] = out["nfe"]["100"]["sample_s"]
    return out


def reached(curve: list[dict], target: float) -> dict | None:
    return next((p for p in curve if p["ratio"] <= target), None)


def run_peer(lib: str, spec: dict, quality: Quality, log: Log) -> dict:
    points = ToyDataset("checkerboard", n_points=1000, seed=SEED).points
    torch.manual_seed(SEED)
    model = NETWORKS.get(lib, lambda: MLP(2))()
    np.random.seed(SEED)  # torchcfm's OT sampler draws pairs with numpy's global RNG
    random.seed(SEED)  # rectified-flow-pytorch's MeanFlow picks each batch's objective with Python's random
    peer = PEERS[lib](model)
    for n in peer.notes:
        log.note(n)
    steps, batch, lr, every = spec["steps"], spec["batch"], spec["lr"], spec["eval_every"]
    recipe = None
    if lib in RECIPE_ROWS:  # flowmatch's recipe for the objective around the peer's own loss and sampler
        from flowmatch.config import TrainConfig, ema_decay_at, lr_at

        recipe = TrainConfig(**RECIPE_ROWS[lib], steps=steps)
        batch, lr = recipe.batch_size, recipe.lr
        ema = copy.deepcopy(model).requires_grad_(False)
        sampler = PEERS[lib](ema)  # the peer's sampler around the EMA weights
        log.note(f"flowmatch's recipe (TrainConfig(objective={recipe.objective!r})): batch {batch}, fused AdamW, peak lr {lr:g}, "
                 f"warm-up {recipe.warmup_steps}, {recipe.schedule} schedule to 0 at step {steps}, grad clip "
                 f"{recipe.grad_clip}, EMA {recipe.ema_decay} (sampled), as flowmatch's Trainer steps them")
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe.weight_decay, fused=True)
    else:
        fused = spec["peer_adamw"] == "fused"
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=fused or None)
        ema, sampler = model, peer
        log.note(f"optimizer: torch.optim.AdamW(lr={lr:g}, weight_decay=0{', fused=True' if fused else ''}); "
                 "no EMA: samples with the trained weights")
    params, ema_params = list(model.parameters()), list(ema.parameters())
    gen = torch.Generator().manual_seed(SEED)
    x0_eval = noise(spec["eval_n"])
    curve, train_s = [], 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        # the same draws, in the same order, as flowmatch's loop: data indices, noise, times
        idx = torch.randint(len(points), (batch,), generator=gen)
        x1 = points[idx]
        x0 = torch.randn(batch, 2, generator=gen)
        t = torch.rand(batch, generator=gen)
        if recipe is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(recipe, step - 1)
        loss = peer.loss(x0, x1, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe is not None and recipe.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        if recipe is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - ema_decay_at(recipe, step - 1))
        train_s += time.perf_counter() - t0
        if not spec.get("speed_only") and (step % every == 0 or step == steps):
            with torch.inference_mode():
                x = sampler.sample(x0_eval, eval_nfe(lib))
            curve.append({"step": step, "train_s": train_s, "rss_mb": rss_mb(), **quality(x.float())})
            log.say(progress_line(curve[-1], steps, eval_nfe(lib)))
    if spec.get("speed_only"):
        return {"steps": steps, "train_s": train_s}
    final = final_measures(sampler.sample, sampler.velocity or (lambda x, t: ema(x, t)), ema, quality, spec["tol"])
    return {"steps": steps, "batch": batch, "lr": lr, "train_s": train_s, "curve": curve, **final}


def progress_line(point: dict, steps: int, nfe: int = 100) -> str:
    return (f"step {point['step']}/{steps}: W2/floor {point['ratio']:.3f} at {nfe} Euler step{'s' * (nfe > 1)} "
            f"(training {point['train_s']:.1f} s)")


def rss_mb() -> float:
    """This process's resident memory now (Linux; 0 elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_flowmatch(lib: str, spec: dict, quality: Quality, log: Log) -> dict:
    """flowmatch's own training loop (fused AdamW, EMA sampled), evaluated through its
    ``on_checkpoint`` callback, whose time flowmatch leaves out of its logged training time.
    The run is kept in the work directory (the distilled row starts from the defaults run)."""
    from flowmatch import training
    from flowmatch.config import TrainConfig

    steps = spec["steps"]
    if lib in FM_DEFAULT_ROWS:
        cfg = TrainConfig(n_points=1000, plots=False, **FM_DEFAULT_ROWS[lib])
        if lib in FROM_SCRATCH_ONE_STEP:  # at the peer's steps, for a comparison at equal steps
            cfg.steps = steps
        elif cfg.steps > steps:
            log.note(f"TrainConfig's {cfg.steps} steps capped to --steps {steps}")
            cfg.steps = steps
        log.note(f"defaults ({cfg.objective}): stable target {cfg.stf or 'off'}, steps {cfg.steps}, batch {cfg.batch_size}, lr {cfg.lr:g}, "
                 f"warm-up {cfg.warmup_steps}, {cfg.schedule} schedule, grad clip {cfg.grad_clip}, EMA {cfg.ema_decay}, "
                 f"{cfg.precision}")
    else:
        cfg = TrainConfig(n_points=1000, steps=steps, batch_size=spec["batch"], lr=spec["lr"], warmup_steps=0, schedule="constant",
                          grad_clip=None, plots=False, **FM_SETTINGS[lib])
        log.note(f"TrainConfig(n_points=1000, steps={steps}, batch_size={cfg.batch_size}, lr={cfg.lr:g}, warmup_steps=0, "
                 f"schedule='constant', grad_clip=None, precision={cfg.precision!r}, compile={cfg.compile})")
    cfg.checkpoint_every = min(spec["eval_every"], cfg.steps)  # = evaluation points
    cfg.log_every = cfg.checkpoint_every
    log.note(f"flowmatch.training.train: fused AdamW, EMA {cfg.ema_decay} (sampled), evaluated every {cfg.checkpoint_every} "
             "steps through train(on_checkpoint=...), whose time is not counted")
    x0_eval = noise(spec["eval_n"])
    curve = []
    run_dir = Path(spec["work"]) / lib

    nfe = eval_nfe(lib)

    data = ToyDataset("checkerboard", n_points=1000, seed=SEED)

    def evaluate_now(step, ema):
        with torch.inference_mode():  # nfe Euler steps (one-step objectives: of the average velocity), as training's own pictures
            x = training._ema_samples(ema, cfg, data, x0_eval, nfe)
        train_s = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["time"]
        curve.append({"step": step, "train_s": train_s, "rss_mb": rss_mb(), **quality(x)})
        log.say(progress_line(curve[-1], cfg.steps, nfe))

    if spec.get("speed_only"):  # one checkpoint, at the end, after the time is logged
        cfg.checkpoint_every = cfg.log_every = cfg.steps
        with tempfile.TemporaryDirectory() as tmp:
            training.train(cfg, out=Path(tmp) / "run", progress=False)
            return {"steps": cfg.steps, "train_s": json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[-1])["time"]}
    training.train(cfg, out=run_dir, progress=False, on_checkpoint=evaluate_now)
    train_s = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["time"]
    return {"steps": cfg.steps, "batch": cfg.batch_size, "lr": cfg.lr, "train_s": train_s, "curve": curve,
            **final_run_measures(run_dir, quality, spec, log)}


def final_run_measures(run_dir: Path, quality: Quality, spec: dict, log: Log) -> dict:
    from flowmatch.runs import load_run

    run = load_run(run_dir, device="cpu")

    def sample(x0, nfe):  # the same noise as noise(): Run.sample draws it from seed 0
        return run.sample(len(x0), nfe=nfe, solver="euler", seed=SEED)

    log.note(f"sampler: Run.sample({N_FINAL}, nfe=K, solver='euler', seed=0) (EMA weights)")
    return final_measures(sample, run.velocity, run.model, quality, spec["tol"])


def run_distilled(lib: str, spec: dict, quality: Quality, log: Log) -> dict:
    """2-rectified flow from the defaults run (trained here if that row did not run), then a
    one-step distillation of it, with the command line as a user would type it."""
    from flowmatch.cli import run as cli

    work = Path(spec["work"])
    teacher = work / "flowmatch-defaults"
    if not (teacher / "ema.safetensors").exists():
        raise PeerUnavailable("needs the flowmatch-defaults row first (in the same --libs, before this row)")
    teacher_s = json.loads((teacher / "metrics.jsonl").read_text().splitlines()[-1])["time"]
    stages = {"teacher (defaults row)": teacher_s}
    size = ["--pairs", str(spec["rf_pairs"]), "--steps", str(spec["rf_steps"])]
    commands = {"reflow": ["reflow", str(teacher), "--out", str(work / "2rf"), "--teacher-nfe", "64", *size],
                "distill": ["distill", str(work / "2rf"), "--out", str(work / lib), *size]}
    for name, argv in commands.items():
        log.note("flowmatch " + " ".join(argv))
        t0 = time.perf_counter()
        if cli([*argv, "--no-progress", "--no-plots"]) != 0:
            raise RuntimeError(f"flowmatch {name} failed")
        stages[name] = time.perf_counter() - t0
    pipeline_s = sum(stages.values())
    log.note("pipeline wall-clock: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()) + f"; total {pipeline_s:.1f} s")
    metrics = [json.loads(ln) for ln in (work / lib / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    final = final_run_measures(work / lib, quality, spec, log)
    student = json.loads((work / lib / "config.json").read_text())["train"]
    point = {"step": metrics[-1]["step"], "train_s": pipeline_s, "rss_mb": rss_mb(), **final["nfe"]["1"]}
    return {"steps": metrics[-1]["step"], "batch": student["batch_size"], "lr": student["lr"], "train_s": metrics[-1]["time"],
            "curve": [point], "stages_s": stages, "pipeline_s": pipeline_s, "one_step": True, **final}


def worker(lib: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    log = Log(lib)
    quality = Quality({int(n): f for n, f in spec["floors"].items()})
    result = {"lib": lib, "row": ROWS[lib], "eval_nfe": eval_nfe(lib)}
    try:
        run = run_distilled if lib == "flowmatch-distilled" else run_flowmatch if lib.startswith("flowmatch") else run_peer
        result.update(run(lib, spec, quality, log))
        result["steps_per_s"] = result["steps"] / result["train_s"]
        if spec.get("speed_only"):
            Path(result_path).write_text(json.dumps(result))
            return
        hit = reached(result["curve"], spec["target"])
        result["time_to_target_s"] = hit and hit["train_s"]
        result["step_to_target"] = hit and hit["step"]
        for k, row in result["nfe"].items():
            if row["calls"] != int(k):
                log.note(f"NFE {k}: the sampler called the network {row['calls']} times")
    except PeerUnavailable as e:
        result["skipped"] = str(e)
        log.say(f"skipped: {e}")
    result["notes"] = log.notes
    Path(result_path).write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent: run rows, print the table


def speed_rounds(libs: list[str], spec: dict, rounds: int, steps: int) -> dict:
    """Training steps/s measured side by side: ``rounds`` rounds, each training every row for
    ``steps`` steps in a fresh process with nothing else in the loop (no evaluation, no
    checkpoint), the rows interleaved so that drift in the machine's speed hits all alike."""
    libs = [lib for lib in libs if lib in SPEED_ROWS or not (lib.startswith("flowmatch") or lib in FROM_SCRATCH_ONE_STEP)]
    speed_spec = {**spec, "steps": steps, "eval_every": steps, "speed_only": True}
    out = {lib: [] for lib in libs}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(speed_spec))
        for r in range(rounds):
            for lib in libs:
                result_path = Path(tmp) / f"{lib}-{r}.json"
                subprocess.run([sys.executable, __file__, "--worker", lib, "--spec", str(spec_path), "--result", str(result_path)],
                               env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), stdout=subprocess.DEVNULL)
                if result_path.exists() and "steps_per_s" in (res := json.loads(result_path.read_text())):
                    out[lib].append(res["steps_per_s"])
            print(f"speed round {r + 1}/{rounds}: " + ", ".join(f"{lib} {v[-1]:.1f}" for lib, v in out.items() if len(v) > r),
                  flush=True)
    return {lib: v for lib, v in out.items() if v}


def run_rows(libs: list[str], spec: dict) -> list[dict]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for lib in libs:
            print(f"\n== {ROWS[lib]}", flush=True)
            result_path = Path(tmp) / f"{lib}.json"
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--worker", lib, "--spec", str(spec_path), "--result", str(result_path)],
                                  env=env)
            if proc.returncode != 0 or not result_path.exists():
                rows.append({"lib": lib, "row": ROWS[lib], "notes": [],
                             "skipped": f"worker failed (exit status {proc.returncode}); its output is above"})
                print(f"[{lib}] failed with exit status {proc.returncode}", flush=True)
                continue
            row = json.loads(result_path.read_text())
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
    return rows


def measure_sampling(work: Path, n: int) -> list[dict]:
    """``flowmatch sample --n N`` on the kept runs, in a fresh process under ``/usr/bin/time -v``:
    wall-clock (imports included), samples per second and peak resident memory."""
    jobs = [("flowmatch-distilled", []), ("flowmatch-defaults", ["--nfe", "8", "--solver", "midpoint"])]
    timer = Path("/usr/bin/time")
    out = []
    for lib, extra in jobs:
        run = work / lib
        if not (run / "ema.safetensors").exists():
            continue
        argv = [sys.executable, "-m", "flowmatch", "sample", str(run), "--n", str(n), "--out", str(work / f"{lib}-samples.npy"),
                "--no-progress", *extra]
        print(f"\n== flowmatch sample {run.name} --n {n} {' '.join(extra)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(([str(timer), "-v"] if timer.exists() else []) + argv, capture_output=True, text=True,
                              env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        wall = time.perf_counter() - t0
        rss = next((int(ln.split(":")[1]) / 1024 for ln in proc.stderr.splitlines() if "Maximum resident set size" in ln), None)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], flush=True)
            continue
        out.append({"run": lib, "args": " ".join(extra), "n": n, "wall_s": wall, "samples_per_s": n / wall, "max_rss_mb": rss})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--libs", default=",".join(DEFAULT_LIBS), help=f"comma list of rows from {', '.join(ROWS)}")
    ap.add_argument("--steps", type=int, default=10000, help="training steps per row (caps flowmatch-defaults' own)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=500, help="steps between W2 evaluations for the time to quality")
    ap.add_argument("--eval-n", type=int, default=2000, help="samples per evaluation during training")
    ap.add_argument("--target", type=float, default=1.3, help="W2/floor that counts as reached")
    ap.add_argument("--tol", type=float, default=1e-5, help="dopri5 atol = rtol")
    ap.add_argument("--peer-adamw", choices=("default", "fused"), default="default",
                    help="peer rows' AdamW: torch's default implementation, or fused as flowmatch's loop uses")
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    ap.add_argument("--plots", metavar="DIR", help="write peers-nfe.png and peers-time.png to DIR")
    ap.add_argument("--work", metavar="DIR", help="keep flowmatch's runs here (default: a temporary folder)")
    ap.add_argument("--speed-rounds", type=int, default=3, help="interleaved rounds of the steps/s measurement (0: skip)")
    ap.add_argument("--speed-steps", type=int, default=1500, help="training steps per row and round of the steps/s measurement")
    ap.add_argument("--rf-pairs", type=int, default=20000, help="distilled row: teacher pairs for reflow and for distillation")
    ap.add_argument("--rf-steps", type=int, default=4000, help="distilled row: training steps of reflow and of distillation")
    ap.add_argument("--sample-n", type=int, default=1_000_000, help="samples for the flowmatch sample measurement (0: skip)")
    ap.add_argument("--list", action="store_true", help="only print which peers import")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.spec, args.result)
    if args.list:
        return list_peers()
    libs = [s.strip() for s in args.libs.split(",") if s.strip()]
    unknown = [lib for lib in libs if lib not in ROWS]
    if unknown:
        ap.error(f"--libs: unknown {', '.join(unknown)}; expected some of {', '.join(ROWS)}")
    for name in ("steps", "batch", "eval_every", "eval_n"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected a positive integer")

    sizes = sorted({N_FINAL, args.eval_n})
    floors = {n: w2_floor(n) for n in sizes}
    print("W2 floor (mean over 3 pairs of fresh checkerboard draws): "
          + ", ".join(f"{floors[n]:.4f} at {n} points" for n in sizes), flush=True)
    spec = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "eval_every": args.eval_every, "eval_n": args.eval_n,
            "target": args.target, "tol": args.tol, "peer_adamw": args.peer_adamw, "floors": floors, "nfes": list(NFES),
            "n_final": N_FINAL, "seed": SEED, "rf_pairs": args.rf_pairs, "rf_steps": args.rf_steps,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        spec["work"] = str(work)
        speed = {}
        if args.speed_rounds > 0:
            print("\n== training steps/s, side by side", flush=True)
            speed = speed_rounds(libs, spec, args.speed_rounds, args.speed_steps)
        rows = run_rows(libs, spec)
        for r in rows:  # the table's steps/s: the side-by-side median; the long run's own is kept
            if r["lib"] in speed and "skipped" not in r:
                r["steps_per_s_long_run"] = r["steps_per_s"]
                r["steps_per_s"] = float(np.median(speed[r["lib"]]))
        jobs = measure_sampling(work, args.sample_n) if args.sample_n > 0 else []

    print(f"\n{args.steps} steps, batch {args.batch}, lr {args.lr:g} (flowmatch defaults: its own), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; W2/floor during training on {args.eval_n} samples every {args.eval_every} steps\n")
    print(table(rows, spec))
    speed_text = speed_table(speed, args.speed_rounds, args.speed_steps) if speed else ""
    texts = (sharp_table(rows), one_step_table(rows), speed_text, ratio_tables(rows), sampling_table(jobs) if jobs else "",
             verdicts(rows, spec))
    for text in texts:
        if text:
            print("\n" + text)
    print("\nNotes")
    for r in rows:
        for n in r.get("notes", []):
            print(f"  {r['row']}: {n}")
        curve = [p for p in r.get("curve", []) if p.get("rss_mb")]
        if len(curve) > 1:
            print(f"  {r['row']}: resident memory {curve[0]['rss_mb']:.0f} MB at step {curve[0]['step']}, "
                  f"{curve[-1]['rss_mb']:.0f} MB at step {curve[-1]['step']}")
    if args.plots:
        for path in plot(rows, spec, Path(args.plots)):
            print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": spec, "rows": rows, "speed": speed, "sampling": jobs}, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
