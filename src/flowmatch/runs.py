"""The run directory (a user-facing contract)::

    RUN/config.json          every setting that rebuilds model, path and data; format version
    RUN/model.safetensors    weights;  RUN/ema.safetensors  the EMA copy (used for sampling)
    RUN/trainer_state.pt     step, optimizer, RNG states and both weight sets, for exact resume
                             (loaded with torch.load(weights_only=True))
    RUN/metrics.jsonl        one JSON line per logging step (appended; a torn last line is skipped)
    RUN/*.png, RUN/*.gif     pictures

Every file but metrics.jsonl is written atomically (temporary file in the same folder, then
``os.replace``); metrics.jsonl is appended to, one line per logging step.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
from pathlib import Path

import torch

from .config import ONE_STEP
from .errors import UserError
from .files import (  # noqa: F401 - imported from here too
    atomic_path,
    load_state,
    load_weights,
    read_metrics,
    save_state,
    save_weights,
    write_json,
    write_text,
)
from .noise import batch_generator, batch_noise

FORMAT_VERSION = 1


def check_output(path, suffixes: tuple[str, ...], option: str = "--out", overwrite: bool = False) -> Path:
    """What every command checks of an output file before it computes anything: a supported
    extension, an existing writable folder, and not an existing file unless ``overwrite``
    (never an existing directory). The one overwrite rule of the command line."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{option}: {path} has an unsupported extension; expected one of {', '.join(suffixes)}")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{option}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option}: folder {parent} is not writable")
    if path.is_dir():
        raise UserError(f"{option}: {path} is a directory; expected a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{option}: {path} already exists; pass --overwrite to replace it")
    return path


def read_config(run_dir) -> dict:
    """Read and check ``RUN/config.json``: it must exist, parse, not be from a newer format,
    and hold valid settings (the same rules as the command line's), shape and classes. The one
    place a run's configuration is checked; every command that reads a run comes through here."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; {run_dir} is not a flowmatch run directory")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    version = cfg.get("format_version")
    if not isinstance(version, int):
        raise UserError(f"{path}: missing or invalid format_version")
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: format version {version} is newer than this flowmatch understands ({FORMAT_VERSION}); upgrade flowmatch")
    _check_doc(cfg, str(path))
    train = cfg["train"]
    if (train.get("time_scale") is None and train.get("objective") in ("meanflow", "shortcut")
            and train.get("model") != "mlp" and len(cfg["shape"]) == 3):
        # written before new runs recorded their time scale, when a UNet always saw t * 1000
        train["time_scale"] = 1000.0
    return cfg


def _check_doc(doc: dict, where: str) -> None:
    from .config import TrainConfig

    cfg = TrainConfig.from_dict(doc.get("train"), where=where).validate(where=where)
    for key, minimum in (("steps", 1), ("k", 0), ("pairs", 1)):  # a student's record of its teacher
        value = cfg.lineage.get(key, minimum)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            raise UserError(f"{where}: setting 'lineage.{key}' should be an integer >= {minimum}, got {value!r}")
    shape = doc.get("shape")
    if not (isinstance(shape, list) and len(shape) in (1, 3)
            and all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in shape)):
        raise UserError(f"{where}: 'shape' should be a list of 1 (vectors) or 3 (images) positive integers, got {shape!r}")
    classes = doc.get("num_classes", 0)
    if not (isinstance(classes, int) and not isinstance(classes, bool) and classes >= 0):
        raise UserError(f"{where}: 'num_classes' should be an integer >= 0, got {classes!r}")
    cond_dim = doc.get("cond_dim", 0)
    if not (isinstance(cond_dim, int) and not isinstance(cond_dim, bool) and cond_dim >= 0):
        raise UserError(f"{where}: 'cond_dim' should be an integer >= 0, got {cond_dim!r}")
    data = doc.get("data")
    if not (isinstance(data, dict) and isinstance(data.get("name"), str)):
        raise UserError(f"{where}: 'data' should be a JSON object with a 'name', got {data!r}")
    if "pretrained" in doc:  # a Hub folder: its one weights file, beside config.json
        file = doc["pretrained"].get("weights") if isinstance(doc["pretrained"], dict) else None
        if not (isinstance(file, str) and re.fullmatch(r"[\w.-]+\.safetensors", file)):
            raise UserError(f"{where}: 'pretrained.weights' should name a .safetensors file in the folder, got {file!r}")


def dataset_from_doc(doc: dict, where: str, build=None):
    """The data set a checked ``config.json`` describes (``build``: ``make_dataset`` to train,
    ``eval_dataset`` to sample and evaluate); a malformed 'data' entry names the file."""
    from .data import make_dataset

    try:
        dataset = (build or make_dataset)(doc["data"])
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{where}: malformed 'data' entry ({type(e).__name__}: {str(e)[:80]})") from None
    if list(dataset.shape) != doc["shape"]:
        raise UserError(f"{where}: 'shape' {doc['shape']} does not match the data's {list(dataset.shape)}")
    return dataset


class RunLock:
    """An exclusive lock on ``RUN/.lock`` held while a trainer writes the run directory."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / ".lock"
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise UserError(f"{self.path.parent}: another trainer is writing this run directory") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Run:
    """A trained run loaded from its directory: network (EMA weights by default), path, data.

    ``velocity(x, t[, label])`` is the model's field in model space; :meth:`flow` carries given
    noise to the data's own units, :meth:`sample` draws samples in them.
    """

    def __init__(self, run_dir, device=None, weights: str = "ema"):
        from .config import TrainConfig
        from .data import eval_dataset

        self.dir = Path(run_dir)
        self.doc = read_config(self.dir)
        where = str(self.dir / "config.json")
        self.cfg = TrainConfig.from_dict(self.doc["train"], where=where)
        self.shape = tuple(self.doc["shape"])
        self.num_classes = self.doc.get("num_classes", 0)
        self.cond_dim = self.doc.get("cond_dim", 0)
        self.dataset = dataset_from_doc(self.doc, where, eval_dataset)
        self.path = self.cfg.build_path()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if weights not in ("ema", "model"):
            raise UserError(f"--weights: expected ema or model, got {weights!r}")
        self.weights = self.doc["pretrained"].get("from", weights) if "pretrained" in self.doc else weights
        if self.cond_dim != self.dataset.cond_dim:
            raise UserError(f"{where}: 'cond_dim' {self.cond_dim} does not match the data's {self.dataset.cond_dim}")
        self.model = self.cfg.build_model(self.shape, self.num_classes, self.path, self.cond_dim)
        # a Hub folder (flowmatch.hub.save_pretrained) holds one set of weights, named in config.json
        file = self.doc["pretrained"]["weights"] if "pretrained" in self.doc else f"{weights}.safetensors"
        state = load_weights(self.dir / file)
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{self.dir / file}: weights do not fit the network in config.json "
                            f"({str(e).splitlines()[0][:100]})") from None
        self.model.to(self.device).eval().requires_grad_(False)

    def save_pretrained(self, folder, overwrite: bool = False) -> Path:
        """This run's sampling weights, config and a model card as a Hub folder (:mod:`flowmatch.hub`)."""
        from .hub import save_pretrained

        return save_pretrained(self, folder, weights=self.weights, overwrite=overwrite)

    @property
    def lineage(self) -> dict:
        return self.cfg.lineage

    @property
    def distilled(self) -> bool:
        """A ``flowmatch distill`` student: a k-step map trained at its grid's times only, not a
        velocity field (nothing to integrate to a tolerance, no straightness)."""
        return self.lineage.get("kind") == "distill"

    @property
    def default_nfe(self) -> int:
        """How the run is meant to be sampled: a distilled k-step generator at NFE k, a MeanFlow
        or shortcut run in one step, else 100."""
        if self.cfg.objective in ONE_STEP:
            return 1
        return int(self.lineage.get("steps", 1)) if self.distilled else 100

    def velocity(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, t, label) if label is not None else self.model(x, t)

    def field(self, label=None, guidance: float = 1.0, grid: torch.Tensor | None = None):
        """The velocity ``v(x, t)`` to integrate, with classifier-free guidance for a label; with
        ``grid`` (a MeanFlow run's fixed-step grid) the average velocity over each of its steps."""
        from .solvers import guided

        v = self.velocity if grid is None else _average_velocity(self.model, grid)
        return v if label is None else guided(v, label, guidance)

    def check_label(self, label: int | None, guidance: float = 1.0, cond=None, n: int | None = None) -> None:
        """A label fits this run's classes, a condition (``cond``: one vector, or one per sample
        of ``n``) its condition vectors; guidance (other than 1, none) is a finite weight given
        with a label or a condition."""
        import math

        if not (isinstance(guidance, (int, float)) and math.isfinite(guidance)):
            raise UserError(f"--guidance: expected a finite weight, got {guidance!r}")
        if cond is not None:
            self._check_cond(cond, n)
        if label is None and cond is None:
            if guidance != 1.0:
                what, option = ("a condition", "--cond") if self.cond_dim else ("a class", "--label")
                raise UserError(f"--guidance: weighs {what} against the unconditional field, so it needs {option}; "
                                f"got --guidance {guidance:g} without {option}")
            return
        if label is None:
            return
        if self.num_classes == 0:
            what = "takes a condition vector (--cond), not a label" if self.cond_dim else "is an unconditional run; it takes no label"
            raise UserError(f"--label: {self.dir} {what}")
        if not 0 <= label < self.num_classes:
            raise UserError(f"--label: expected a class in 0..{self.num_classes - 1}, got {label}")

    def _check_cond(self, cond, n: int | None) -> None:
        if self.cond_dim == 0:
            raise UserError(f"--cond: {self.dir} was not trained with condition vectors; it takes none")
        c = torch.as_tensor(cond)
        shapes = f"({self.cond_dim},)" + (f" or ({n}, {self.cond_dim})" if n is not None else "")
        if not (c.shape == (self.cond_dim,) or (c.dim() == 2 and c.shape[1] == self.cond_dim and (n is None or len(c) == n))):
            raise UserError(f"--cond: expected a condition of shape {shapes} (one for all samples, or one per sample), "
                            f"got {tuple(c.shape)}")
        if not torch.isfinite(c.double()).all():
            raise UserError("--cond: expected finite numbers")

    def condition(self, cond, n: int) -> torch.Tensor:
        """Condition vectors in data units -> ``n`` of them in model space, on the run's device."""
        c = self.dataset.encode_cond(torch.as_tensor(cond, dtype=torch.float32).to(self.device))
        return c.expand(n, -1) if c.dim() == 1 else c

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, *self.shape, generator=generator, device=generator.device)

    def log_prob(self, x: torch.Tensor, tol: float = 1e-5, divergence: str = "auto", seed: int = 0,
                 batch_size: int = 1000, progress: bool = False) -> torch.Tensor:
        """Log-density (nats) of data ``x`` (in data units) under the model, per sample."""
        from tqdm.auto import tqdm

        from .likelihood import log_prob

        out = []
        for k, i in enumerate(tqdm(range(0, len(x), batch_size), disable=not progress, desc="nll", unit="batch")):
            xb = self.dataset.encode(x[i:i + batch_size].to(self.device))
            g = batch_generator(seed, k, self.device)
            lp = log_prob(self.velocity, xb, atol=tol, rtol=tol, divergence=divergence, generator=g)
            out.append(lp.log_prob.cpu() - log_scale(self.dataset, self.shape))
        return torch.cat(out)

    @torch.inference_mode()
    def sample(self, n: int, nfe: int = 100, solver: str = "euler", seed: int = 0, batch_size: int = 65536,
               label: int | None = None, guidance: float = 1.0, progress: bool = False, part: tuple[int, int] | None = None,
               cond=None, **solver_kw) -> torch.Tensor:
        """``n`` samples in data units (CPU float32), drawn in batches of bounded memory.

        Batch ``k`` uses its own generator seeded from ``(seed, k)``, so the result does not
        depend on the device's memory or the number of processes, only on ``seed`` and
        ``batch_size``. ``part=(i, p)`` draws only the batches ``k = i, i + p, ...`` (process
        ``i`` of ``p``); their concatenation in ``k`` order is the full result. ``cond``: a run
        trained with condition vectors, one (cond_dim,) for all samples or (n, cond_dim), in the
        data's units (None: unconditional).
        """
        out = [x for _, x in self.sample_batches(n, nfe, solver, seed, batch_size, label, guidance, progress, part,
                                                 cond=cond, **solver_kw)]
        return torch.cat(out) if out else torch.empty(0, *self.shape)

    @torch.inference_mode()
    def sample_batches(self, n: int, nfe: int = 100, solver: str = "euler", seed: int = 0, batch_size: int = 65536,
                       label: int | None = None, guidance: float = 1.0, progress: bool = False,
                       part: tuple[int, int] | None = None, cond=None, **solver_kw):
        """:meth:`sample` one batch at a time: yields ``(start, x)`` with ``x`` the samples
        ``start .. start + len(x)`` (CPU float32, data units), so a caller can stream them to disk."""
        from tqdm.auto import tqdm

        from .solvers import check_method

        check_method(solver, nfe if solver not in ("dopri5", "dopri8", "bosh3") else None)
        self.check_label(label, guidance, cond, n)
        cond = None if cond is None else torch.as_tensor(cond, dtype=torch.float32)
        starts = list(enumerate(range(0, n, batch_size)))
        if part is not None:
            starts = starts[part[0]::part[1]]
        for k, i in tqdm(starts, disable=not progress, desc="sample", unit="batch"):
            x0 = batch_noise(seed, k, min(batch_size, n - i), self.shape, self.device)
            sde_seed = batch_generator(seed, k).initial_seed()  # the batch's Brownian path (torchsde's own generator)
            c = None if cond is None else (cond if cond.dim() == 1 else cond[i:i + len(x0)])
            yield i, self.flow(x0, nfe, solver, label, guidance, sde_seed=sde_seed, cond=c, **solver_kw).x.float().cpu()

    def sample_distributed(self, n: int, batch_size: int = 65536, progress: bool = False, **kw) -> torch.Tensor | None:
        """:meth:`sample` under ``torch.distributed`` (torchrun): every process draws its share of
        the batches, process 0 gathers them in order and returns all ``n`` samples; the others
        return None. ``kw``: the other options of :meth:`sample`."""
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        mine = self.sample(n, batch_size=batch_size, progress=progress and rank == 0, part=(rank, world), **kw)
        sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)][rank::world]
        parts = [None] * world if rank == 0 else None
        dist.gather_object(list(mine.split(sizes)) if sizes else [], parts, dst=0)
        if rank != 0:
            return None
        batches = [None] * len(range(0, n, batch_size))
        for p, chunks in enumerate(parts):
            batches[p::world] = chunks
        return torch.cat(batches)

    @torch.inference_mode()
    def flow(self, x0: torch.Tensor, nfe: int | None = 100, solver: str = "euler", label: int | None = None,
             guidance: float = 1.0, trajectory: bool = False, cond=None, **solver_kw):
        """Integrate noise ``x0`` (model space, on the run's device) from t = 0 to 1 with
        :meth:`field` and decode: a :class:`~flowmatch.solvers.SolveResult` whose ``x`` (and
        ``trajectory``, (T, *x0.shape)) are in data units, on the run's device. ``cond``: condition
        vectors in data units, one or one per row of ``x0`` (runs trained with them). A stochastic
        ``solver`` (euler-maruyama) takes ``noise`` and ``sde_seed`` (its Brownian path) from
        ``solver_kw`` and ignores ``trajectory``."""
        from .solvers import SDE_METHODS, fixed_grid, integrate, integrate_sde

        lab = None if label is None else torch.full((len(x0),), label, device=self.device, dtype=torch.long)
        if cond is not None:
            lab = self.condition(cond, len(x0))
        if solver in SDE_METHODS:
            res = integrate_sde(self.field(lab, guidance), x0, self.path, nfe, noise=solver_kw.get("noise", 1.0),
                                seed=solver_kw.get("sde_seed", 0), time_shift=solver_kw.get("time_shift", 1.0))
            return dataclasses.replace(res, x=self.dataset.decode(res.x))
        solver_kw.pop("noise", None), solver_kw.pop("sde_seed", None)
        grid = None
        if self.cfg.objective in ONE_STEP and solver == "euler":  # each step: the average velocity over it
            grid = fixed_grid("euler", nfe, time_shift=solver_kw.get("time_shift", 1.0), device=self.device, dtype=torch.float64)
        res = integrate(self.field(lab, guidance, grid), x0, solver, nfe, trajectory=trajectory, **solver_kw)
        decoded = None if res.trajectory is None else self.dataset.decode(res.trajectory)
        return dataclasses.replace(res, x=self.dataset.decode(res.x), trajectory=decoded)


def _average_velocity(model, grid: torch.Tensor):
    """``u(x, t, h)`` with ``h`` the step from ``t`` to the next time of ``grid``: Euler on that
    grid takes MeanFlow's k-step sampler's steps, ``z <- z + h u(z, t, h)``."""

    def v(x, t, label=None):
        k = (grid[None, :] - t.to(grid.dtype)[:, None]).abs().argmin(1).clamp(max=len(grid) - 2)  # t's grid time
        h = (grid[k + 1] - grid[k]).to(x.dtype)
        return model(x, t, label, h=h) if label is not None else model(x, t, h=h)

    return v


def log_scale(dataset, shape) -> float:
    """``sum(log std)`` of the data normalisation over one sample: log-density in data units is
    the model-space log-density minus this."""
    import math

    std = dataset.std.float()
    return float(std.log().sum()) if std.numel() > 1 else math.prod(shape) * float(std.log())


def load_run(run_dir, device=None, weights: str = "ema") -> Run:
    """Load a run directory for sampling and evaluation."""
    return Run(run_dir, device=device, weights=weights)


def load(name, device=None, revision: str | None = None) -> Run:
    """A :class:`Run` from a Hub folder (:mod:`flowmatch.hub`), a run directory, or a Hub
    repository id ("owner/name", downloaded once into huggingface_hub's cache)."""
    from .hub import download

    path = Path(name)
    return Run(path if path.exists() else download(str(name), revision), device=device)


def save_pretrained(run, folder, weights: str = "ema", overwrite: bool = False) -> Path:
    """A run (loaded, or its directory) as a Hub folder: :func:`flowmatch.hub.save_pretrained`."""
    from .hub import save_pretrained as save

    return save(run if isinstance(run, Run) else Run(run, device="cpu", weights=weights), folder,
                overwrite=overwrite)
