"""Quality measures.

- :func:`w2`: exact 2-Wasserstein distance between two equal-weight point clouds (POT
  ``ot.emd2`` on the squared Euclidean cost, then the square root).
- :func:`straightness`: ``S = ∫ E ||(Z1 - Z0) - v(Z_t, t)||^2 dt`` along the model's own
  trajectories (Liu et al. 2022, "Flow Straight and Fast"); 0 means one Euler step is exact.
- :func:`sharpness`: measures that see blur, which W2 on a few thousand points does not:
  the share of samples off the data's support and their mean true log-density (2-D toys,
  whose density is known); precision, recall, density and coverage of k-nearest-neighbour
  manifolds (Kynkäänniemi et al. 2019; Naeem et al. 2020, through their ``prdc`` package);
  and a classifier two-sample test (Lopez-Paz & Oquab 2017) with scikit-learn's k-NN.
- :func:`evaluate`: W2 against fresh data and its floor at several NFEs, the sharpness
  measures beside the same measures of fresh data, and an adaptive solver's NFE — the
  numbers ``flowmatch eval`` prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import seeding
from .solvers import integrate


def w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact W2 between the empirical measures of ``a`` (N, ...) and ``b`` (M, ...)."""
    import ot  # imported when first used: 3 s that training without OT pairs does not pay

    a = a.reshape(len(a), -1).double().cpu().numpy()
    b = b.reshape(len(b), -1).double().cpu().numpy()
    cost = ot.dist(a, b)
    value, log = ot.emd2(ot.unif(len(a)), ot.unif(len(b)), cost, numItermax=50_000_000, log=True)
    if log.get("warning"):
        raise RuntimeError(f"exact OT did not converge: {log['warning']}")
    return math.sqrt(max(float(value), 0.0))


_FLOORS: dict[str, float] = {}  # w2 of two data draws, by their bytes: a floor is the same for every run of a data set


def data_w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """:func:`w2` between two draws of data, remembered by their contents: evaluating several runs
    (or solvers) of one data set at the same ``n`` and seed draws the same references, and the
    exact OT between them (seconds at a few thousand points) is solved once per process."""
    h = hashlib.sha256()
    for x in (a, b):
        x = x.detach().cpu().contiguous()
        h.update(f"{x.dtype}{tuple(x.shape)}".encode())
        h.update(x.numpy().tobytes())
    key = h.hexdigest()
    if key not in _FLOORS:
        if len(_FLOORS) >= 256:
            _FLOORS.pop(next(iter(_FLOORS)))
        _FLOORS[key] = w2(a, b)
    return _FLOORS[key]


def off_support(name: str, x: torch.Tensor) -> float:
    """Share of samples ``x`` (data units) off toy ``name``'s support (checkerboard: outside its
    8 cells; blurred curves: beyond 3 sigma of the curve)."""
    from .data.toy2d import on_support

    return 1.0 - on_support(name, x).double().mean().item()


def mean_log_density(name: str, x: torch.Tensor) -> float:
    """Mean true log-density (nats) of samples ``x``; ``-inf`` when any sample lies where the
    density is 0 (off the checkerboard)."""
    from .data.toy2d import log_density

    return log_density(name, x).mean().item()


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020) of
    ``fake`` against ``real`` (N, ...) in k-nearest-neighbour balls; the authors' ``prdc``.

    Precision: share of fakes inside some real point's k-NN ball (1 - precision is the share
    of samples where the data is not); recall: share of reals inside some fake's ball."""
    from prdc import compute_prdc

    real = real.reshape(len(real), -1).double().cpu().numpy()
    fake = fake.reshape(len(fake), -1).double().cpu().numpy()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes
        out = compute_prdc(real, fake, nearest_k=k)
    return {key: float(v) for key, v in out.items()}


def c2st(real: torch.Tensor, fake: torch.Tensor, k: int = 5, folds: int = 5, seed: int = 0) -> float:
    """Classifier two-sample test: the 5-fold cross-validated accuracy of a k-nearest-neighbour
    classifier (scikit-learn) telling ``real`` from ``fake`` after standardising with the real
    data's mean and std. 0.5: indistinguishable; 1: fully separable. At a few thousand points
    it sees gross differences (a shifted or strongly blurred set), less so a thin blur at
    sharp edges, where :func:`off_support` and precision are the sharper measures."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    real = real.reshape(len(real), -1).double().cpu().numpy()
    fake = fake.reshape(len(fake), -1).double().cpu().numpy()
    mean, std = real.mean(0), real.std(0) + 1e-12
    x = np.concatenate([(real - mean) / std, (fake - mean) / std])
    y = np.concatenate([np.zeros(len(real)), np.ones(len(fake))])
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(KNeighborsClassifier(n_neighbors=k), x, y, cv=cv).mean())


def sharpness(x: torch.Tensor, ref: torch.Tensor, toy: str | None = None) -> dict:
    """The blur-sensitive measures of samples ``x`` against real data ``ref`` (both in data
    units): ``off_support`` and ``log_density`` when ``toy`` names a 2-D toy, then
    ``precision``, ``recall``, ``density``, ``coverage`` and ``c2st``."""
    out = {}
    if toy is not None:
        out["off_support"] = off_support(toy, x)
        out["log_density"] = mean_log_density(toy, x)
    return out | prdc(ref, x) | {"c2st": c2st(ref, x)}


def memorisation(x: torch.Tensor, train: torch.Tensor, held: torch.Tensor) -> dict:
    """How much closer samples ``x`` sit to the training rows than to rows the model never saw.

    ``train`` and ``held`` are equally many distinct rows of the two splits (N, ...), all in the
    same units; each coordinate of vectors (N, D) is scaled by the held-out rows' standard deviation
    (images are compared pixel by pixel as they are). For each sample,
    its nearest row among both sets: ``train_nearer`` is the share of samples whose nearest row is
    a training row (0.5 for a model that generalises, whose samples are as near to unseen data as
    to its own; 1 for one that copies its training rows); ``distance_ratio`` is the median distance
    to the nearest training row over the median distance to the nearest held-out row (1: none;
    0: copies). Far from the data the share is decided by the one row of either set nearest to the
    samples, so read it beside the ratio. The distance-to-closest-record test of synthetic-data
    privacy (e.g. Yale et al. 2020)."""
    if len(train) != len(held):
        raise ValueError(f"train and held need as many rows, got {len(train)} and {len(held)}")
    vectors = held.dim() == 2
    flat = lambda v: v.reshape(len(v), -1).double().cpu()  # noqa: E731
    x, train, held = flat(x), flat(train), flat(held)
    scale = held.std(0).clamp_min(1e-12) if vectors and len(held) > 1 else torch.ones(held.shape[1], dtype=torch.float64)
    d_train = _nearest(x / scale, train / scale)
    d_held = _nearest(x / scale, held / scale)
    return {"train_nearer": float((d_train < d_held).double().mean() + 0.5 * (d_train == d_held).double().mean()),
            "distance_ratio": float(d_train.median() / d_held.median().clamp_min(1e-300)), "rows": len(train)}


def _nearest(x: torch.Tensor, rows: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Each row of ``x``'s distance to its nearest row of ``rows`` (chunked: bounded memory)."""
    return torch.cat([torch.cdist(x[i:i + chunk], rows).amin(1) for i in range(0, len(x), chunk)])


def run_memorisation(run, x: torch.Tensor, n: int, seed: int = 0) -> dict | None:
    """:func:`memorisation` of samples ``x`` (data units) against up to ``n`` training and as many
    held-out rows of the run's data (None for data without held-out rows)."""
    if not run.dataset.held_out:
        return None
    g = torch.Generator().manual_seed(seed)
    held = run.dataset.distinct_rows("held-out", n, g)
    train = run.dataset.distinct_rows("train", len(held), g)
    m = min(len(train), len(held))
    return memorisation(x, train[:m], held[:m])


def finite_rows(dataset, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A table's reference for :func:`evaluate`: up to ``n`` different held-out rows and as many
    different training rows (what a model that returned its training rows would score: the floor),
    in the data's units; None for data drawn fresh. Drawing a few held-out rows with replacement
    would repeat them, and repeated rows have k-NN balls of radius 0 (precision 0) and are told
    from samples by position alone (C2ST 1)."""
    if toy_name(dataset) is not None or not hasattr(dataset, "held"):
        return None
    g = seeding.generator(seed, "reference", 0)
    held = dataset.distinct_rows("held-out", n, g)
    train = dataset.distinct_rows("train", len(held), g)
    m = min(len(held), len(train))
    return held[:m], train[:m]


def toy_name(dataset) -> str | None:
    """The 2-D toy a dataset draws from (whose density is known), else None."""
    from .data.toy2d import TOY2D

    name = getattr(dataset, "name", None)
    return name if name in TOY2D else None


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


@dataclass
class EvalOptions:
    """How :func:`evaluate` measures: the fixed-step ``solver`` of the NFE sweep (with its
    ``time_shift``, and the stochastic solver's ``noise``), an ``adaptive`` solver's row at ``tol``
    (None: none), W2 over ``repeats`` reference draws, the blur-sensitive measures (``sharp``) and
    straightness (``straight``: 200 network evaluations on 2000 noises)."""

    solver: str = "euler"
    time_shift: float = 1.0
    noise: float | None = None
    adaptive: str | None = "dopri5"
    tol: float = 1e-5
    repeats: int = 3
    sharp: bool = True
    straight: bool = True


def evaluate(run, nfes=(1, 2, 4, 8, 16, 100), n: int = 4000, seed: int = 0, progress: bool = False,
             options: EvalOptions | None = None, **settings) -> dict:
    """W2 against fresh data and its floor at each NFE, the :func:`sharpness` measures, an
    adaptive solver's NFE and measures, and straightness (:class:`EvalOptions`, or its fields as
    keywords).

    A distilled run (``flowmatch distill``) gets neither the adaptive row nor straightness: its
    network is a k-step map trained at its own grid's times only, not a velocity field, so
    integrating it to a tolerance or along 100 steps measures nothing (``result["map_steps"]``
    says so, and the table prints it). Its NFE sweep stays: it shows what more steps do.

    W2 between two ``n``-point clouds is noisy (in 2-D, mostly the counts per region), so
    each number is the mean over ``repeats`` fresh reference draws: the floor averages
    ``repeats`` pairs of independent data draws, and each model W2 compares one ``n``-sample
    set against each of the ``repeats`` references. ``ratio`` = W2 / floor. A table is measured
    against its different held-out rows instead (at most ``n``, as many samples; :func:`finite_rows`),
    with as many training rows for the floor. The sharpness
    measures compare against the first reference; ``result["data"]`` holds the same measures
    for a fresh draw of the data itself (what a perfect model would score). Tables and images
    with held-out rows also get :func:`memorisation` (``train_nearer``, ``distance_ratio``).
    """
    from tqdm.auto import tqdm

    from .sampling import SampleOptions

    o = options or EvalOptions(**settings)
    rows = finite_rows(run.dataset, n, seed)
    if rows is None:  # data drawn fresh (the 2-D toys): fresh reference draws
        g = seeding.generator(seed, "reference", 0, device=run.device)
        refs = [run.dataset.reference(n, g).cpu() for _ in range(o.repeats)]
        fresh = [run.dataset.reference(n, g).cpu() for _ in refs]
    else:  # a table: its different held-out rows, once; the floor's partner is as many training rows
        (held, train), o = rows, dataclasses.replace(o, repeats=1)
        n, refs, fresh = len(held), [held], [train]
    floors = [data_w2(a, b) for a, b in zip(refs, fresh)]
    floor = sum(floors) / o.repeats
    toy = toy_name(run.dataset)

    def measure(x):
        d = sum(w2(x, ref) for ref in refs) / o.repeats
        mem = run_memorisation(run, x, n, seed)
        return ({"w2": d, "floor": floor, "ratio": d / floor} | (sharpness(x, refs[0], toy) if o.sharp else {})
                | ({} if mem is None else {"train_nearer": mem["train_nearer"], "distance_ratio": mem["distance_ratio"]}))

    result = {"n": n, "solver": o.solver, "time_shift": o.time_shift, "repeats": o.repeats, "floor": floor,
              "floor_draws": floors, "nfe": {}}
    adaptive, straight = (None, False) if run.distilled else (o.adaptive, o.straight)
    if run.distilled:
        result["map_steps"] = run.default_nfe
    if o.noise is not None:
        result["noise"] = o.noise
    if o.sharp:
        result["data"] = sharpness(fresh[0], refs[0], toy)
    for k in tqdm(nfes, disable=not progress, desc="eval", unit="nfe"):
        sample_options = SampleOptions(nfe=k, solver=o.solver, time_shift=o.time_shift,
                                       **({"noise": o.noise} if o.noise is not None else {}))
        result["nfe"][str(k)] = measure(run.sample(n, seed=seed, **vars(sample_options)))
    if straight:
        result["straightness"] = straightness(run.velocity, seeding.noise(seed, 0, min(n, 2000), run.shape, run.device), nfe=100)
    if adaptive:
        res = run.flow(seeding.noise(seed, 0, n, run.shape, run.device), None, adaptive, tol=o.tol)
        result["adaptive"] = {"solver": adaptive, "tol": o.tol, "nfe": res.nfe, **measure(res.x.float().cpu())}
    return result


SHARP_COLUMNS = (("off_support", "off%", 100.0), ("log_density", "log p", 1.0), ("precision", "prec", 1.0),
                 ("recall", "recall", 1.0), ("density", "dens", 1.0), ("coverage", "cover", 1.0), ("c2st", "c2st", 1.0),
                 ("train_nearer", "memo", 1.0))


def format_table(result: dict) -> str:
    """A plain-text table of :func:`evaluate`'s result: one row per NFE, the data's own row
    first (the sharpness measures of a fresh draw: what a perfect model scores; "memo", the share
    of samples nearer a training row than a held-out one, has no data row: 0.5 is ideal)."""
    ref = result.get("data", {})
    rows = [ref, *result["nfe"].values(), result.get("adaptive", {})]
    cols = [c for c in SHARP_COLUMNS if any(c[0] in row for row in rows)]

    def sharp(row):
        return "".join(f" {row[key] * scale:7.3f}" if key in row else f" {'':7}" for key, _, scale in cols)

    lines = [f"{'NFE':>8} {'W2':>8} {'W2/floor':>9}" + "".join(f" {name:>7}" for _, name, _ in cols)
             + f"   ({result['solver']}, floor {result['floor']:.4f})"]
    if ref:
        lines.append(f"{'data':>8} {'':>8} {'':>9}" + sharp(ref))
    for k, row in result["nfe"].items():
        lines.append(f"{k:>8} {row['w2']:8.4f} {row['ratio']:9.3f}" + sharp(row))
    if "adaptive" in result:
        a = result["adaptive"]
        lines.append(f"{a['solver']:>8} {a['w2']:8.4f} {a['ratio']:9.3f}" + sharp(a)
                     + f"   ({a['nfe']} NFE at tol {a['tol']:g})")
    if "straightness" in result:
        lines.append(f"straightness {result['straightness']:.4f}")
    if "map_steps" in result:
        k = result["map_steps"]
        lines.append(f"a distilled {k}-step map, not a velocity field: meant for NFE {k}; no adaptive solve, no straightness")
    return "\n".join(lines)


__all__ = ["EvalOptions", "w2", "memorisation", "off_support", "mean_log_density", "prdc", "c2st", "sharpness", "toy_name",
           "straightness", "evaluate", "format_table"]
