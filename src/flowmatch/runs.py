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

import fcntl
import json
import math
import os
import re
from pathlib import Path

import torch

from .config import interval_objective
from .errors import SettingError, UserError
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

FORMAT_VERSION = 1


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


#: the most numbers one sample may hold (a 3 x 1024 x 1024 image is 3.1 M)
MAX_SAMPLE_SIZE = 2**24


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
    if math.prod(shape) > MAX_SAMPLE_SIZE:  # a network for it would not fit: refuse before building one
        raise UserError(f"{where}: 'shape' {shape} holds {math.prod(shape):,} numbers per sample; expected at most "
                        f"{MAX_SAMPLE_SIZE:,}")
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
    """An exclusive lock on ``RUN/.lock`` held while a trainer writes the run directory; a second
    trainer is refused at once. ``new_run`` (the entries a new run's directory may already hold):
    checked again once the lock is held, so that of two commands starting the same new run at
    once, the one that comes second never writes into the first's finished run."""

    def __init__(self, run_dir, new_run: tuple | None = None):
        self.path = Path(run_dir) / ".lock"
        self.new_run = new_run
        self.fd = None

    def __enter__(self):
        from .files import write_fault

        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_fault(self.path, e) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise UserError(f"{self.path.parent}: another trainer is writing this run directory") from None
        if self.new_run is not None:
            allowed = {*self.new_run, ".lock"}
            if any(p.name not in allowed for p in self.path.parent.iterdir()):
                self.__exit__()
                raise SettingError("out", f"{self.path.parent} already exists (another command wrote it meanwhile); "
                                          "choose a new directory, or `resume` to continue it")
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Run:
    """A trained run, loaded from its directory as a bundle: the network (the EMA weights by default),
    its path, its data's codec and its settings. ``velocity(x, t[, label])`` is the network's field in
    model space; sampling (:mod:`flowmatch.sampling`) and likelihood (:mod:`flowmatch.likelihood`)
    are functions of a run, with :meth:`sample`, :meth:`flow` and :meth:`log_prob` as shortcuts."""

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
            raise SettingError("weights", f"expected ema or model, got {weights!r}")
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

    @property
    def lineage(self) -> dict:
        return self.cfg.lineage

    @property
    def distilled(self) -> bool:
        """A ``flowmatch distill`` student: a k-step map trained at its grid's times only, not a
        velocity field (nothing to integrate to a tolerance, no straightness)."""
        return self.lineage.get("kind") == "distill"

    @property
    def interval(self) -> bool:
        """Whether the network takes the step's interval: a MeanFlow or shortcut run, sampled by
        its average velocity over each step (:func:`~flowmatch.solvers.flow_map`)."""
        return interval_objective(self.cfg.objective)

    @property
    def default_nfe(self) -> int:
        """How the run is meant to be sampled: a distilled k-step generator at NFE k, a MeanFlow
        or shortcut run in one step, else 100."""
        if self.interval:
            return 1
        return int(self.lineage.get("steps", 1)) if self.distilled else 100

    def velocity(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """The network in model space (``kw``: an interval network's ``h``)."""
        return self.model(x, t, label, **kw) if label is not None else self.model(x, t, **kw)

    def field(self, label=None, guidance: float = 1.0):
        """The velocity ``v(x, t)`` to integrate, with classifier-free guidance for a label."""
        from .solvers import guided

        return self.velocity if label is None else guided(self.velocity, label, guidance)

    def condition(self, cond, n: int) -> torch.Tensor:
        """Condition vectors in data units -> ``n`` of them in model space, on the run's device."""
        c = self.dataset.encode_cond(torch.as_tensor(cond, dtype=torch.float32).to(self.device))
        return c.expand(n, -1) if c.dim() == 1 else c

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.device
        return torch.randn(n, *self.shape, generator=generator, device=device)

    def log_prob(self, x: torch.Tensor, tol: float = 1e-5, divergence: str = "auto", seed: int = 0,
                 batch_size: int = 1000, progress: bool = False) -> torch.Tensor:
        """Log-density (nats) of data ``x`` (in data units) under the model, per sample
        (:func:`flowmatch.likelihood.run_log_prob`)."""
        from .likelihood import run_log_prob

        return run_log_prob(self, x, tol, divergence, seed, batch_size, progress)

    def sample(self, n: int, nfe: int | None = None, solver: str = "euler", seed: int = 0, progress: bool = False,
               **options) -> torch.Tensor:
        """``n`` samples in data units (CPU float32): :func:`flowmatch.sampling.sample` with
        :class:`~flowmatch.sampling.SampleOptions` (``nfe``, ``solver`` and ``options`` its fields)."""
        from .sampling import SampleOptions, sample

        return sample(self, n, SampleOptions(nfe=nfe, solver=solver, **options), seed, progress)

    def flow(self, x0: torch.Tensor, nfe: int | None = None, solver: str = "euler", trajectory: bool = False, **options):
        """Carry noise ``x0`` (model space) to the data's units: :func:`flowmatch.sampling.flow`."""
        from .sampling import SampleOptions, flow

        return flow(self, x0, SampleOptions(nfe=nfe, solver=solver, **options), trajectory)


def init_run(cfg) -> Run | None:
    """The run that settings ``cfg`` start from (``init``), loaded on the CPU; None without one."""
    return None if cfg.init is None else load_run(cfg.init, device="cpu")


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
