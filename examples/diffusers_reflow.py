"""Rectified flow from a ready-made diffusion model: a diffusers DDPM pipeline, sampled
deterministically (DDIM), maps noise z0 to images z1; a flow-matching student trained on those
pairs has straight paths and samples in a few steps.

    python examples/diffusers_reflow.py PIPELINE_DIR --out runs/ddpm-reflow --pairs 2000 --steps 2000
"""

import argparse

import flowmatch as fm

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("pipeline", help="a folder written by a diffusers DDPMPipeline's save_pretrained")
ap.add_argument("--out", required=True)
ap.add_argument("--pairs", type=int, default=2000)
ap.add_argument("--steps", type=int, default=2000)
ap.add_argument("--ddim-steps", type=int, default=20)
args = ap.parse_args()

teacher = fm.DiffusersTeacher(args.pipeline, steps=args.ddim_steps)  # DDIM, eta = 0: noise -> image
run_dir = fm.reflow.reflow(teacher, args.out, pairs=args.pairs, steps=args.steps, unet="tiny", progress=False)
student = fm.load(run_dir)
x = student.sample(16, nfe=1)  # one Euler step of the rectified student
print(f"student: {run_dir}; one-step samples {tuple(x.shape)} in [{x.min():.2f}, {x.max():.2f}]")
