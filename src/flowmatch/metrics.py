"""Quality measures.

- :func:`w2`: exact 2-Wasserstein distance between two equal-weight point clouds (POT
  ``ot.emd2`` on the squared Euclidean cost, then the square root).
- :func:`straightness`: ``S = ∫ E ||(Z1 - Z0) - v(Z_t, t)||^2 dt`` along the model's own
  trajectories (Liu et al. 2022, "Flow Straight and Fast"); 0 means one Euler step is exact.
- :func:`evaluate`: W2 against fresh data and its floor at several NFEs, and an adaptive
  solver's NFE — the numbers ``flowmatch eval`` prints.
"""

from __future__ import annotations

import math

import ot
import torch

from .solvers import integrate


def w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact W2 between the empirical measures of ``a`` (N, ...) and ``b`` (M, ...)."""
    a = a.reshape(len(a), -1).double().cpu().numpy()
    b = b.reshape(len(b), -1).double().cpu().numpy()
    cost = ot.dist(a, b)
    value, log = ot.emd2(ot.unif(len(a)), ot.unif(len(b)), cost, numItermax=50_000_000, log=True)
    if log.get("warning"):
        raise RuntimeError(f"exact OT did not converge: {log['warning']}")
    return math.sqrt(max(float(value), 0.0))


@torch.inference_mode()
def straightness(v, x0: torch.Tensor, nfe: int = 100) -> float:
    """Straightness of the flow of ``v`` from noise ``x0``, by Euler with ``nfe`` steps.

    Each step contributes ``dt * mean_i ||(Z1 - Z0)_i - v(Z_t, t)_i||^2`` where ``Z1`` is the
    end point of the same trajectory (squared norms summed over dimensions).
    """
    res = integrate(v, x0, "euler", nfe, trajectory=True)
    z0, z1 = res.trajectory[0], res.trajectory[-1]
    total, dt = 0.0, 1.0 / nfe
    for k in range(nfe):
        t = res.times[k].expand(len(x0))
        d = (z1 - z0) - v(res.trajectory[k], t)
        total += dt * d.flatten(1).pow(2).sum(1).mean().item()
    return total


def evaluate(run, nfes=(1, 2, 4, 8, 16, 100), n: int = 4000, seed: int = 0, solver: str = "euler",
             adaptive: str | None = "dopri5", tol: float = 1e-5, repeats: int = 3, progress: bool = False) -> dict:
    """W2 against fresh data and its floor at each NFE, an adaptive solver's NFE and W2, and
    straightness.

    W2 between two ``n``-point clouds is noisy (in 2-D, mostly the counts per region), so
    each number is the mean over ``repeats`` fresh reference draws: the floor averages
    ``repeats`` pairs of independent data draws, and each model W2 compares one ``n``-sample
    set against each of the ``repeats`` references. ``ratio`` = W2 / floor.
    """
    from tqdm.auto import tqdm

    g = torch.Generator(device=run.device)
    g.manual_seed(seed + 1)
    refs = [run.dataset.reference(n, g).cpu() for _ in range(repeats)]
    floors = [w2(a, run.dataset.reference(n, g).cpu()) for a in refs]
    floor = sum(floors) / repeats

    def measure(x):
        ds = [w2(x, ref) for ref in refs]
        d = sum(ds) / repeats
        return {"w2": d, "floor": floor, "ratio": d / floor}

    result = {"n": n, "solver": solver, "repeats": repeats, "floor": floor, "floor_draws": floors, "nfe": {}}
    for k in tqdm(nfes, disable=not progress, desc="eval", unit="nfe"):
        result["nfe"][str(k)] = measure(run.sample(n, nfe=k, solver=solver, seed=seed))
    gen = torch.Generator(device=run.device).manual_seed(seed * 1_000_003)
    result["straightness"] = straightness(run.velocity, run.noise(min(n, 2000), gen), nfe=100)
    if adaptive:
        with torch.inference_mode():
            res = integrate(run.velocity, run.noise(n, torch.Generator(device=run.device).manual_seed(seed)),
                            adaptive, None, atol=tol, rtol=tol)
        result["adaptive"] = {"solver": adaptive, "tol": tol, "nfe": res.nfe,
                              **measure(run.dataset.decode(res.x).float().cpu())}
    return result


def format_table(result: dict) -> str:
    """A plain-text table of :func:`evaluate`'s result."""
    lines = [f"{'NFE':>6} {'W2':>8} {'W2/floor':>9}   ({result['solver']}, floor {result['floor']:.4f})"]
    for k, row in result["nfe"].items():
        lines.append(f"{k:>6} {row['w2']:8.4f} {row['ratio']:9.3f}")
    if "adaptive" in result:
        a = result["adaptive"]
        lines.append(f"{a['solver']} (tol {a['tol']:g}): NFE {a['nfe']}, W2 {a['w2']:.4f}, W2/floor {a['ratio']:.3f}")
    lines.append(f"straightness {result['straightness']:.4f}")
    return "\n".join(lines)


__all__ = ["w2", "straightness", "evaluate", "format_table"]
