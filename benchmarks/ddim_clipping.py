"""Why a class-conditional DDPM teacher's DDIM gets worse with more steps: the pipeline's scheduler
clips its estimate of the clean image x0 to [-1, 1] (``clip_sample``, the DDPM default), and
diffusers' DDIM step then points at the next state with the *unclipped* noise prediction unless it
is called with ``use_clipped_model_output=True`` (``DiffusersTeacher``'s default, ``clipped_eps``).
Label accuracy (the pixel judge) of each variant, from the same noise, digit k mod 10 in column k:

    python benchmarks/ddim_clipping.py --teacher runs/ddpm-mnist-cond --n 50
"""

from __future__ import annotations

import argparse
import time

import torch

from flowmatch.image_metrics import label_accuracy
from flowmatch.noise import batch_noise
from flowmatch.teachers import DiffusersTeacher

VARIANTS = [("100 steps, guidance 2, raw noise prediction (diffusers' DDIMPipeline)", 100, 2.0, False),
            ("100 steps, guidance 2, clipped (the teacher's default)", 100, 2.0, True),
            ("100 steps, guidance 1, raw", 100, 1.0, False),
            ("20 steps, guidance 2, raw", 20, 2.0, False),
            ("20 steps, guidance 2, clipped (the story's pairs)", 20, 2.0, True)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="runs/ddpm-mnist-cond", help="a class-conditional DDPMPipeline folder")
    ap.add_argument("--null-class", type=int, default=10)
    ap.add_argument("--n", type=int, default=50, help="images per variant")
    args = ap.parse_args()
    z0 = batch_noise(12345, 0, args.n, (1, 28, 28))
    label = torch.arange(args.n) % 10
    print("| DDIM (eta 0) | label accuracy | mean pixel | seconds |\n|---|---|---|---|")
    for name, steps, w, clipped in VARIANTS:
        t0 = time.perf_counter()
        teacher = DiffusersTeacher(args.teacher, steps=steps, null_class=args.null_class, clipped_eps=clipped)
        x = ((teacher(z0, label, w) + 1) / 2).clamp(0, 1)
        print(f"| {name} | {label_accuracy(x, label, 'mnist'):.3f} | {x.mean():.3f} | {time.perf_counter() - t0:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
