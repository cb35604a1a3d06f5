"""Is the teacher story's gap in the DDPM's sampler or in its steps? The class-conditional DDPM
sampled from the story's 500 noises (digit k mod 10 in column k, guidance 2) by deterministic
samplers (the reflow pairs need one) and by its own stochastic one, scored as
``benchmarks/ddpm_images.py`` scores its rows (Fréchet distance over its floor in a digit
classifier's and a PCA's features, precision, recall, label accuracy):

    python benchmarks/teacher_samplers.py --teacher runs/ddpm-mnist-cond
    python benchmarks/teacher_samplers.py --samplers ddim20,stop20@200 --n 100
    python benchmarks/teacher_samplers.py --teacher runs/t/snapshots/step-4000 --teacher runs/t \
        --samplers ddim20,anc50 --grid teachers.png          # one run's teacher against its training

A comma list of ``--guidance`` weights gives a row per weight (the teacher's DDIM falls behind its
ancestral sampler as guidance grows)::

    python benchmarks/teacher_samplers.py --teacher runs/t/ --guidance 1,1.25,1.5,2,3 --samplers ddim20,anc50

Several ``--teacher`` folders (``ddpm_teacher.py --snapshots`` saves them along one run) give a row
per teacher and sampler, named by the folder; ``--grid`` draws the first ten images of every row.

Samplers (``--samplers``, a comma list):

- ``ddimK``: DDIM (eta 0) in K steps, as the teacher makes its pairs (trailing spacing, the
  noise implied by the clipped clean-image estimate);
- ``stopK@T``: the same DDIM, stopped at the first step at diffusers time ``<= T``, where it returns
  its clean-image estimate (deterministic: a denoiser at noise level T instead of the last steps);
- ``dpmK``: DPM-Solver++ (2nd order, multistep, trailing spacing; diffusers has no clipping for it);
- ``ancK``: the pipeline's own ancestral sampler (``DDPMScheduler``) in K steps: stochastic, fresh
  noise at every step, so no map from the noise that reflow could learn.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddpm_images import SHAPE, ddim, save_grid, scores  # noqa: E402

from flowmatch.noise import batch_noise  # noqa: E402
from flowmatch.teachers import DiffusersTeacher  # noqa: E402


@torch.inference_mode()
def scheduler_loop(teacher: DiffusersTeacher, sched, steps: int, z0, label, w: float, stochastic: bool,
                   batch: int = 250) -> torch.Tensor:
    """A diffusers scheduler's own loop from ``z0`` (fresh noise per batch for a stochastic one), in [0, 1]."""
    out = []
    for i in range(0, len(z0), batch):
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(i)
        x = z0[i:i + batch].clone() * sched.init_noise_sigma
        for t in sched.timesteps:
            eps = teacher.eps(sched.scale_model_input(x, t), t, label[i:i + batch], w)
            x = sched.step(eps, t, x, **({"generator": g} if stochastic else {})).prev_sample
        out.append((x + 1) / 2)
    return torch.cat(out).clamp(0, 1)


@torch.inference_mode()
def ddim_stopped(teacher: DiffusersTeacher, z0, label, w: float, t_stop: int, batch: int = 250) -> torch.Tensor:
    """DDIM (eta 0, clipped noise) until diffusers time ``<= t_stop``, then its clean-image estimate there."""
    out = []
    for i in range(0, len(z0), batch):
        x, lab = z0[i:i + batch].clone(), label[i:i + batch]
        teacher.scheduler.set_timesteps(teacher.steps)
        for t in teacher.scheduler.timesteps:
            o = teacher.scheduler.step(teacher.eps(x, t, lab, w), t, x, eta=0.0, use_clipped_model_output=True)
            if int(t) <= t_stop:
                x = o.pred_original_sample
                break
            x = o.prev_sample
        out.append((x + 1) / 2)
    return torch.cat(out).clamp(0, 1)


def sample(folder: Path, name: str, z0, label, w: float, null: int) -> torch.Tensor:
    if name.startswith("ddim"):
        return ddim(folder, z0, int(name[4:]), classes={"label": label, "guidance": w, "null_class": null})
    if name.startswith("stop"):
        steps, t_stop = map(int, name[4:].split("@"))
        return ddim_stopped(DiffusersTeacher(folder, steps=steps, null_class=null), z0, label, w, t_stop)
    teacher = DiffusersTeacher(folder, null_class=null)
    if name.startswith("anc"):
        from diffusers import DDPMScheduler

        return scheduler_loop(teacher, DDPMScheduler.from_pretrained(str(folder / "scheduler")), int(name[3:]), z0,
                              label, w, stochastic=True)
    if name.startswith("dpm"):
        from diffusers import DPMSolverMultistepScheduler

        sched = DPMSolverMultistepScheduler.from_pretrained(str(folder / "scheduler"), algorithm_type="dpmsolver++",
                                                            solver_order=2, timestep_spacing="trailing")
        return scheduler_loop(teacher, sched, int(name[3:]), z0, label, w, stochastic=False)
    raise SystemExit(f"--samplers: unknown sampler {name!r} (ddimK, stopK@T, dpmK, ancK)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, action="append",
                    help="a class-conditional DDPMPipeline folder (repeat for several; default runs/ddpm-mnist-cond)")
    ap.add_argument("--null-class", type=int, default=10)
    ap.add_argument("--guidance", default="2",
                    help="classifier-free guidance weight, or a comma list of weights (a row per weight)")
    ap.add_argument("--n", type=int, default=500, help="images per sampler (the story's noise: its first n)")
    ap.add_argument("--samplers", default="ddim20,stop20@100,stop20@200,stop20@350,dpm20,anc50")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--grid", type=Path, default=None, help="draw the first ten images of every row here (PNG)")
    args = ap.parse_args()
    try:
        weights = [float(w) for w in args.guidance.split(",")]
    except ValueError:
        weights = [float("nan")]
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        ap.error(f"--guidance: expected a finite weight >= 0 or a comma list of them, got {args.guidance!r}")
    teachers = args.teacher or [Path("runs/ddpm-mnist-cond")]
    for folder in teachers:
        if not folder.is_dir():
            ap.error(f"--teacher: {folder} is not a directory holding a diffusers pipeline")
    samplers = args.samplers.split(",")
    bad = [v for v in samplers if not re.fullmatch(r"(ddim|dpm|anc)[1-9]\d*|stop[1-9]\d*@\d+", v)]
    if bad:
        ap.error(f"--samplers: unknown sampler {bad[0]!r} (ddimK, stopK@T, dpmK, ancK)")
    names = [f.name for f in teachers] if len(teachers) > 1 else [""]
    z0 = batch_noise(12345, 0, args.n, SHAPE)  # the story's noise (ddpm_images.py) and its digits
    label = torch.arange(args.n) % 10
    rows, images = [], {}
    print("| sampler | Fréchet/floor (classifier) | Fréchet/floor (PCA) | precision | recall | label accuracy | seconds |")
    print("|---|---|---|---|---|---|---|")
    for folder, tag in zip(teachers, names):
        for w in weights:
            for name in samplers:
                t0 = time.perf_counter()
                x = sample(folder, name, z0, label, w, args.null_class)
                row = " ".join(filter(None, [tag, f"g={w:g}" if len(weights) > 1 else "", name]))
                r = {"sampler": row, "teacher": str(folder), "guidance": w, "s": time.perf_counter() - t0,
                     **scores(x, label)}
                rows.append(r)
                images[row] = x
                print(f"| {row} | {r['fd_ratio']:.2f} | {r['pca_ratio']:.2f} | {r['precision']:.3f} | "
                      f"{r['recall']:.3f} | {r['label_accuracy']:.3f} | {r['s']:.0f} |", flush=True)
                if args.grid:
                    save_grid(images, args.grid)
    if args.out:
        args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
