"""flowmatch against peer libraries (torchcfm, Meta's flow_matching, rectified-flow-pytorch) on the article
notebook's task, 1000 checkerboard points. Every row (``--libs``) trains a network initialised under seed 0 on
the batches flowmatch's own loop draws, through the library's own path/loss objects, in its own process (the
peers: ``torch.optim.AdamW`` on the raw weights; flowmatch: fused AdamW, its EMA sampled). Measured: steps/s side
by side (--speed-rounds interleaved rounds of 1500 steps); the training time to W2/floor <= 1.3 (2000 samples,
100 Euler steps, one for one-step generators); W2/floor, % off the cells, precision/recall at NFE 1-100 with each
library's sampler (4000 samples), dopri5's NFE, sampling time, memory; ``flowmatch sample --n --sample-n``.

    . .venv/bin/activate && bash benchmarks/install_peers.sh       # once: the peers, torch untouched
    python benchmarks/peers.py --work runs/peers/work --plots runs/peers/plots --json runs/peers/peers.json
    python benchmarks/peers.py --libs flowmatch-meanflow,rectified-flow-meanflow --steps 4000 --speed-rounds 0 --sample-n 0
"""

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

from flowmatch.data import ToyDataset
from flowmatch.models import MLP
from flowmatch.solvers import integrate

import peer_adapters as pa
import peer_report as report

NOTES: list[str] = []


def note(lib: str, msg: str, keep: bool = True) -> None:
    NOTES.extend([msg] * keep)
    print(f"[{lib}] {msg}", flush=True)


def final_measures(sample, velocity, model, quality: pa.Quality, tol: float) -> dict:
    """Quality at each NFE (4000 samples, the library's sampler, its network calls counted), dopri5's NFE
    (flowmatch's integrate, for every row) and the sampling time at 100 steps."""
    x0, out, calls = pa.noise(pa.N_FINAL), {"nfe": {}}, []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    for k in pa.NFES:
        calls.clear()
        with torch.inference_mode():
            t0 = time.perf_counter()
            x = sample(x0, k)
            seconds = time.perf_counter() - t0
        out["nfe"][str(k)] = {**quality(x.float()), "calls": len(calls), "sample_s": seconds}
    hook.remove()
    with torch.inference_mode():
        out["dopri5_nfe"] = integrate(velocity, x0, "dopri5", None, tol=tol).nfe
    return out | {"sample_s": out["nfe"]["100"]["sample_s"]}


def evaluated(lib: str, curve: list, step: int, steps: int, train_s: float, x: torch.Tensor, quality: pa.Quality) -> None:
    rss = 0.0
    with contextlib.suppress(OSError):  # this process's resident memory now (Linux)
        rss = next(int(ln.split()[1]) / 1024 for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    curve.append({"step": step, "train_s": train_s, "rss_mb": rss, **quality(x.float())})
    note(lib, f"step {step}/{steps}: W2/floor {curve[-1]['ratio']:.3f} at {pa.eval_nfe(lib)} Euler step(s) (training {train_s:.1f} s)",
         keep=False)


def run_peer(lib: str, spec: dict, quality: pa.Quality) -> dict:
    points = ToyDataset("checkerboard", n_points=1000, seed=pa.SEED).points
    torch.manual_seed(pa.SEED)
    model = pa.NETWORKS.get(lib, lambda: MLP(2))()
    np.random.seed(pa.SEED)  # torchcfm's OT sampler draws pairs with numpy's global RNG
    random.seed(pa.SEED)  # rectified-flow-pytorch's MeanFlow picks each batch's objective with Python's random
    peer = pa.PEERS[lib](model)
    for n in peer.notes:
        note(lib, n)
    steps, batch, lr, every = spec["steps"], spec["batch"], spec["lr"], spec["eval_every"]
    ema, sampler, recipe = model, peer, None
    if lib in pa.RECIPE_ROWS:  # flowmatch's recipe for the objective around the peer's own loss and sampler
        from flowmatch.config import TrainConfig, ema_decay_at, lr_at

        recipe = TrainConfig(**pa.RECIPE_ROWS[lib], steps=steps)
        batch, lr = recipe.batch_size, recipe.lr
        ema = copy.deepcopy(model).requires_grad_(False)
        sampler = pa.PEERS[lib](ema)  # the peer's sampler around the EMA weights
        note(lib, f"flowmatch's recipe for {recipe.objective}: batch {batch}, fused AdamW, peak lr {lr:g}, warm-up {recipe.warmup_steps}, "
                  f"{recipe.schedule} schedule, grad clip {recipe.grad_clip}, EMA {recipe.ema_decay} (sampled), as its Trainer steps them")
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe.weight_decay, fused=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        note(lib, f"optimizer: torch.optim.AdamW(lr={lr:g}, weight_decay=0); no EMA: samples with the trained weights")
    params, ema_params = list(model.parameters()), list(ema.parameters())
    gen, x0_eval, curve, train_s = torch.Generator().manual_seed(pa.SEED), pa.noise(spec["eval_n"]), [], 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        x1 = points[torch.randint(len(points), (batch,), generator=gen)]  # flowmatch's draws: indices, noise, times
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
                evaluated(lib, curve, step, steps, train_s, sampler.sample(x0_eval, pa.eval_nfe(lib)), quality)
    if spec.get("speed_only"):
        return {"steps": steps, "train_s": train_s}
    final = final_measures(sampler.sample, sampler.velocity or (lambda x, t: ema(x, t)), ema, quality, spec["tol"])
    return {"steps": steps, "batch": batch, "lr": lr, "train_s": train_s, "curve": curve, **final}


def logged_time(run_dir: Path) -> float:
    """A run's training time (flowmatch leaves its checkpoints and callbacks out)."""
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["time"]


def run_flowmatch(lib: str, spec: dict, quality: pa.Quality) -> dict:
    """flowmatch's own loop, evaluated through ``on_checkpoint``; the run is kept (the distilled row uses it)."""
    from flowmatch import training
    from flowmatch.config import TrainConfig

    steps = spec["steps"]
    if lib in pa.FM_DEFAULT_ROWS:
        cfg = TrainConfig(n_points=1000, plots=False, **pa.FM_DEFAULT_ROWS[lib])
        if lib in pa.FROM_SCRATCH_ONE_STEP or cfg.steps > steps:  # one-step rows: at the peers' steps, for equal steps
            cfg.steps = steps
    else:
        cfg = TrainConfig(n_points=1000, steps=steps, batch_size=spec["batch"], lr=spec["lr"], warmup_steps=0, schedule="constant",
                          grad_clip=None, plots=False, **pa.FM_SETTINGS[lib])
    cfg.checkpoint_every = cfg.log_every = cfg.steps if spec.get("speed_only") else min(spec["eval_every"], cfg.steps)
    if spec.get("speed_only"):  # one checkpoint, at the end, after the time is logged
        with tempfile.TemporaryDirectory() as tmp:
            training.train(cfg, out=Path(tmp) / "run", progress=False)
            return {"steps": cfg.steps, "train_s": logged_time(Path(tmp) / "run")}
    note(lib, f"flowmatch.training.train ({cfg.objective}, stf {cfg.stf}, {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr:g}, "
              f"warm-up {cfg.warmup_steps}, {cfg.schedule} schedule, grad clip {cfg.grad_clip}, EMA {cfg.ema_decay} sampled, "
              f"{cfg.precision}, compile {cfg.compile}), evaluated every {cfg.checkpoint_every} steps through on_checkpoint (not timed)")
    x0_eval, curve, run_dir = pa.noise(spec["eval_n"]), [], Path(spec["work"]) / lib
    data = ToyDataset("checkerboard", n_points=1000, seed=pa.SEED)

    def evaluate_now(step, ema):
        with torch.inference_mode():  # as training's own pictures (one-step objectives: the average velocity)
            evaluated(lib, curve, step, cfg.steps, logged_time(run_dir), training._ema_samples(ema, cfg, data, x0_eval, pa.eval_nfe(lib)),
                      quality)

    training.train(cfg, out=run_dir, progress=False, on_checkpoint=evaluate_now)
    return {"steps": cfg.steps, "batch": cfg.batch_size, "lr": cfg.lr, "train_s": logged_time(run_dir), "curve": curve,
            **final_run_measures(lib, run_dir, quality, spec)}


def final_run_measures(lib: str, run_dir: Path, quality: pa.Quality, spec: dict) -> dict:
    from flowmatch.runs import load_run

    run = load_run(run_dir, device="cpu")

    def sample(x0, nfe):  # the noise of noise(): Run.sample draws it from seed 0
        return run.sample(len(x0), nfe=nfe, solver="euler", seed=pa.SEED)

    return final_measures(sample, run.velocity, run.model, quality, spec["tol"])


def run_distilled(lib: str, spec: dict, quality: pa.Quality) -> dict:
    """2-rectified flow from the defaults run, then a one-step distillation of it, by the command line."""
    from flowmatch.cli import run as cli

    work = Path(spec["work"])
    teacher = work / "flowmatch-defaults"
    if not (teacher / "ema.safetensors").exists():
        raise pa.PeerUnavailable("needs the flowmatch-defaults row first (in the same --libs, before this row)")
    stages, size = {"teacher (defaults row)": logged_time(teacher)}, ["--pairs", str(spec["rf_pairs"]), "--steps", str(spec["rf_steps"])]
    for name, argv in {"reflow": ["reflow", str(teacher), "--out", str(work / "2rf"), "--teacher-nfe", "64", *size],
                       "distill": ["distill", str(work / "2rf"), "--out", str(work / lib), *size]}.items():
        note(lib, "flowmatch " + " ".join(argv))
        t0 = time.perf_counter()
        if cli([*argv, "--no-progress", "--no-plots"]) != 0:
            raise RuntimeError(f"flowmatch {name} failed")
        stages[name] = time.perf_counter() - t0
    pipeline_s = sum(stages.values())
    note(lib, "pipeline wall-clock: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()) + f"; total {pipeline_s:.1f} s")
    last = json.loads((work / lib / "metrics.jsonl").read_text().splitlines()[-1])
    final = final_run_measures(lib, work / lib, quality, spec)
    student = json.loads((work / lib / "config.json").read_text())["train"]
    point = {"step": last["step"], "train_s": pipeline_s, **final["nfe"]["1"]}
    return {"steps": last["step"], "batch": student["batch_size"], "lr": student["lr"], "train_s": last["time"], "curve": [point],
            "stages_s": stages, "pipeline_s": pipeline_s, "one_step": True, **final}


def worker(lib: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    quality = pa.Quality({int(n): f for n, f in spec["floors"].items()})
    result = {"lib": lib, "row": pa.ROWS[lib], "eval_nfe": pa.eval_nfe(lib)}
    try:
        run = run_distilled if lib == "flowmatch-distilled" else run_flowmatch if lib.startswith("flowmatch") else run_peer
        result.update(run(lib, spec, quality))
        result["steps_per_s"] = result["steps"] / result["train_s"]
        if not spec.get("speed_only"):
            hit = next((p for p in result["curve"] if p["ratio"] <= spec["target"]), None)
            result |= {"time_to_target_s": hit and hit["train_s"], "step_to_target": hit and hit["step"]}
            for k, row in result["nfe"].items():
                if row["calls"] != int(k):
                    note(lib, f"NFE {k}: the sampler called the network {row['calls']} times")
    except pa.PeerUnavailable as e:
        result["skipped"] = str(e)
        note(lib, f"skipped: {e}", keep=False)
    Path(result_path).write_text(json.dumps(result | {"notes": NOTES}))


def spawn(lib: str, spec: dict, tmp: str, quiet: bool = False) -> dict | None:
    """One row in a fresh worker process (on the CPU); its result, or None when it failed."""
    (Path(tmp) / "spec.json").write_text(json.dumps(spec))
    result = Path(tmp) / f"{lib}.json"
    result.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", lib, "--spec", str(Path(tmp) / "spec.json"), "--result", str(result)],
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), stdout=subprocess.DEVNULL if quiet else None)
    return json.loads(result.read_text()) if proc.returncode == 0 and result.exists() else None


def speed_rounds(libs: list[str], spec: dict, rounds: int, steps: int, tmp: str) -> dict:
    """Steps/s side by side: rounds of ``steps`` steps of every speed row, each in a fresh process, interleaved."""
    libs = [lib for lib in libs if lib in pa.FM_SETTINGS or not (lib.startswith("flowmatch") or lib in pa.FROM_SCRATCH_ONE_STEP)]
    out = {lib: [] for lib in libs}
    for r in range(rounds):
        for lib in libs:
            res = spawn(lib, {**spec, "steps": steps, "eval_every": steps, "speed_only": True}, tmp, quiet=True)
            if res and "steps_per_s" in res:
                out[lib].append(res["steps_per_s"])
        print(f"speed round {r + 1}/{rounds}: " + ", ".join(f"{lib} {v[-1]:.1f}" for lib, v in out.items() if len(v) > r), flush=True)
    return {lib: v for lib, v in out.items() if v}


def measure_sampling(work: Path, n: int) -> list[dict]:
    """``flowmatch sample --n N`` of the kept runs under ``/usr/bin/time -v``: wall-clock, samples/s, peak memory."""
    out = []
    for lib, extra in (("flowmatch-distilled", []), ("flowmatch-defaults", ["--nfe", "8", "--solver", "midpoint"])):
        if not (work / lib / "ema.safetensors").exists():
            continue
        print(f"\n== flowmatch sample {lib} --n {n} {' '.join(extra)}", flush=True)
        argv = [sys.executable, "-m", "flowmatch", "sample", str(work / lib), "--n", str(n), "--out", str(work / f"{lib}-samples.npy"),
                "--no-progress", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run((["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []) + argv, capture_output=True,
                              text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-2000:], flush=True)
            continue
        rss = next((int(ln.split(":")[1]) / 1024 for ln in proc.stderr.splitlines() if "Maximum resident set size" in ln), None)
        out.append({"run": lib, "args": " ".join(extra), "n": n, "wall_s": wall, "samples_per_s": n / wall, "max_rss_mb": rss})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--libs", default=",".join(pa.DEFAULT_LIBS), help=f"comma list of rows from {', '.join(pa.ROWS)}")
    ap.add_argument("--steps", type=int, default=10000, help="training steps per row (caps flowmatch-defaults' own)")
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    ap.add_argument("--plots", metavar="DIR", help="write peers-nfe.png and peers-time.png to DIR")
    ap.add_argument("--work", metavar="DIR", help="keep flowmatch's runs here (default: a temporary folder)")
    ap.add_argument("--speed-rounds", type=int, default=3, help="interleaved rounds of the steps/s measurement (0: skip)")
    ap.add_argument("--sample-n", type=int, default=1_000_000, help="samples for the flowmatch sample measurement (0: skip)")
    ap.add_argument("--list", action="store_true", help="only print which peers import")
    for hidden in ("--worker", "--spec", "--result"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.spec, args.result)
    if args.list:
        return pa.list_peers()
    libs = [s.strip() for s in args.libs.split(",") if s.strip()]
    if unknown := [lib for lib in libs if lib not in pa.ROWS]:
        ap.error(f"--libs: unknown {', '.join(unknown)}; expected some of {', '.join(pa.ROWS)}")
    if args.steps < 1:
        ap.error("--steps must be a positive integer")
    floors = {n: pa.w2_floor(n) for n in (2000, pa.N_FINAL)}
    print("W2 floor (mean over 3 pairs of fresh checkerboard draws): " + ", ".join(f"{f:.4f} at {n} points" for n, f in floors.items()))
    spec = {"steps": args.steps, "batch": 256, "lr": 1e-4, "eval_every": 500, "eval_n": 2000,  # the notebook's
            "target": 1.3, "tol": 1e-5, "floors": floors, "nfes": list(pa.NFES), "n_final": pa.N_FINAL, "seed": pa.SEED,
            "rf_pairs": 20000, "rf_steps": 4000, "torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec["work"], speed, rows = str(work), {}, []
        if args.speed_rounds > 0:
            print("\n== training steps/s, side by side", flush=True)
            speed = speed_rounds(libs, spec, args.speed_rounds, 1500, tmp)
        for lib in libs:
            print(f"\n== {pa.ROWS[lib]}", flush=True)
            t0 = time.perf_counter()
            row = spawn(lib, spec, tmp) or {"lib": lib, "row": pa.ROWS[lib], "skipped": "worker failed; its output is above"}
            rows.append(row | {"wall_s": time.perf_counter() - t0})
            if lib in speed and "skipped" not in row:  # the table's steps/s: the side-by-side median; the long run's own is kept
                rows[-1] |= {"steps_per_s_long_run": row["steps_per_s"], "steps_per_s": float(np.median(speed[lib]))}
        jobs = measure_sampling(work, args.sample_n) if args.sample_n > 0 else []
    print(f"\n{args.steps} steps, batch 256, lr 1e-4 (flowmatch defaults: its own), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; W2/floor during training on 2000 samples every 500 steps\n")
    print(report.table(rows, spec))
    speed_text = speed and report.speed_table(speed, args.speed_rounds, 1500)
    for text in (report.sharp_table(rows), report.one_step_table(rows), speed_text, jobs and report.sampling_table(jobs)):
        if text:
            print("\n" + text)
    for r in rows:  # each row's notes (its settings) are in its output above and in --json
        if len(curve := [p for p in r.get("curve", []) if p.get("rss_mb")]) > 1:
            print(f"{r['row']}: resident memory {curve[0]['rss_mb']:.0f} MB at step {curve[0]['step']}, "
                  f"{curve[-1]['rss_mb']:.0f} MB at step {curve[-1]['step']}")
    for path in report.plot(rows, spec, Path(args.plots)) if args.plots else []:
        print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": spec, "rows": rows, "speed": speed, "sampling": jobs}, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
