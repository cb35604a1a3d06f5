"""Sampling and likelihood from a saved run (a run directory or a Hub folder): the network, its
path and its data's units come back as one bundle.

    flowmatch train --out runs/demo            # or any run directory / Hub folder
    python examples/saved_run.py runs/demo
"""

import argparse

import torch

import flowmatch as fm

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("run", help="a run directory or a Hub folder")
ap.add_argument("--n", type=int, default=1000)
args = ap.parse_args()

run = fm.load(args.run)
g = torch.Generator(device=run.device).manual_seed(0)

x = run.sample(args.n, nfe=20, solver="midpoint")  # in the data's units
print(f"{len(x)} samples, mean {x.mean(0).tolist()}")

# the same by hand: noise in model space, any solver on the run's field, back to data units
x0 = run.noise(args.n, generator=g)
with torch.no_grad():
    z = fm.integrate(run.field(), x0, "dopri5", None, tol=1e-5).x
print(f"dopri5 in {fm.integrate.__name__}: mean {run.dataset.decode(z).mean(0).tolist()}")

# exact log-likelihood (instantaneous change of variables), nats per sample in data units
lp = run.log_prob(x[:200])
print(f"log p of {len(lp)} of its own samples: {lp.mean().item():.3f} nats (sd {lp.std().item():.3f})")
