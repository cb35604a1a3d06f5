"""Integrate ``dx/dt = v(x, t)`` from noise (t = 0) to data (t = 1) with torchdiffeq, or its
stochastic twin with torchsde (:func:`integrate_sde`: the same marginals, noise along the way).

One function, :func:`integrate`, over every deterministic method. Fixed-grid methods take a budget of
velocity evaluations (NFE) and step on the grid ``t_k = k / K`` with ``K = NFE / evals per
step``; adaptive methods take tolerances and report the NFE they used. NFE is counted as
calls of the velocity field, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchdiffeq import odeint

from .errors import SettingError
from .paths import expand
from .timesteps import shift_times

#: name -> (torchdiffeq method, velocity evaluations per step, order)
FIXED_METHODS = {"euler": ("euler", 1, 1), "midpoint": ("midpoint", 2, 2), "heun": ("heun2", 2, 2), "rk4": ("rk4", 4, 4)}
#: name -> torchdiffeq method
ADAPTIVE_METHODS = {"dopri5": "dopri5", "dopri8": "dopri8", "bosh3": "bosh3"}
#: stochastic samplers (:func:`integrate_sde`): name -> velocity evaluations per step
SDE_METHODS = {"euler-maruyama": 1}
METHODS = [*FIXED_METHODS, *ADAPTIVE_METHODS, *SDE_METHODS]

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SolveResult:
    """``x``: the state at t = 1 (or ``t_end``); ``nfe``: velocity evaluations used;
    ``times`` (T,) and ``trajectory`` (T, *x.shape) when a trajectory was asked for."""

    x: torch.Tensor
    nfe: int
    times: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None


def check_method(method: str, nfe: int | None = None) -> None:
    """Validate a solver choice; raises :class:`~flowmatch.errors.SettingError` naming the argument."""
    if method not in METHODS:
        raise SettingError("solver", f"unknown solver {method!r}; expected one of {', '.join(METHODS)}")
    if method not in ADAPTIVE_METHODS and nfe is not None:
        per = _evals_per_step(method)
        if not isinstance(nfe, int) or nfe < 1:
            raise SettingError("nfe", f"expected a positive integer, got {nfe}")
        if nfe % per:
            raise SettingError("nfe", f"{method} uses {per} evaluations per step, so NFE must be a multiple of {per}; got {nfe}")


def check_tolerance(tol: float, option: str = "tol", dtype: torch.dtype | None = None) -> None:
    """An adaptive solver's tolerance must be a positive finite number (torchdiffeq asserts
    otherwise) and, for a state of ``dtype``, one its arithmetic resolves (float32: about 1e-6;
    below it a step's error estimate is rounding, and the solve crawls on for hours)."""
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise SettingError(option, f"expected a positive finite tolerance such as 1e-5, got {tol!r}")
    floor = 8 * torch.finfo(dtype).eps if dtype is not None else 0.0  # float32: 9.5e-7
    if tol < floor:
        raise SettingError(option, f"{tol:g} is below what {str(dtype).replace('torch.', '')} arithmetic resolves; "
                           f"expected a tolerance of at least {floor:.1g}")


def fixed_grid(method: str, nfe: int, t_start: float = 0.0, t_end: float = 1.0, time_shift: float = 1.0,
               device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The grid ``t_k = t_start + (t_end - t_start) k / K`` (K steps) for a fixed method at ``nfe``."""
    check_method(method, nfe)
    steps = nfe // _evals_per_step(method)
    grid = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64)
    if time_shift != 1.0:
        grid = shift_times(grid, time_shift)
    return (t_start + (t_end - t_start) * grid).to(dtype)


def _evals_per_step(method: str) -> int:
    return FIXED_METHODS[method][1] if method in FIXED_METHODS else SDE_METHODS[method]


def integrate(
    v: Velocity,
    x0: torch.Tensor,
    method: str = "euler",
    nfe: int | None = 100,
    *,
    tol: float = 1e-5,
    span: tuple[float, float] = (0.0, 1.0),
    trajectory: int | bool = False,
    time_shift: float = 1.0,
) -> SolveResult:
    """Solve ``dx/dt = v(x, t)`` from ``x(t_start) = x0`` to ``t_end``, ``span = (t_start, t_end)``.

    ``v`` is called as ``v(x, t)`` with ``t`` of shape (B,). For fixed methods ``nfe`` is the
    total number of velocity evaluations; for adaptive ones (``dopri5``…) it is ignored and
    ``tol`` rules (the absolute and the relative tolerance). ``trajectory``: ``True`` keeps every grid point of a fixed
    method; an integer ``T`` keeps ``T`` evenly spaced times (adaptive methods). Integrating
    backwards (``span=(1.0, 0.0)``) is allowed.
    """
    check_method(method, nfe if method in FIXED_METHODS else None)
    t_start, t_end = map(float, span)
    if method in SDE_METHODS:
        raise ValueError(f"{method} is stochastic: use integrate_sde")
    count = [0]

    def f(t, x):
        count[0] += 1
        return v(x, t.expand(x.shape[0]).to(x.dtype))

    if method in FIXED_METHODS:
        grid = fixed_grid(method, nfe, t_start, t_end, time_shift, device=x0.device, dtype=x0.dtype)
        tdq = FIXED_METHODS[method][0]
        if trajectory:
            ys = odeint(f, x0, grid, method=tdq)
            return SolveResult(ys[-1], count[0], grid, ys)
        ends = grid[[0, -1]]
        ys = odeint(f, x0, ends, method=tdq, options={"grid_constructor": lambda *_: grid})
        return SolveResult(ys[-1], count[0])

    n_out = 2 if trajectory is False else (int(trajectory) if not isinstance(trajectory, bool) else 101)
    times = torch.linspace(t_start, t_end, max(n_out, 2), device=x0.device, dtype=x0.dtype)
    # Land a step on t_end: torchdiffeq otherwise steps past it and reads the answer off its dense
    # output, whose interpolant is of lower order than dopri8 and bosh3 (errors 100x the tolerance).
    ys = odeint_adaptive(f, x0, times, method, tol, tol, x0.dtype, step_t=times[-1:])
    if trajectory is False:
        return SolveResult(ys[-1], count[0])
    return SolveResult(ys[-1], count[0], times, ys)


def integrate_sde(v: Velocity, x0: torch.Tensor, path, nfe: int = 100, noise: float = 1.0,
                  generator: torch.Generator | None = None, time_shift: float = 1.0) -> SolveResult:
    """Euler–Maruyama (torchsde) on ``dx = [v + (w/2) score] dt + sqrt(w) dW`` from t = 0 to 1:
    for any ``w(t) >= 0`` its marginals are the ODE's (Fokker–Planck), so it samples the same
    distribution with noise injected along the way. ``w(t) = noise * sigma(t)`` (SiT's choice,
    Ma et al. 2024, scaled), which vanishes at the data end where the score does not stay finite;
    ``noise = 0`` is Euler on the ODE. The Brownian path is torchsde's, seeded by one draw from
    ``generator`` (None: torch's global generator)."""
    import torchsde

    grid = fixed_grid("euler-maruyama", nfe, time_shift=time_shift, device=x0.device, dtype=x0.dtype)
    shape, count = x0.shape, [0]

    class SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        last = (None, None, None)  # torchsde checks each call's shapes with an extra drift at its start

        def f(self, t, y):
            if self.last[0] is y and self.last[1] == float(t):
                return self.last[2]
            count[0] += 1
            x, tt = y.view(shape), t.expand(shape[0]).to(y.dtype)
            vel = v(x, tt)
            out = (vel - 0.5 * noise * path.velocity_to_x0(vel, x, tt)).reshape(y.shape)  # sigma * score = -E[x0 | x]
            self.last = (y, float(t), out)
            return out

        def g(self, t, y):
            sigma = path.schedule(t.reshape(1).to(y.dtype))[1]
            return (noise * sigma).clamp_min(0).sqrt().expand_as(y)

    y0 = x0.reshape(shape[0], -1)
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(2**62, (1,), generator=generator, device=device).item())
    bm = torchsde.BrownianInterval(t0=grid[0], t1=grid[-1], size=y0.shape, dtype=y0.dtype, device=y0.device,
                                   entropy=seed, levy_area_approximation="none", dt=1.0 / max(len(grid) - 1, 1))
    # one call per step of the grid (torchsde's fixed step would run to the end and interpolate)
    sde, y = SDE(), y0
    for t0, t1 in zip(grid[:-1], grid[1:]):
        y = torchsde.sdeint(sde, y, torch.stack([t0, t1]), method="euler", dt=float(t1 - t0), bm=bm,
                            names={"drift": "f", "diffusion": "g"})[-1]
    return SolveResult(y.view(shape), count[0])


#: an adaptive solve that needs more steps than this between two output times gives up
MAX_ADAPTIVE_STEPS = 100_000


def odeint_adaptive(f, y0, times, method: str, atol: float, rtol: float, dtype, **options):
    """torchdiffeq's adaptive ``odeint`` with tolerances checked first (against ``dtype``'s
    resolution too) and a bounded number of steps; what cannot be met is a :class:`UserError`."""
    check_tolerance(min(atol, rtol), "tol", dtype)
    check_tolerance(max(atol, rtol), "tol")
    try:
        return odeint(f, y0, times, method=ADAPTIVE_METHODS[method], atol=atol, rtol=rtol,
                      options={"max_num_steps": MAX_ADAPTIVE_STEPS, **options})
    except AssertionError as e:  # torchdiffeq's "max_num_steps exceeded" and "underflow in dt"
        if "max_num_steps" not in str(e) and "underflow" not in str(e):
            raise
        raise SettingError("tol", f"{method} could not meet tolerance {min(atol, rtol):g} ({e}); "
                                  "expected a larger tolerance such as 1e-5") from None


def flow_map(u, x0: torch.Tensor, steps: int = 1, time_shift: float = 1.0, interval: bool = True,
             trajectory: bool = False) -> SolveResult:
    """Few-step sampling of a flow map, the sampler of MeanFlow, shortcut and distilled networks
    beside :func:`integrate`: ``steps`` jumps ``z <- z + h u(z, t, h)`` on the grid ``t_k = k / steps``
    (shifted by ``time_shift``), where ``u(z, t, h=h)`` is the average velocity over ``[t, t + h]``
    (one step: ``z1 = z0 + u(z0, 0, 1)``). ``interval=False``: ``u(z, t)`` takes no interval (a
    distilled k-step map, trained at its grid's times). ``nfe`` is ``steps``; ``trajectory``: keep
    every grid point."""
    if not (isinstance(steps, int) and steps >= 1):
        raise SettingError("steps", f"expected a positive integer, got {steps!r}")
    grid = fixed_grid("euler", steps, time_shift=time_shift, device=x0.device, dtype=torch.float64)
    path = [x0]
    for t0, t1 in zip(grid[:-1], grid[1:]):
        z = path[-1]
        t = t0.to(x0.dtype).expand(len(x0))
        h = (t1 - t0).to(x0.dtype).expand(len(x0))
        path.append(z + expand(h, z) * (u(z, t, h=h) if interval else u(z, t)))
        if not trajectory:
            path = path[-1:]
    if trajectory:
        return SolveResult(path[-1], steps, grid.to(x0.dtype), torch.stack(path))
    return SolveResult(path[-1], steps)


def guided(v_cond: Callable, label: torch.Tensor, weight: float) -> Velocity:
    """Classifier-free guidance: ``v = v(x, t, null) + w (v(x, t, label) - v(x, t, null))``.

    ``v_cond(x, t, label, **kw)`` takes ``label=None`` for the null class; ``w = 1`` is plain
    conditional sampling, ``w = 0`` unconditional. ``label``: class indices, or condition
    vectors (B, cond_dim) whose null is a NaN row. Keyword tensors (a few-step network's interval
    ``h``) pass through, doubled with the batch.
    """
    from .models.cond import null_condition

    if weight == 1.0:
        return lambda x, t, **kw: v_cond(x, t, label, **kw)

    def v(x, t, **kw):
        both = v_cond(torch.cat([x, x]), torch.cat([t, t]), torch.cat([label, null_condition(label)]),
                      **{k: torch.cat([a, a]) for k, a in kw.items()})
        cond, uncond = both.chunk(2)
        return uncond + weight * (cond - uncond)

    return v
