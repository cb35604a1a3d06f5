"""A ready-made DDPM, made the way diffusers users make one: diffusers' unconditional-training recipe
(``UNet2DModel``, ``DDPMScheduler`` with 1000 linear-beta steps, epsilon prediction, AdamW with
warm-up and a cosine schedule, an EMA of the weights) on the 4000 training digits of ``--data mnist``
(28x28), saved with ``DDPMPipeline.save_pretrained``: the same kind of folder a user downloads.
flowmatch only ever reads it through ``--teacher diffusers:DIR``.

    python benchmarks/ddpm_teacher.py --out runs/ddpm-mnist                  # about 40 min on 2 CPU cores
    python benchmarks/ddpm_teacher.py --out runs/ddpm-mnist --steps 200      # a quick look
    python benchmarks/ddpm_teacher.py --out runs/ddpm-mnist-cond --classes   # class-conditional, for guidance

``--classes``: the UNet takes the digit's label through ``num_class_embeds = 11``, index 10 being the
null class (labels dropped to it with probability ``--label-dropout``, 0.1, for classifier-free
guidance); flowmatch reads it with ``--teacher diffusers:DIR --teacher-null-class 10``, and its
picture has a row per digit (guidance 2). ``DDPMPipeline`` itself does not pass labels, so the
picture is drawn by the same ancestral loop written out.

The network is small so that a CPU can sample it 1000 times per image: channels (16, 32, 64),
attention at 7x7 (the recipe's network, (128, 128, 256, 256, 512, 512), is for GPUs). The learning
rate is the recipe's 1e-4 scaled up for a short run. Leaves ``DIR/samples.png`` (DDPM, 1000 ancestral
steps) and ``DIR/train.json`` (settings, loss, wall-clock). ``--snapshots 4000,8000`` also saves the
EMA weights at those steps, each as a pipeline folder ``DIR/snapshots/step-N`` (written beside and
renamed into place), to follow one teacher through its training (``teacher_samplers.py`` scores
several): they are not shorter runs, since the cosine schedule spans all ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm


def make_unet(channels=(16, 32, 64), layers_per_block: int = 1, num_classes: int | None = None):
    from diffusers import UNet2DModel

    down = ["DownBlock2D"] * len(channels)
    up = ["UpBlock2D"] * len(channels)
    down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=tuple(channels),
                       layers_per_block=layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
                       norm_num_groups=8, num_class_embeds=num_classes)


NULL_CLASS = 10  # --classes: the ten digits are 0-9, index 10 is "no class"


@torch.inference_mode()
def guided_ancestral(unet, scheduler, labels: torch.Tensor, guidance: float, steps: int, generator) -> torch.Tensor:
    """DDPM ancestral sampling with classifier-free guidance on the predicted noise, in [0, 1]."""
    scheduler.set_timesteps(steps)
    x = torch.randn(len(labels), 1, 28, 28, generator=generator)
    null = torch.full_like(labels, NULL_CLASS)
    for t in scheduler.timesteps:
        eps_c, eps_u = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x, generator=generator).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


def save_pipeline(unet, scheduler, ema, out: Path) -> None:
    """The EMA weights as a ``DDPMPipeline`` folder, written next to ``out`` and renamed into place."""
    import copy
    import shutil

    from diffusers import DDPMPipeline

    net = copy.deepcopy(unet)
    ema.copy_to(net.parameters())
    net.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=net, scheduler=scheduler).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, channels, grid: bool = True,
          classes: bool = False, label_dropout: float = 0.1, snapshots: tuple[int, ...] = ()) -> dict:
    from diffusers import DDPMPipeline, DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from flowmatch.data.images import load_mnist_split

    torch.manual_seed(seed)
    x, y = load_mnist_split("train")
    x = x * 2 - 1  # the pipeline's space: [-1, 1] pixels
    y = torch.as_tensor(y, dtype=torch.long)
    unet = make_unet(channels, num_classes=NULL_CLASS + 1 if classes else None)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(500, steps // 10), num_training_steps=steps)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    g = torch.Generator().manual_seed(seed)
    losses, saved, t0 = [], [], time.perf_counter()
    bar = tqdm(range(steps), desc="ddpm", mininterval=2)
    for step in bar:
        rows = torch.randint(len(x), (batch_size,), generator=g)
        x1 = x[rows]
        noise = torch.randn(x1.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        labels = None
        if classes:
            drop = torch.rand(batch_size, generator=g) < label_dropout
            labels = torch.where(drop, NULL_CLASS, y[rows])
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x1, noise, t), t, class_labels=labels).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step + 1 in snapshots and step + 1 < steps:  # the last step's weights are the run's own pipeline
            saved.append(out / "snapshots" / f"step-{step + 1}")
            save_pipeline(unet, scheduler, ema, saved[-1])
    wall = time.perf_counter() - t0
    ema.copy_to(unet.parameters())
    unet.eval()
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "channels": list(channels),
            "parameters": sum(p.numel() for p in unet.parameters()), "train_s": wall,
            "loss_last_500": sum(losses[-500:]) / len(losses[-500:])}
    if classes:
        info.update(classes=NULL_CLASS, null_class=NULL_CLASS, label_dropout=label_dropout)
    if grid and classes:
        from PIL import Image

        labels = torch.arange(10).repeat_interleave(8)
        images = guided_ancestral(unet, scheduler, labels, 2.0, 1000, torch.Generator().manual_seed(0))
        tiles = (images[:, 0].reshape(10, 8, 28, 28).permute(0, 2, 1, 3).reshape(280, 224) * 255).round()
        Image.fromarray(tiles.numpy().astype("uint8")).resize((448, 560), Image.NEAREST).save(out / "samples.png")
    elif grid:
        from PIL import Image

        images = pipe(batch_size=64, generator=torch.Generator().manual_seed(0), num_inference_steps=1000,
                      output_type="np").images  # (64, 28, 28, 1) in [0, 1]
        tiles = (images[..., 0].reshape(8, 8, 28, 28).transpose(0, 2, 1, 3).reshape(224, 224) * 255).round()
        Image.fromarray(tiles.astype("uint8")).resize((448, 448), Image.NEAREST).save(out / "samples.png")
    if saved:
        info["snapshots"] = [str(p) for p in saved]
    (out / "train.json").write_text(json.dumps(info, indent=1))
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/ddpm-mnist"))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channels", default="16,32,64", help="block_out_channels of the UNet")
    ap.add_argument("--no-grid", action="store_true", help="skip the 64-sample picture (1000 steps each)")
    ap.add_argument("--classes", action="store_true", help="class-conditional: the digit's label, null class 10")
    ap.add_argument("--label-dropout", type=float, default=0.1, help="--classes: share of labels dropped to the null")
    ap.add_argument("--snapshots", default="", help="comma list of steps at which the EMA weights are also saved, "
                    "each as a pipeline in OUT/snapshots/step-N (one run's teacher against its training)")
    args = ap.parse_args()
    if args.steps < 1 or args.batch_size < 1 or not (args.lr > 0 and math.isfinite(args.lr)):
        ap.error("--steps, --batch-size and --lr must be positive")
    if not 0 <= args.label_dropout < 1:
        ap.error("--label-dropout must be in [0, 1)")
    try:
        snapshots = tuple(int(v) for v in args.snapshots.split(",") if v.strip())
    except ValueError:
        ap.error(f"--snapshots must be a comma list of step numbers, got {args.snapshots!r}")
    if any(not 0 < v < args.steps for v in snapshots):
        ap.error(f"--snapshots must lie between 1 and --steps - 1 ({args.steps - 1}), got {args.snapshots!r}")
    info = train(args.out, args.steps, args.batch_size, args.lr, args.seed,
                 tuple(int(c) for c in args.channels.split(",")), grid=not args.no_grid, classes=args.classes,
                 label_dropout=args.label_dropout, snapshots=snapshots)
    print(json.dumps(info, indent=1))
    extra = f" --teacher-null-class {NULL_CLASS} --guidance W" if args.classes else ""
    print(f"saved a DDPMPipeline in {args.out}: use it with --teacher diffusers:{args.out}{extra}")


if __name__ == "__main__":
    main()
