"""The article's teacher story on 28x28 digits: a ready-made DDPM (a diffusers pipeline folder) maps
noise to images by DDIM (eta 0); a flowmatch student trained on those pairs (2-rectified flow)
straightens the paths; distillation makes it one step. Every stage is timed; every row is
measured from the same noise.

    python benchmarks/ddpm_images.py                       # trains the DDPM too if runs/ddpm-mnist is missing
    python benchmarks/ddpm_images.py --teacher runs/ddpm-mnist --out runs/ddpm-story --n 500
    python benchmarks/ddpm_images.py --ddpm-steps 0            # leave out the costliest row (1000 steps per image)
    python benchmarks/ddpm_images.py --teacher runs/ddpm-mnist-cond --out runs/ddpm-story-cond --guidance 2
                                                           # class-conditional (ddpm_teacher.py --classes)
    python benchmarks/ddpm_images.py --teacher runs/ddpm-mnist-cond --out runs/other --guidance 2 \
        --rf2 runs/my-2rf --distilled runs/my-1step --students-only      # other students, the same noise

``--guidance W``: the teacher is class-conditional (null class ``--null-class``, 10); the pairs give
each noise a digit (each equally often) and map it with guidance W; the students learn the digits and
sample them unguided (the guidance is in the pairs). Every row draws the same digits (column k is
digit k mod 10) and also reports how often the pixel judge recognises them.

Rows: the DDPM at 1000 ancestral steps, DDIM at 100/10/4/1 steps, 2-RF at 1/2/4 Euler steps, the
distilled student at 1 step. Measures (image_metrics.image_scores against the 1000 held-out mnist
digits): Fréchet distance over its real-against-real floor in a digit classifier's features and in
a PCA of the pixels, precision and recall in the classifier's features. Straightness of the DDIM
path (its states mapped onto the straight path's time, below) against the student's.

Leaves in --out: ``story.json`` (every number), ``grid.png`` (a row of images per sampler, the same
noise in every column), ``paths.png`` (the DDIM path against the student's for a few images) and the
student runs ``rf2/`` and ``distilled/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flowmatch import reflow as rf
from flowmatch.config import StudentOptions
from flowmatch.image_metrics import image_scores, label_accuracy
from flowmatch.noise import batch_noise
from flowmatch.runs import load_run
from flowmatch.teachers import DiffusersTeacher, FlowTeacher

SHAPE = (1, 28, 28)


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


@torch.inference_mode()
def ddpm_ancestral(folder: Path, z0: torch.Tensor, steps: int = 1000, seed: int = 0, batch: int = 500,
                   classes: dict | None = None) -> torch.Tensor:
    """The pipeline's own sampler (DDPMPipeline's loop: ancestral steps) from x_T = z0, in [0, 1];
    ``classes``: ``{"label": ..., "guidance": W, "null_class": K}`` for a class-conditional UNet."""
    from diffusers import DDPMScheduler

    teacher = DiffusersTeacher(folder, null_class=(classes or {}).get("null_class"))
    sched = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    sched.set_timesteps(steps)
    out = []
    for i in tqdm(range(0, len(z0), batch), desc=f"ddpm {steps} steps", unit="batch"):
        g = torch.Generator().manual_seed(seed * 100003 + i)
        x = z0[i:i + batch].clone()
        label = classes["label"][i:i + batch] if classes else None
        for t in sched.timesteps:
            eps = teacher.eps(x, t, label, classes["guidance"] if classes else 1.0)
            x = sched.step(eps, t, x, generator=g).prev_sample
        out.append((x + 1) / 2)
    return torch.cat(out).clamp(0, 1)


@torch.inference_mode()
def ddim(folder: Path, z0: torch.Tensor, steps: int, batch: int = 250, trajectory: bool = False,
         classes: dict | None = None):
    """DDIM (eta 0) through flowmatch's diffusers teacher, in [0, 1]; with ``trajectory`` also the
    states mapped onto the straight path (below)."""
    teacher = DiffusersTeacher(folder, steps=steps, null_class=(classes or {}).get("null_class"))
    label, w = (classes["label"], classes["guidance"]) if classes else (None, 1.0)
    if not trajectory:
        return torch.cat([(teacher(z0[i:i + batch], None if label is None else label[i:i + batch], w) + 1) / 2
                          for i in range(0, len(z0), batch)]).clamp(0, 1)
    return straight_path_states(teacher, z0, None if label is None else label[:len(z0)], w)


def student_flow(run, z0: torch.Tensor, k: int, label: torch.Tensor | None = None) -> torch.Tensor:
    """A student's k Euler steps from ``z0`` (each row's class from ``label``, unguided)."""
    if label is None:
        return torch.cat([run.flow(z0[i:i + 250], k, "euler").x for i in range(0, len(z0), 250)])
    out = torch.empty(len(z0), *SHAPE)
    for c in label.unique().tolist():
        rows = (label == c).nonzero().flatten()
        out[rows] = run.flow(z0[rows], k, "euler", label=c).x.cpu()
    return out


def straight_path_states(teacher: DiffusersTeacher, z0: torch.Tensor, label=None, guidance: float = 1.0):
    """DDIM's states ``x = sqrt(ab) x1 + sqrt(1 - ab) eps`` as states of the straight path
    ``(1 - t) eps + t x1``: divide by ``sqrt(ab) + sqrt(1 - ab)``, at ``t = sqrt(ab) / (sqrt(ab) +
    sqrt(1 - ab))`` (both paths carry the same marginals up to that scale). Returns (times, states
    in the pipeline's [-1, 1] space)."""
    ab = teacher.scheduler.alphas_cumprod
    times, states = [], []
    for t, x in teacher.walk(z0, label, guidance):
        a, s = (ab[t].sqrt(), (1 - ab[t]).sqrt()) if t is not None else (1.0, 0.0)  # None: the sample
        times.append(float(a / (a + s)))
        states.append(x.cpu() / (a + s))
    return torch.tensor(times), torch.stack(states)


def path_straightness(times: torch.Tensor, states: torch.Tensor) -> float:
    """``sum_k dt_k mean ||(z1 - z0) - dz_k / dt_k||^2`` over a trajectory's segments: 0 for a
    straight path walked at constant speed (the discrete form of Liu et al.'s straightness)."""
    z0, z1 = states[0], states[-1]
    total = 0.0
    for k in range(len(times) - 1):
        dt = float(times[k + 1] - times[k])
        d = (z1 - z0) - (states[k + 1] - states[k]) / dt
        total += dt * d.flatten(1).pow(2).sum(1).mean().item()
    return total


def scores(x: torch.Tensor, label: torch.Tensor | None = None) -> dict:
    r = image_scores(x, "mnist")
    res = {"fd_ratio": r["classifier"]["ratio"], "pca_ratio": r["pca"]["ratio"],
           "precision": r["prdc"]["precision"]["value"], "recall": r["prdc"]["recall"]["value"]}
    if label is not None:  # how often the independent pixel judge sees the digit asked for
        res["label_accuracy"] = label_accuracy(x, label.numpy(), "mnist")
    return res


def save_grid(rows: dict, path: Path, cols: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(cols * 0.7 + 2.2, len(rows) * 0.8))
    for ax, (name, x) in zip(np.atleast_1d(axes), rows.items()):
        strip = torch.cat(list(x[:cols, 0].clamp(0, 1)), dim=1).numpy()
        ax.imshow(strip, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("the same noise in every column", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_paths(paths: dict, path: Path, images: int = 3) -> None:
    """For a few images, the states along each path at its own times (pixels in [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = images * len(paths)
    n_cols = max(len(s) for _, s in paths.values())
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * 0.8 + 1.8, n_rows * 0.85), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    row = 0
    for i in range(images):
        for name, (times, states) in paths.items():
            for k in range(len(states)):
                ax = axes[row, k]
                ax.imshow(((states[k, i, 0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"t={float(times[k]):.2f}", fontsize=6)
            axes[row, 0].text(-2, 14, name, ha="right", va="center", fontsize=7)
            row += 1
    fig.suptitle("DDIM's path (mapped onto the straight path) against the 2-RF student's, same noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("runs/ddpm-mnist"), help="a DDPMPipeline folder")
    ap.add_argument("--teacher-steps", type=int, default=6000, help="training steps when the teacher is missing")
    ap.add_argument("--out", type=Path, default=Path("runs/ddpm-story"))
    ap.add_argument("--n", type=int, default=500, help="samples per row for the measures")
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--pair-steps", type=int, default=50, help="DDIM steps for the pairs")
    ap.add_argument("--reflow-steps", type=int, default=3000)
    ap.add_argument("--distill-steps", type=int, default=1500)
    ap.add_argument("--distill-nfe", type=int, default=16, help="the 2-RF teacher's midpoint NFE for the distillation pairs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--unet", default="tiny", help="the students' UNet preset (tiny: the same size as the DDPM here)")
    ap.add_argument("--time-dist", default="uniform", help="reflow's times: uniform or u-shaped (RF++)")
    ap.add_argument("--loss", default="mse", help="mse, pseudo-huber or lpips-huber (RF++; needs --perceptual)")
    ap.add_argument("--perceptual", help="--loss lpips-huber: your TorchScript perceptual distance (LPIPS exported)")
    ap.add_argument("--ddpm-steps", type=int, default=1000, help="the DDPM row's ancestral steps (0: leave the row out)")
    ap.add_argument("--guidance", type=float, default=None,
                    help="a class-conditional teacher: pairs with digits, guided with this weight")
    ap.add_argument("--null-class", type=int, default=10, help="--guidance: the teacher's null class index")
    ap.add_argument("--rf2", type=Path, default=None,
                    help="the 2-RF student's run (default OUT/rf2; trained there when it has no weights)")
    ap.add_argument("--distilled", type=Path, default=None,
                    help="the distilled student's run (default OUT/distilled; trained there when it has no weights)")
    ap.add_argument("--students-only", action="store_true",
                    help="score only the students' rows, from the same noise (no DDIM or DDPM rows; "
                         "the straightness still walks DDIM's 10 steps on 100 noises)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stages, rows, table = {}, {}, []
    if not (args.teacher / "model_index.json").exists():
        import ddpm_teacher

        info = ddpm_teacher.train(args.teacher, args.teacher_steps, 64, 5e-4, 0, (16, 32, 64))
    else:
        info = json.loads((args.teacher / "train.json").read_text()) if (args.teacher / "train.json").exists() else {}
    stages["ddpm training"] = info.get("train_s", float("nan"))

    cond = args.guidance is not None
    null = args.null_class if cond else None
    opts = StudentOptions(pairs=args.pairs, teacher_nfe=args.pair_steps, steps=args.reflow_steps, lr=args.lr,
                          batch_size=args.batch_size, unet=args.unet, time_dist=args.time_dist, loss=args.loss,
                          perceptual=args.perceptual,
                          guidance=args.guidance, teacher_null_class=null)
    teacher = DiffusersTeacher(args.teacher, steps=args.pair_steps, null_class=null)
    rf2 = args.rf2 or args.out / "rf2"
    if not (rf2 / "ema.safetensors").exists():
        _, stages["pairs (DDIM)"] = timed(rf.pairs_job, teacher, rf2 / "pairs", opts.validate())
        _, stages["reflow training"] = timed(rf.student, teacher, rf2, "reflow", opts, resume=True)
    dist = args.distilled or args.out / "distilled"
    if not (dist / "ema.safetensors").exists():
        dopts = StudentOptions(pairs=args.pairs, teacher_nfe=args.distill_nfe, steps=args.distill_steps, lr=args.lr,
                               batch_size=args.batch_size, loss=args.loss, perceptual=args.perceptual,
                               guidance=1.0 if cond else None)
        flow_teacher = FlowTeacher(rf2, solver="midpoint", nfe=args.distill_nfe)
        _, stages["distillation (pairs + training)"] = timed(rf.student, flow_teacher, dist, "distill", dopts)

    straight = {}

    def dump():  # every number so far (a long run can be read, or stopped, part way)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        (args.out / "story.json").write_text(json.dumps({"settings": settings,
                                                         "teacher": info, "rows": table, "stages": stages,
                                                         "straightness": straight}, indent=1))

    z0 = batch_noise(12345, 0, args.n, SHAPE)  # the same noise for every row
    label = torch.arange(args.n) % 10 if cond else None  # and the same digits
    classes = {"label": label, "guidance": args.guidance, "null_class": null} if cond else None
    for k in () if args.students_only else (100, 10, 4, 1):
        x, s = timed(ddim, args.teacher, z0, k, classes=classes)
        rows[f"DDIM {k}"] = x
        table.append({"sampler": f"DDIM (eta 0), {k} step{'s' * (k > 1)}", "nfe": k, "s": s, **scores(x, label)})

    run = load_run(rf2)
    for k in (1, 2, 4):
        x, s = timed(student_flow, run, z0, k, label)
        rows[f"2-RF {k}"] = x
        table.append({"sampler": f"2-rectified flow, {k} Euler step{'s' * (k > 1)}", "nfe": k, "s": s, **scores(x, label)})

    drun = load_run(dist)
    x, s = timed(student_flow, drun, z0, 1, label)
    rows["distilled 1"] = x
    table.append({"sampler": "2-RF distilled, 1 step", "nfe": 1, "s": s, **scores(x, label)})

    dump()
    # straightness: DDIM's path against the student's, 10 steps each, on 100 of the same noises
    times, states = ddim(args.teacher, z0[:100], 10, trajectory=True, classes=classes)
    if cond:  # the student's path for each row's digit
        student_states = torch.empty(11, 100, *SHAPE)
        for c in range(10):
            rows_c = (label[:100] == c).nonzero().flatten()
            student_states[:, rows_c] = run.flow(z0[rows_c], 10, "euler", trajectory=True, label=c).trajectory.cpu()
    else:
        student_states = run.flow(z0[:100], 10, "euler", trajectory=True).trajectory.cpu()
    student_states = student_states * 2 - 1  # data units [0, 1] -> the pipeline's [-1, 1]
    student_times = torch.linspace(0, 1, 11)
    straight.update({"DDIM, 10 steps": path_straightness(times, states),
                     "2-RF, 10 Euler steps": path_straightness(student_times, student_states)})
    save_paths({"DDIM": (times, states), "2-RF": (student_times, student_states)}, args.out / "paths.png")
    save_grid(rows, args.out / "grid.png")
    dump()
    if args.ddpm_steps and not args.students_only:  # the pipeline's own sampler: the costliest row, last (shown first)
        x, s = timed(ddpm_ancestral, args.teacher, z0, args.ddpm_steps, classes=classes)
        rows = {f"DDPM {args.ddpm_steps}": x, **rows}
        table.insert(0, {"sampler": f"DDPM, {args.ddpm_steps} ancestral steps", "nfe": args.ddpm_steps, "s": s,
                         **scores(x, label)})
        save_grid(rows, args.out / "grid.png")

    print(f"teacher: {args.teacher} ({info.get('parameters', '?')} parameters, {info.get('steps', '?')} steps); "
          f"n = {args.n}")
    for name, r in (("2-RF", run), ("distilled", drun)):  # as the runs were trained (they may predate this call)
        c = r.cfg
        print(f"{name}: {c.steps} steps, batch {c.batch_size}, lr {c.lr:g}, times {c.time_dist}, loss {c.loss}"
              f" ({rf2 if r is run else dist})")
    if cond:
        print(f"class-conditional: pairs guided with weight {args.guidance:g} (null class {null}); students unguided")
    acc = " label accuracy |" if cond else ""
    print(f"| sampler | NFE | Fréchet/floor (classifier) | Fréchet/floor (PCA) | precision | recall |{acc} seconds |")
    print("|---|---|---|---|---|---|---|" + ("---|" if cond else ""))
    for r in table:
        acc = f" {r['label_accuracy']:.3f} |" if cond else ""
        print(f"| {r['sampler']} | {r['nfe']} | {r['fd_ratio']:.2f} | {r['pca_ratio']:.2f} | {r['precision']:.3f} "
              f"| {r['recall']:.3f} |{acc} {r['s']:.1f} |")
    print("| stage | seconds |\n|---|---|")
    for k, v in stages.items():
        print(f"| {k} | {v:.0f} |")
    print("straightness (0 = straight): " + ", ".join(f"{k} {v:.3f}" for k, v in straight.items()))
    dump()


if __name__ == "__main__":
    main()
