"""``TrainConfig``: every training setting, typed, filled by the command line, saved in
``config.json`` and checked when read back (unknown keys and wrong types are errors)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from .errors import UserError


@dataclass
class TrainConfig:
    # data
    data: str = "checkerboard"
    n_points: int | None = None
    image_size: int = 32  # image folders: resized and centre-cropped to this
    skip_bad: bool = False  # image folders: skip unreadable files with a warning
    holdout: float = 0.1  # user tables and images: share of rows kept out of training, for eval and nll
    # optimisation (defaults chosen by benchmarks/checkerboard.py: quality per CPU minute)
    steps: int = 4000
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    schedule: str = "cosine"
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    # the flow
    path: str = "linear"
    sigma_min: float = 0.0
    coupling: str = "independent"
    ot_method: str = "exact"  # coupling "ot": exact (ot.emd) or sinkhorn (entropic, ot.sinkhorn)
    ot_reg: float = 0.05  # sinkhorn's entropic regularisation, relative to the batch's mean cost
    ot_by_class: bool = False  # labelled data: pair noise only with data of the same class
    time_dist: str = "uniform"
    time_mean: float = 0.0
    time_std: float = 1.0
    time_uniform: float = 0.0  # logit-normal: share of times drawn from U[0, 1] instead
    time_steps: int = 1  # time_dist "grid": t drawn from {0, 1/k, ..., (k-1)/k} (k-step distillation)
    loss: str = "mse"  # or "pseudo-huber" (meant for fixed pairs: reflow, distillation)
    huber_c: float | None = None  # pseudo-Huber's c (None: 0.00054 sqrt(D))
    # the network
    model: str = "auto"  # mlp for vectors, unet for images
    width: int = 512
    depth: int = 5
    time_scale: float = 10000.0  # the MLP embeds sin/cos of time_scale * t
    # Sharp samples (benchmarks/levers.py): the MLP sees 64 random Fourier features of x beside
    # x, and predicts the data x1 (auto: "data" for vectors, "velocity" for images).
    fourier: int = 64  # the MLP's random Fourier features of x (0: raw coordinates only)
    fourier_scale: float = 1.0  # their frequencies' standard deviation (cycles per data unit)
    prediction: str = "auto"  # velocity, data (the network predicts x1; the path gives the velocity) or auto
    init_from: str | None = None  # safetensors weights to start from (reflow: the teacher's)
    # labels (class-conditional data): probability of dropping a label for guidance
    label_dropout: float = 0.2
    # bookkeeping
    log_every: int = 50
    checkpoint_every: int = 1000
    precision: str = "fp32"  # bf16 autocast: about 1.9x the steps/s on CPUs with AMX (benchmarks/peers.py)
    compile: bool = False  # torch.compile the network for training steps
    grad_accum: int = 1
    processes: int = 1
    plots: bool = True
    lineage: dict = field(default_factory=dict)

    def validate(self, where: str | None = None) -> TrainConfig:
        """Check ranges; raise :class:`UserError` naming the option (or, with ``where``, the
        setting in that file: a config.json read back is checked by the same rules)."""

        def bad(name: str, expected: str, value) -> UserError:
            option = {"time_steps": "--k"}.get(name, f"--{name.replace('_', '-')}")  # distill --k sets time_steps
            subject = option if where is None else f"{where}: setting {name!r}"
            return UserError(f"{subject}: expected {expected}, got {value!r}")

        hints = typing.get_type_hints(type(self))
        for name, hint in hints.items():  # every float setting (click's FLOAT accepts nan and inf)
            value = getattr(self, name)
            if float in typing.get_args(hint) + (hint,) and isinstance(value, float) and not math.isfinite(value):
                raise bad(name, "a finite number", value)
        positive = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "log_every": self.log_every,
                    "checkpoint_every": self.checkpoint_every, "width": self.width, "depth": self.depth,
                    "grad_accum": self.grad_accum, "processes": self.processes, "time_steps": self.time_steps,
                    "image_size": self.image_size}
        for name, value in positive.items():
            if not value > 0:
                raise bad(name, "a positive value", value)
        if self.width % 2:  # the network's time embedding has width/2 sines and width/2 cosines
            raise bad("width", "an even number", self.width)
        if self.n_points is not None and self.n_points < 2:
            raise bad("n_points", "an integer >= 2", self.n_points)
        if self.fourier < 0:
            raise bad("fourier", "a count >= 0", self.fourier)
        for name in ("fourier_scale", "time_scale"):
            if not getattr(self, name) > 0:
                raise bad(name, "a positive value", getattr(self, name))
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "a value >= 0", self.warmup_steps)
        if self.weight_decay < 0:
            raise bad("weight_decay", "a value >= 0", self.weight_decay)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise bad("grad_clip", "a positive value", self.grad_clip)
        if not 0 <= self.ema_decay < 1:
            raise bad("ema_decay", "a value in [0, 1)", self.ema_decay)
        if not 0 <= self.label_dropout < 1:
            raise bad("label_dropout", "a value in [0, 1)", self.label_dropout)
        if not 0 <= self.holdout <= 0.5:
            raise bad("holdout", "a share in [0, 0.5]", self.holdout)
        if self.ot_method not in ("exact", "sinkhorn"):
            raise bad("ot_method", "one of exact, sinkhorn", self.ot_method)
        if not self.ot_reg > 0:
            raise bad("ot_reg", "a positive value", self.ot_reg)
        if self.prediction not in ("auto", "velocity", "data"):
            raise bad("prediction", "one of auto, velocity, data", self.prediction)
        if self.loss not in LOSSES:
            raise bad("loss", f"one of {', '.join(LOSSES)}", self.loss)
        if self.huber_c is not None and not self.huber_c > 0:
            raise bad("huber_c", "a positive value", self.huber_c)
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise bad("precision", "one of fp32, bf16, fp16", self.precision)
        return self

    def data_spec(self) -> dict:
        """The dataset spec that ``data`` (a name or a path) and the data settings describe."""
        from .data import spec_from_arg

        return spec_from_arg(self.data, self.n_points, self.seed, self.image_size, self.skip_bad, self.holdout)

    def build_coupling(self):
        from .couplings import make_coupling

        if self.coupling == "ot":
            return make_coupling("ot", method=self.ot_method, reg=self.ot_reg, by_class=self.ot_by_class)
        return make_coupling(self.coupling)

    def build_path(self):
        from .paths import make_path

        return make_path(self.path, sigma_min=self.sigma_min) if self.path == "linear" else make_path(self.path)

    def build_time_sampler(self):
        from .timesteps import make_time_sampler

        if self.time_dist == "logit-normal":
            return make_time_sampler(self.time_dist, mean=self.time_mean, std=self.time_std, uniform=self.time_uniform)
        if self.time_dist == "grid":
            return make_time_sampler(self.time_dist, k=self.time_steps)
        return make_time_sampler(self.time_dist)

    def model_spec(self, shape: tuple | None = None) -> dict:
        """The network's spec; ``prediction="auto"`` resolves to "data" for vectors and
        "velocity" for images (``shape`` of one sample)."""
        prediction = self.prediction
        if prediction == "auto":
            prediction = "velocity" if shape is not None and len(shape) == 3 else "data"
        return {"name": self.model, "width": self.width, "depth": self.depth, "time_scale": self.time_scale,
                "fourier": self.fourier, "fourier_scale": self.fourier_scale, "prediction": prediction}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> TrainConfig:
        """Rebuild from a dict, rejecting unknown keys and values of the wrong type."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: 'train' must be a JSON object")
        hints = typing.get_type_hints(cls)
        d = {**LEGACY, **d}  # a run written before a setting existed had its old behaviour
        unknown = sorted(set(d) - set(hints))
        if unknown:
            raise UserError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        for key, value in d.items():
            if not _type_ok(value, hints[key]):
                raise UserError(f"{where}: setting {key!r} should be {_type_name(hints[key])}, got {value!r}")
        return cls(**d)


SCHEDULES = ("constant", "cosine", "linear")
# Settings added after runs were first written, with the value that reproduces those runs.
LEGACY = {"fourier": 0, "fourier_scale": 1.0, "time_scale": 10000.0, "prediction": "velocity", "loss": "mse",
          "huber_c": None}
LOSSES = ("mse", "pseudo-huber")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then the schedule down to 0.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
