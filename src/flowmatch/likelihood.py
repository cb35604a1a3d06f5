"""Likelihood by the instantaneous change of variables (Chen et al. 2018; Grathwohl et al. 2019).

For ``dx/dt = v(x, t)`` carrying noise ``N(0, I)`` at t = 0 to data at t = 1,
``d/dt log p_t(x_t) = -div v(x_t, t)``. Integrating the augmented state ``(x, l)`` with
``dl/dt = div v`` backwards from data (t = 1, ``l = 0``) to noise (t = 0) gives

    log p_1(x) = log N(x_0; 0, I) + l(0).

The divergence is exact for small dimension (a backward pass per dimension) or
Hutchinson's estimate ``eps^T (dv/dx) eps`` with one Rademacher ``eps`` per sample, kept
fixed along the path (unbiased; its noise shows in the reported standard error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchdiffeq import odeint

from .errors import SettingError
from .solvers import ADAPTIVE_METHODS, FIXED_METHODS, check_method, fixed_grid, odeint_adaptive

EXACT_MAX_DIM = 16


@dataclass
class LogProb:
    """``log_prob`` (B,) in nats; ``nfe``: velocity evaluations; ``divergence``: "exact" or "hutchinson"."""

    log_prob: torch.Tensor
    nfe: int
    divergence: str


def _divergence_exact(v, x):
    flat_v, flat_x = v.flatten(1), x
    div = torch.zeros(len(x), device=x.device, dtype=x.dtype)
    for i in range(flat_v.shape[1]):
        g = torch.autograd.grad(flat_v[:, i].sum(), flat_x, retain_graph=True)[0]
        div = div + g.flatten(1)[:, i]
    return div


def log_prob(velocity, x: torch.Tensor, method: str = "dopri5", nfe: int | None = None, tol: float = 1e-5,
             divergence: str = "auto", generator: torch.Generator | None = None, t_data: float = 1.0) -> LogProb:
    """Log-density of ``x`` (B, ...) under the flow of ``velocity(x, t)`` (noise at t = 0), from
    ``t_data`` back to 0 with ``method`` (adaptive: atol = rtol = ``tol``; fixed: ``nfe``).

    ``divergence``: ``"exact"``, ``"hutchinson"`` or ``"auto"`` (exact up to 16 dimensions); the
    Hutchinson probes come from ``generator`` (None: torch's global generator).
    """
    check_method(method, nfe if method in FIXED_METHODS else None)
    dim = x[0].numel()
    if divergence == "auto":
        divergence = "exact" if dim <= EXACT_MAX_DIM else "hutchinson"
    if divergence not in ("exact", "hutchinson"):
        raise SettingError("divergence", f"expected auto, exact or hutchinson, got {divergence!r}")
    eps = None
    if divergence == "hutchinson":
        eps = torch.randint(0, 2, x.shape, generator=generator, device=x.device, dtype=torch.int64).to(x.dtype) * 2 - 1
    count = [0]

    def f(t, state):
        x_t, _ = state
        count[0] += 1
        with torch.enable_grad():
            x_t = x_t.detach().requires_grad_(True)
            v = velocity(x_t, t.expand(len(x_t)).to(x_t.dtype))
            if eps is None:
                div = _divergence_exact(v, x_t)
            else:
                vjp = torch.autograd.grad(v, x_t, eps)[0]
                div = (vjp * eps).flatten(1).sum(1)
        return v.detach(), div.detach()

    state = (x, torch.zeros(len(x), device=x.device, dtype=x.dtype))
    if method in ADAPTIVE_METHODS:
        times = torch.tensor([t_data, 0.0], device=x.device, dtype=x.dtype)
        xs, ls = odeint_adaptive(f, state, times, method, tol, tol, x.dtype)
    else:
        grid = fixed_grid(method, nfe, t_data, 0.0, device=x.device, dtype=x.dtype)
        xs, ls = odeint(f, state, grid[[0, -1]], method=FIXED_METHODS[method][0],
                        options={"grid_constructor": lambda *_: grid})
    x0, l0 = xs[-1], ls[-1]
    log_p0 = -0.5 * x0.flatten(1).pow(2).sum(1) - 0.5 * dim * math.log(2 * math.pi)
    return LogProb(log_p0 + l0, count[0], divergence)


def run_log_prob(run, x: torch.Tensor, tol: float = 1e-5, divergence: str = "auto", seed: int = 0,
                 batch_size: int = 1000, progress: bool = False) -> torch.Tensor:
    """Log-density (nats) of data ``x`` (in data units) under a run's flow, per sample (CPU):
    batch ``k``'s Hutchinson probes from the likelihood stream of ``(seed, k)``; the change of
    units from the data's to the model's standardised ones is accounted for."""
    from tqdm.auto import tqdm

    from .seeding import generator

    out = []
    for k, i in enumerate(tqdm(range(0, len(x), batch_size), disable=not progress, desc="nll", unit="batch")):
        xb = run.dataset.encode(x[i:i + batch_size].to(run.device))
        lp = log_prob(run.velocity, xb, tol=tol, divergence=divergence, generator=generator(seed, "likelihood", k, device=run.device))
        out.append(lp.log_prob.cpu() - log_scale(run.dataset, run.shape))
    return torch.cat(out)


def log_scale(dataset, shape) -> float:
    """``sum(log std)`` of the data normalisation over one sample: log-density in data units is
    the model-space log-density minus this."""
    std = dataset.std.float()
    return float(std.log().sum()) if std.numel() > 1 else math.prod(shape) * float(std.log())


def nll_summary(lp: torch.Tensor, dim: int, images: bool = False) -> dict:
    """Mean NLL (nats per sample) of log-densities ``lp`` with its standard error; bits per
    dimension for images."""
    nll = -lp
    mean, se = nll.mean().item(), (nll.std() / math.sqrt(len(nll))).item() if len(nll) > 1 else float("nan")
    out = {"nll": mean, "se": se, "n": len(nll), "dim": dim}
    if images:
        out["bits_per_dim"] = mean / (dim * math.log(2))
        out["bits_per_dim_se"] = se / (dim * math.log(2))
    return out
