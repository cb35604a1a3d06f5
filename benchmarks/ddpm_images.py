"""The article's teacher story on 28x28 digits: a ready-made DDPM maps noise to images by DDIM (eta 0); a
flowmatch student trained on those pairs (2-rectified flow) straightens the paths; distillation makes it one
step. Rows, from the same noise: the DDPM at 1000 ancestral steps, DDIM at 100/10/4/1 steps, 2-RF at 1/2/4
Euler steps, the distilled student: Fréchet distance over its floor (classifier, PCA), precision and recall
against the held-out digits (``--guidance W``: noise k asks for digit k mod 10, and the judge's accuracy);
every stage timed; straightness of DDIM's path (mapped onto the straight path) against the student's.

    python benchmarks/ddpm_images.py --teacher runs/ddpm-mnist --out runs/ddpm-story
    python benchmarks/ddpm_images.py --teacher runs/ddpm-mnist-cond --out runs/ddpm-story-cond --guidance 2
    python benchmarks/ddpm_images.py --teacher T --out OUT --guidance 2 --rf2 RF2 --distilled D --students-only
"""

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from flowmatch import reflow as rf
from flowmatch.config import StudentOptions
from flowmatch.image_metrics import image_scores, label_accuracy
from flowmatch.runs import load_run
from flowmatch.seeding import noise
from flowmatch.teachers import DiffusersTeacher, FlowTeacher

SHAPE = (1, 28, 28)


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    return fn(*args, **kw), time.perf_counter() - t0


def ddpm_ancestral(folder: Path, z0: torch.Tensor, steps: int, label=None, guidance: float = 1.0, null=None) -> torch.Tensor:
    """The pipeline's own sampler (ancestral steps) from x_T = z0 in batches of 500, in [0, 1]."""
    import ddpm_teacher  # benchmarks/, the script's folder
    from diffusers import DDPMScheduler

    teacher, sched = DiffusersTeacher(folder, null_class=null), DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    out = []
    for i in tqdm(range(0, len(z0), 500), desc=f"ddpm {steps} steps", unit="batch"):
        rows = None if label is None else label[i:i + 500]
        out.append(ddpm_teacher.ancestral(lambda x, t, rows=rows: teacher.eps(x, t, rows, guidance), sched, z0[i:i + 500].clone(), steps,
                                          torch.Generator().manual_seed(i)))
    return torch.cat(out)


@torch.inference_mode()
def ddim(folder: Path, z0: torch.Tensor, steps: int, label=None, guidance: float = 1.0, null=None, path: bool = False):
    """DDIM (eta 0) through flowmatch's diffusers teacher, in [0, 1]; ``path``: its states ``sqrt(ab) x1 + sqrt(1 - ab)
    eps`` divided by ``a + s = sqrt(ab) + sqrt(1 - ab)``, the straight path's states at ``t = a / (a + s)``, in [-1, 1]."""
    teacher = DiffusersTeacher(folder, steps=steps, null_class=null)
    if not path:
        return torch.cat([(teacher(z0[i:i + 250], None if label is None else label[i:i + 250], guidance) + 1) / 2
                          for i in range(0, len(z0), 250)]).clamp(0, 1)
    ab, times, states = teacher.scheduler.alphas_cumprod, [], []
    for t, x in teacher.walk(z0, label, guidance):
        a, s = (ab[t].sqrt(), (1 - ab[t]).sqrt()) if t is not None else (1.0, 0.0)  # None: the sample
        times.append(float(a / (a + s)))
        states.append(x.cpu() / (a + s))
    return torch.tensor(times), torch.stack(states)


def student_flow(run, z0: torch.Tensor, k: int, label=None, trajectory: bool = False) -> torch.Tensor:
    """A student's k Euler steps from ``z0`` (each row's class from ``label``, unguided); or its k + 1 states."""
    groups = [(torch.arange(len(z0)), None)] if label is None else [((label == c).nonzero().flatten(), c) for c in label.unique().tolist()]
    out = torch.empty(k + 1 if trajectory else 1, len(z0), *SHAPE)
    for rows, c in groups:
        for part in rows.split(250):
            res = run.flow(z0[part], k, "euler", label=c, trajectory=trajectory)
            out[:, part] = (res.trajectory if trajectory else res.x).cpu()
    return out if trajectory else out[0]


def path_straightness(times: torch.Tensor, states: torch.Tensor) -> float:
    """``sum_k dt_k mean ||(z1 - z0) - dz_k / dt_k||^2``: 0 for a straight path at constant speed (Liu et al.)."""
    total = 0.0
    for k in range(len(times) - 1):
        dt = float(times[k + 1] - times[k])
        d = (states[-1] - states[0]) - (states[k + 1] - states[k]) / dt
        total += dt * d.flatten(1).pow(2).sum(1).mean().item()
    return total


def scores(x: torch.Tensor, label=None) -> dict:
    r = image_scores(x, "mnist")
    res = {"fd_ratio": r["classifier"]["ratio"], "pca_ratio": r["pca"]["ratio"],
           "precision": r["prdc"]["precision"]["value"], "recall": r["prdc"]["recall"]["value"]}
    if label is not None:  # how often the independent pixel judge sees the digit asked for
        res["label_accuracy"] = label_accuracy(x, label.numpy(), "mnist")
    return res


def save_rows(rows: dict, path: Path, title: str) -> None:
    """A row of images per name: ``{name: (images in [0, 1], a title per column or None)}``."""
    import matplotlib.pyplot as plt
    plt.switch_backend("Agg")

    cols = max(len(x) for x, _ in rows.values())
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.75 + 1.8, len(rows) * 0.85), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (name, (images, titles)) in enumerate(rows.items()):
        for c, image in enumerate(images):
            axes[r, c].imshow(image[0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_title(titles[c] if titles else "", fontsize=6)
        axes[r, 0].text(-2, 14, name, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("runs/ddpm-mnist"), help="a DDPMPipeline folder (ddpm_teacher.py)")
    ap.add_argument("--out", type=Path, default=Path("runs/ddpm-story"))
    ap.add_argument("--n", type=int, default=500, help="samples per row for the measures")
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--pair-steps", type=int, default=50, help="DDIM steps for the pairs")
    ap.add_argument("--reflow-steps", type=int, default=3000)
    ap.add_argument("--distill-steps", type=int, default=1500)
    ap.add_argument("--ddpm-steps", type=int, default=1000, help="the DDPM row's ancestral steps (0: leave the row out)")
    ap.add_argument("--guidance", type=float, default=None, help="a class-conditional teacher: pairs with digits, guided")
    ap.add_argument("--rf2", type=Path, help="the 2-RF student's run (default OUT/rf2; trained there when it has no weights)")
    ap.add_argument("--distilled", type=Path, help="the distilled student's run (default OUT/distilled; trained when missing)")
    ap.add_argument("--students-only", action="store_true", help="score only the students' rows (no DDIM or DDPM rows; "
                    "the straightness still walks DDIM's 10 steps on 100 noises)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.teacher / "model_index.json").exists():
        ap.error(f"--teacher: {args.teacher} is no DDPMPipeline folder; make one: python benchmarks/ddpm_teacher.py --out {args.teacher}")
    info = json.loads((args.teacher / "train.json").read_text()) if (args.teacher / "train.json").exists() else {}
    stages, images, table, straight = {"ddpm training": info.get("train_s", float("nan"))}, {}, [], {}
    cond = args.guidance is not None
    null = 10 if cond else None  # ddpm_teacher.py --classes: the null class
    rf2, dist = args.rf2 or args.out / "rf2", args.distilled or args.out / "distilled"
    if not (rf2 / "ema.safetensors").exists():
        opts = StudentOptions(pairs=args.pairs, teacher_nfe=args.pair_steps, steps=args.reflow_steps, lr=5e-4, batch_size=64,
                              unet="tiny", guidance=args.guidance, teacher_null_class=null)  # a UNet the DDPM's size
        teacher = DiffusersTeacher(args.teacher, steps=args.pair_steps, null_class=null)
        _, stages["pairs (DDIM)"] = timed(rf.pairs_job, teacher, rf2 / "pairs", opts.validate())
        _, stages["reflow training"] = timed(rf.student, teacher, rf2, "reflow", opts, resume=True)
    if not (dist / "ema.safetensors").exists():
        dopts = StudentOptions(pairs=args.pairs, teacher_nfe=16, steps=args.distill_steps, lr=5e-4, batch_size=64,
                               guidance=1.0 if cond else None)
        flow_teacher = FlowTeacher(rf2, solver="midpoint", nfe=16)  # the distillation pairs: 16 midpoint NFE
        _, stages["distillation (pairs + training)"] = timed(rf.student, flow_teacher, dist, "distill", dopts)

    def dump():  # every number so far (a long run can be read, or stopped, part way)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        (args.out / "story.json").write_text(json.dumps({"settings": settings, "teacher": info, "rows": table, "stages": stages,
                                                         "straightness": straight}, indent=1))

    def row(name: str, sampler: str, nfe: int, fn, *a, first: bool = False):
        x, s = timed(fn, *a)
        images[name] = (x[:10], None)
        table.insert(0 if first else len(table), {"sampler": sampler, "nfe": nfe, "s": s, **scores(x, label)})

    z0 = noise(12345, 0, args.n, SHAPE)  # the same noise for every row
    label = torch.arange(args.n) % 10 if cond else None  # and the same digits
    guided = (label, args.guidance if cond else 1.0, null)
    for k in () if args.students_only else (100, 10, 4, 1):
        row(f"DDIM {k}", f"DDIM (eta 0), {k} step{'s' * (k > 1)}", k, ddim, args.teacher, z0, k, *guided)
    run, drun = load_run(rf2), load_run(dist)
    for k in (1, 2, 4):
        row(f"2-RF {k}", f"2-rectified flow, {k} Euler step{'s' * (k > 1)}", k, student_flow, run, z0, k, label)
    row("distilled 1", "2-RF distilled, 1 step", 1, student_flow, drun, z0, 1, label)
    dump()
    # straightness: DDIM's path against the student's, 10 steps each, on 100 of the same noises
    times, states = ddim(args.teacher, z0[:100], 10, None if label is None else label[:100], *guided[1:], path=True)
    student_states = student_flow(run, z0[:100], 10, None if label is None else label[:100], trajectory=True) * 2 - 1
    student_times = torch.linspace(0, 1, 11)
    straight.update({"DDIM, 10 steps": path_straightness(times, states),
                     "2-RF, 10 Euler steps": path_straightness(student_times, student_states)})
    paths = {f"{name} {i}": ((s[:, i] + 1) / 2, [f"t={float(t):.2f}" for t in ts]) for i in range(3)
             for name, ts, s in (("DDIM", times, states), ("2-RF", student_times, student_states))}
    save_rows(paths, args.out / "paths.png", "DDIM's path (mapped onto the straight path) against the 2-RF student's, same noise")
    save_rows(images, args.out / "grid.png", "the same noise in every column")
    dump()
    if args.ddpm_steps and not args.students_only:  # the pipeline's own sampler: the costliest row, last (shown first)
        row(f"DDPM {args.ddpm_steps}", f"DDPM, {args.ddpm_steps} ancestral steps", args.ddpm_steps, ddpm_ancestral, args.teacher,
            z0, args.ddpm_steps, *guided, first=True)
        images = {f"DDPM {args.ddpm_steps}": images.pop(f"DDPM {args.ddpm_steps}"), **images}
        save_rows(images, args.out / "grid.png", "the same noise in every column")
    print(f"teacher: {args.teacher} ({info.get('parameters', '?')} parameters, {info.get('steps', '?')} steps); n = {args.n}")
    for name, r, d in (("2-RF", run, rf2), ("distilled", drun, dist)):  # as the runs were trained (they may predate this call)
        print(f"{name}: {r.cfg.steps} steps, batch {r.cfg.batch_size}, lr {r.cfg.lr:g}, times {r.cfg.time_dist}, loss {r.cfg.loss} ({d})")
    if cond:
        print(f"class-conditional: pairs guided with weight {args.guidance:g} (null class {null}); students unguided")
    print("| sampler | NFE | Fréchet/floor (classifier) | Fréchet/floor (PCA) | precision | recall |" + " label accuracy |" * cond
          + " seconds |\n|---|---|---|---|---|---|---|" + "---|" * cond)
    for r in table:
        acc = f" {r['label_accuracy']:.3f} |" if cond else ""
        print(f"| {r['sampler']} | {r['nfe']} | {r['fd_ratio']:.2f} | {r['pca_ratio']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |"
              f"{acc} {r['s']:.1f} |")
    print("| stage | seconds |\n|---|---|\n" + "\n".join(f"| {k} | {v:.0f} |" for k, v in stages.items()))
    print("straightness (0 = straight): " + ", ".join(f"{k} {v:.3f}" for k, v in straight.items()))
    dump()


if __name__ == "__main__":
    main()
