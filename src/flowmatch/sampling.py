"""Sampling a trained run: noise in, samples in the data's own units out.

:class:`SampleOptions` says how (solver and its budget, guidance, conditions); :func:`sample`
draws ``n`` samples in batches of bounded memory, :func:`sample_batches` yields them batch by
batch, :func:`flow` carries given noise. Batch ``k``'s noise is the sampling noise of ``(seed,
k)`` (:func:`flowmatch.seeding.noise`), so a result depends only on the seed and the batch size,
not on the device's memory or the number of processes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from . import seeding
from .errors import SettingError
from .seeding import noise


@dataclass
class SampleOptions:
    """How to sample a run.

    ``nfe``: velocity evaluations of a fixed-step solver (None: the run's own, 100, or k for a
    distilled k-step map, 1 for MeanFlow and shortcut runs, which step by their average velocity);
    ``solver``: euler, midpoint, heun, rk4, dopri5 (``tol``: its atol = rtol) or euler-maruyama
    (stochastic, the same marginals; ``noise``: its diffusion ``w(t) = noise * sigma(t)``);
    ``time_shift``: the fixed grid ``t / (s - (s - 1) t)`` (``s < 1``: more steps near the data);
    ``label`` (a class) or ``cond`` (condition vectors in data units, one or one per sample) with
    classifier-free ``guidance``; ``batch_size``: samples integrated at once."""

    nfe: int | None = None
    solver: str = "euler"
    tol: float = 1e-5
    time_shift: float = 1.0
    noise: float = 1.0
    label: int | None = None
    cond: Any = None
    guidance: float = 1.0
    batch_size: int = 65536


def check(run, options: SampleOptions, n: int | None = None) -> None:
    """Refuse options this run cannot sample with, before anything is drawn: the solver and its
    budget, a label within the run's classes, a condition of its shape, guidance with one of them."""
    from .solvers import ADAPTIVE_METHODS, SDE_METHODS, check_method, check_tolerance
    from .timesteps import shift_times

    check_method(options.solver, None if options.solver in ADAPTIVE_METHODS else options.nfe)
    check_tolerance(options.tol, "tol", torch.float32)
    shift_times(torch.zeros(1), options.time_shift)  # a positive shift
    if options.solver in SDE_METHODS and not options.noise >= 0:
        raise SettingError("noise", f"expected a value >= 0, got {options.noise}")
    if options.batch_size < 1:
        raise SettingError("batch_size", f"expected a positive integer, got {options.batch_size}")
    guidance = options.guidance
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance)):
        raise SettingError("guidance", f"expected a finite weight, got {guidance!r}")
    if options.cond is not None:
        _check_cond(run, options.cond, n)
    if options.label is None and options.cond is None:
        if guidance != 1.0:
            what, name = ("a condition", "cond") if run.cond_dim else ("a class", "label")
            raise SettingError("guidance", f"weighs {what} against the unconditional field, so it needs `{name}`; "
                                           f"got {guidance:g} without it")
        return
    if options.label is None:
        return
    if run.num_classes == 0:
        what = "takes a condition vector (cond), not a label" if run.cond_dim else "is an unconditional run; it takes no label"
        raise SettingError("label", f"{run.dir} {what}")
    if not 0 <= options.label < run.num_classes:
        raise SettingError("label", f"expected a class in 0..{run.num_classes - 1}, got {options.label}")


def _check_cond(run, cond, n: int | None) -> None:
    if run.cond_dim == 0:
        raise SettingError("cond", f"{run.dir} was not trained with condition vectors; it takes none")
    c = torch.as_tensor(cond)
    shapes = f"({run.cond_dim},)" + (f" or ({n}, {run.cond_dim})" if n is not None else "")
    if not (c.shape == (run.cond_dim,) or (c.dim() == 2 and c.shape[1] == run.cond_dim and (n is None or len(c) == n))):
        raise SettingError("cond", f"expected a condition of shape {shapes} (one for all samples, or one per sample), "
                                   f"got {tuple(c.shape)}")
    if not torch.isfinite(c.double()).all():
        raise SettingError("cond", "expected finite numbers")


@torch.inference_mode()
def flow(run, x0: torch.Tensor, options: SampleOptions | None = None, trajectory: bool = False,
         generator: torch.Generator | None = None):
    """Carry noise ``x0`` (model space, on the run's device) from t = 0 to 1 and decode: a
    :class:`~flowmatch.solvers.SolveResult` whose ``x`` (and ``trajectory``, (T, *x0.shape)) are in
    data units, on the run's device. A MeanFlow or shortcut run steps by its average velocity
    over each step (:func:`~flowmatch.solvers.flow_map`; with the euler solver); the stochastic
    solver ignores ``trajectory`` and draws its Brownian path from ``generator``."""
    from .solvers import SDE_METHODS, flow_map, integrate, integrate_sde

    o = options or SampleOptions()
    nfe = o.nfe if o.nfe is not None else run.default_nfe
    label = None if o.label is None else torch.full((len(x0),), o.label, device=run.device, dtype=torch.long)
    if o.cond is not None:
        c = run.dataset.encode_cond(torch.as_tensor(o.cond, dtype=torch.float32).to(run.device))
        label = c.expand(len(x0), -1) if c.dim() == 1 else c
    v = run.field(label, o.guidance)
    if run.interval and o.solver == "euler":  # a few-step network: its own sampler
        res = flow_map(v, x0, nfe, time_shift=o.time_shift, trajectory=trajectory)
        decoded = None if res.trajectory is None else run.dataset.decode(res.trajectory)
        return dataclasses.replace(res, x=run.dataset.decode(res.x), trajectory=decoded)
    if o.solver in SDE_METHODS:
        res = integrate_sde(v, x0, run.path, nfe, noise=o.noise, generator=generator, time_shift=o.time_shift)
        return dataclasses.replace(res, x=run.dataset.decode(res.x))
    res = integrate(v, x0, o.solver, nfe, tol=o.tol, trajectory=trajectory, time_shift=o.time_shift)
    decoded = None if res.trajectory is None else run.dataset.decode(res.trajectory)
    return dataclasses.replace(res, x=run.dataset.decode(res.x), trajectory=decoded)


@torch.inference_mode()
def sample_batches(run, n: int, options: SampleOptions | None = None, seed: int = 0, progress: bool = False,
                   part: tuple[int, int] | None = None):
    """:func:`sample` one batch at a time: yields ``(start, x)`` with ``x`` the samples ``start ..
    start + len(x)`` (CPU float32, data units), so a caller can stream them to disk. ``part=(i,
    p)`` draws only the batches ``k = i, i + p, ...`` (process ``i`` of ``p``)."""
    from tqdm.auto import tqdm

    o = options or SampleOptions()
    check(run, o, n)
    cond = None if o.cond is None else torch.as_tensor(o.cond, dtype=torch.float32)
    starts = list(enumerate(range(0, n, o.batch_size)))
    if part is not None:
        starts = starts[part[0]::part[1]]
    for k, i in tqdm(starts, disable=not progress, desc="sample", unit="batch"):
        x0 = noise(seed, k, min(o.batch_size, n - i), run.shape, run.device)
        c = None if cond is None else (cond if cond.dim() == 1 else cond[i:i + len(x0)])
        batch = dataclasses.replace(o, cond=c)
        yield i, flow(run, x0, batch, generator=seeding.generator(seed, "sde", k)).x.float().cpu()


def sample(run, n: int, options: SampleOptions | None = None, seed: int = 0, progress: bool = False,
           part: tuple[int, int] | None = None) -> torch.Tensor:
    """``n`` samples in data units (CPU float32), drawn in batches of bounded memory; their
    concatenation in batch order is the same for any ``part`` split."""
    out = [x for _, x in sample_batches(run, n, options, seed, progress, part)]
    return torch.cat(out) if out else torch.empty(0, *run.shape)


def sample_distributed(run, n: int, options: SampleOptions | None = None, seed: int = 0,
                       progress: bool = False) -> torch.Tensor | None:
    """:func:`sample` under ``torch.distributed`` (torchrun): every process draws its share of the
    batches, process 0 gathers them in order and returns all ``n`` samples; the others return None."""
    import torch.distributed as dist

    o = options or SampleOptions()
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = sample(run, n, o, seed, progress and rank == 0, part=(rank, world))
    sizes = [min(o.batch_size, n - i) for i in range(0, n, o.batch_size)][rank::world]
    parts = [None] * world if rank == 0 else None
    dist.gather_object(list(mine.split(sizes)) if sizes else [], parts, dst=0)
    if rank != 0:
        return None
    batches = [None] * len(range(0, n, o.batch_size))
    for p, chunks in enumerate(parts):
        batches[p::world] = chunks
    return torch.cat(batches)


__all__ = ["SampleOptions", "check", "flow", "sample", "sample_batches", "sample_distributed"]
