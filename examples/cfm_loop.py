"""Your own training loop: conditional flow matching (or OT-CFM) on your own tensors, then
sampling with an ODE solver. Everything random comes from one ``torch.Generator``.

    python examples/cfm_loop.py --steps 3000 [--ot]
"""

import argparse

import torch
from sklearn.datasets import make_moons

import flowmatch as fm

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--steps", type=int, default=3000)
ap.add_argument("--ot", action="store_true", help="pair noise and data by minibatch optimal transport")
args = ap.parse_args()

g = torch.Generator().manual_seed(0)
data = torch.tensor(make_moons(4000, noise=0.05, random_state=0)[0], dtype=torch.float32)  # your tensors

model = fm.MLP(2, width=256, depth=3)
cfm = fm.CFM(coupling=fm.OTCoupling() if args.ot else None)  # straight path, uniform times by default
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for _ in range(args.steps):
    x1 = data[torch.randint(len(data), (256,), generator=g)]
    s = cfm.sample(x1, generator=g)  # noise, times, pairing, path: s.x_t, s.t, s.u_t
    loss = ((model(s.x_t, s.t) - s.u_t) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()

with torch.no_grad():
    x = fm.integrate(model.eval(), torch.randn(1000, 2, generator=g), "midpoint", nfe=20).x
fresh = torch.tensor(make_moons(1000, noise=0.05, random_state=1)[0], dtype=torch.float32)
print(f"final loss {loss.item():.3f}; W2 to fresh data: samples {fm.w2(x, fresh):.3f}, "
      f"noise {fm.w2(torch.randn(1000, 2, generator=g), fresh):.3f}")
