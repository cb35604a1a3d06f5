"""A ready-made DDPM, made the way diffusers users make one: diffusers' training recipe (``UNet2DModel``,
1000 linear-beta steps, epsilon prediction, AdamW with warm-up and cosine schedule, EMA) on the 4000 training
digits of ``--data mnist``, saved by ``DDPMPipeline.save_pretrained`` for ``--teacher diffusers:DIR``: small
enough (channels 16-32-64) for a CPU to sample it 1000 times per image. Leaves DIR/samples.png, DIR/train.json.

    python benchmarks/ddpm_teacher.py --out runs/ddpm-mnist                  # about 40 min on 2 CPU cores
    python benchmarks/ddpm_teacher.py --out runs/ddpm-mnist-cond --classes   # class-conditional: null class 10
    python benchmarks/ddpm_teacher.py --out DIR --classes --steps 12000 --snapshots 4000,8000   # DIR/snapshots/step-N
"""

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

NULL_CLASS = 10  # --classes: the ten digits are 0-9, index 10 is "no class"


@torch.inference_mode()
def ancestral(eps, scheduler, x: torch.Tensor, steps: int, generator) -> torch.Tensor:
    """DDPM ancestral sampling (DDPMPipeline's loop) from x_T = ``x`` with the noise prediction ``eps(x, t)``, in [0, 1]."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(eps(x, t), t, x, generator=generator).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


def save_pipeline(unet, scheduler, ema, out: Path) -> None:
    """The EMA weights as a ``DDPMPipeline`` folder, written next to ``out`` and renamed into place."""
    from diffusers import DDPMPipeline

    net = copy.deepcopy(unet)
    ema.copy_to(net.parameters())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=net.eval(), scheduler=scheduler).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, channels, grid: bool = True,
          classes: bool = False, label_dropout: float = 0.1, snapshots: tuple[int, ...] = ()) -> dict:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from flowmatch.data.images import load_mnist_split

    torch.manual_seed(seed)
    x, y = load_mnist_split("train")
    x, y = x * 2 - 1, torch.as_tensor(y, dtype=torch.long)  # the pipeline's space: [-1, 1] pixels
    down, up = ["DownBlock2D"] * (len(channels) - 1) + ["AttnDownBlock2D"], ["AttnUpBlock2D"] + ["UpBlock2D"] * (len(channels) - 1)
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=tuple(channels), layers_per_block=1,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=8,
                       num_class_embeds=NULL_CLASS + 1 if classes else None)  # attention at the coarsest level, 7x7
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
        labels = torch.where(torch.rand(batch_size, generator=g) < label_dropout, NULL_CLASS, y[rows]) if classes else None
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
    out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(out)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "channels": list(channels),
            "parameters": sum(p.numel() for p in unet.parameters()), "train_s": wall,
            "loss_last_500": sum(losses[-500:]) / len(losses[-500:])}
    if classes:
        info.update(classes=NULL_CLASS, null_class=NULL_CLASS, label_dropout=label_dropout)
    if grid:  # 64 samples, 8x8 (with --classes: a row of 8 per digit, guidance 2)
        from PIL import Image

        labels, g = torch.arange(10).repeat_interleave(8), torch.Generator().manual_seed(0)

        def eps(x, t):  # with --classes: classifier-free guidance 2 on the predicted noise
            if not classes:
                return unet(x, t).sample
            c, u = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, torch.full_like(labels, NULL_CLASS)])).sample.chunk(2)
            return u + 2.0 * (c - u)

        images = ancestral(eps, scheduler, torch.randn(80 if classes else 64, 1, 28, 28, generator=g), 1000, g)[:, 0]
        tiles = (images.reshape(-1, 8, 28, 28).permute(0, 2, 1, 3).reshape(-1, 224) * 255).round()
        Image.fromarray(tiles.numpy().astype("uint8")).resize((448, 2 * len(tiles)), Image.NEAREST).save(out / "samples.png")
    if saved:
        info["snapshots"] = [str(p) for p in saved]
    (out / "train.json").write_text(json.dumps(info, indent=1))
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/ddpm-mnist"))
    ap.add_argument("--steps", type=int, default=6000, help="training steps (batch 64, lr 5e-4, seed 0)")
    ap.add_argument("--no-grid", action="store_true", help="skip the 64-sample picture (1000 steps each)")
    ap.add_argument("--classes", action="store_true", help="class-conditional: the digit's label (dropped to class 10 at 0.1)")
    ap.add_argument("--snapshots", default="", help="comma list of steps at which the EMA weights are also saved, "
                    "each as a pipeline in OUT/snapshots/step-N (one run's teacher against its training)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be positive")
    try:
        snapshots = tuple(int(v) for v in args.snapshots.split(",") if v.strip())
    except ValueError:
        ap.error(f"--snapshots must be a comma list of step numbers, got {args.snapshots!r}")
    if any(not 0 < v < args.steps for v in snapshots):
        ap.error(f"--snapshots must lie between 1 and --steps - 1 ({args.steps - 1}), got {args.snapshots!r}")
    info = train(args.out, args.steps, 64, 5e-4, 0, (16, 32, 64), grid=not args.no_grid, classes=args.classes, snapshots=snapshots)
    print(json.dumps(info, indent=1))
    extra = f" --teacher-null-class {NULL_CLASS} --guidance W" if args.classes else ""
    print(f"saved a DDPMPipeline in {args.out}: use it with --teacher diffusers:{args.out}{extra}")


if __name__ == "__main__":
    main()
