"""NLL of a trained flow on Gaussian data given as an .npy file, against the closed-form entropy.

    python benchmarks/gaussian_nll.py --out runs/gaussian

Writes 20000 draws of N(mu, S) (2-D, correlated, anisotropic) to OUT/gauss.npy, trains
`flowmatch train --data OUT/gauss.npy` with the defaults, and compares `flowmatch nll`
(nats per sample, on the file's held-out rows) with 0.5 log det(2 pi e S).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/gaussian"))
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cov = np.array([[4.0, 1.2], [1.2, 0.6]])
    mu = np.array([3.0, -1.0])
    data = np.random.default_rng(0).multivariate_normal(mu, cov, size=20000)
    np.save(args.out / "gauss.npy", data)
    run = args.out / "run"
    if not (run / "ema.safetensors").exists():
        subprocess.run([sys.executable, "-m", "flowmatch", "train", "--data", str(args.out / "gauss.npy"), "--out", str(run),
                        "--no-progress", "--no-plots"], check=True)
    out = subprocess.run([sys.executable, "-m", "flowmatch", "nll", str(run), "--n", str(args.n), "--json"],
                         check=True, capture_output=True, text=True).stdout
    res = json.loads(out)
    entropy = 0.5 * math.log(np.linalg.det(2 * math.pi * math.e * cov))
    print(f"NLL {res['nll']:.4f} ± {res['se']:.4f} nats (n = {res['n']}); closed-form entropy {entropy:.4f}; "
          f"difference {res['nll'] - entropy:+.4f}")


if __name__ == "__main__":
    main()
