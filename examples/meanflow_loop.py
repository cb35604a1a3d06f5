"""A one-step generator in your own loop: MeanFlow (Geng et al. 2025). The network takes the
step's interval ``h`` beside the time and learns the average velocity over it; one jump
``z1 = z0 + u(z0, 0, 1)`` then samples (:func:`flowmatch.flow_map`).

    python examples/meanflow_loop.py --steps 4000
"""

import argparse

import torch

import flowmatch as fm

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--steps", type=int, default=4000)
args = ap.parse_args()

torch.manual_seed(0)  # the network's initial weights
g = torch.Generator().manual_seed(0)
data = fm.checkerboard(20000, generator=g)  # or your own (N, D) tensor

# u(z, t, h) as the library's recipe builds it: the network predicts where the step heads (data
# prediction), sees Fourier features of z and the times at scale 10
model = fm.DataPrediction(fm.MLP(2, width=256, depth=3, time_scale=10.0, fourier=64, interval=True), fm.LinearPath())
# the library's MeanFlow: OT pairs, logit-normal times, a quarter of the pairs on intervals; its
# rows from the network's own trajectories (distill) need the trainer's EMA: off in a plain loop
meanflow = fm.MeanFlow(options=fm.MeanFlowOptions(distill=0.0))
opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
for _ in range(args.steps):
    x1 = data[torch.randint(len(data), (256,), generator=g)]
    loss = meanflow.loss(model, meanflow.draw(fm.Batch(x1), generator=g))
    opt.zero_grad()
    loss.backward()
    opt.step()

with torch.no_grad():
    one = fm.flow_map(model.eval(), torch.randn(4000, 2, generator=g), steps=1).x
    two = fm.flow_map(model, torch.randn(4000, 2, generator=g), steps=2).x
print(f"off the checkerboard's cells: one step {fm.off_support('checkerboard', one):.1%}, "
      f"two steps {fm.off_support('checkerboard', two):.1%} (noise: "
      f"{fm.off_support('checkerboard', torch.randn(4000, 2, generator=g)):.1%})")
