"""``TrainConfig``: every training setting, typed, filled by the command line, saved in
``config.json`` and checked when read back (unknown keys and wrong types are errors)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from .errors import SettingError, UserError

#: the panels ``flowmatch train --help`` groups its options in, in order
PANELS = ("Data", "Model", "Objective", "Optimisation", "Measures during training", "Output and processes")


def setting(default, help: str = "", cli: bool = True, factory=None, panel: str = "Optimisation"):
    """A field of :class:`TrainConfig` with its command-line help and ``--help`` panel; ``cli=False``
    for settings that ``train`` does not offer (reflow and distill set them). ``flowmatch train``'s
    options are made from these fields (type, default, help), so a new setting is added here only.
    A default of None: the recipe's value for the data and the objective (:data:`RECIPES`)."""
    meta = {"help": help, "cli": cli, "panel": panel}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


def data_setting(default, help: str = "", **kw):
    return setting(default, help, panel="Data", **kw)


def model_setting(default, help: str = "", **kw):
    return setting(default, help, panel="Model", **kw)


def objective_setting(default, help: str = "", **kw):
    return setting(default, help, panel="Objective", **kw)


@dataclass
class TrainConfig:
    # data
    data: str = data_setting("checkerboard", "checkerboard, moons, 8gaussians, spirals, rings, digits (8x8), mnist (28x28); "
                             "cifar10:DIR (CIFAR-10's binary batches); a .npy/.csv/.pt/.npz table, a .npy of images "
                             "(N, C, H, W) or an image folder")
    n_points: int | None = data_setting(None, "train on a fixed set of N points of a 2-D toy (the notebook's)")
    image_size: int = data_setting(32, "image folders: resize and centre-crop to this size")
    skip_bad: bool = data_setting(False, "image folders: skip unreadable files with a warning")
    cond_columns: str | None = data_setting(None, "tables: columns (from 0, e.g. 2,3) that condition the rest "
                                                  "(classifier-free guidance; .npz files: their array 'cond')")
    hflip: bool = data_setting(False, "images: flip each training image left-right with probability 1/2")
    workers: int | None = data_setting(None, "images: processes loading training batches (0: the training process) "
                                             "[default: 0 for fewer than 10,000 images, else min(4, CPUs - 1)]")
    holdout: float = data_setting(0.1, "user tables and images: share of rows held out of training (eval and nll "
                                       "measure on them)")
    # optimisation
    steps: int | None = setting(None, "optimizer steps; with --resume, the new total (at least the steps already done)")
    batch_size: int | None = setting(None, "batch size per process (the global batch: x processes x grad accumulation)")
    lr: float | None = setting(None, "peak learning rate (AdamW)")
    weight_decay: float = setting(0.0)
    adam_beta2: float = setting(0.999, "AdamW's second-moment decay (e.g. 0.95 for steadier long runs)")
    warmup_steps: int = setting(200, "linear warm-up steps")
    schedule: str = setting("cosine", "learning-rate schedule after warm-up: constant, cosine, linear")
    grad_clip: float | None = setting(1.0, "clip the gradient norm (0 or none: no clipping)")
    ema_decay: float = setting(0.999, "EMA decay of the weights used for sampling, warmed up as min(decay, (1 + step) / "
                                      "(10 + step)): 0.999 after 8991 steps")
    seed: int = setting(0)
    # the flow
    objective: str = objective_setting("cfm", "cfm (flow matching), meanflow (average velocity, Geng et al. 2025) or "
                                              "shortcut (step-size conditioned, Frans et al. 2024): the last two generate in "
                                              "one step. meanflow on vectors trains its measured recipe (OT pairs at batch 256, "
                                              "data prediction, its own trajectories), about 1.8x flow matching's minutes")
    meanflow_share: float | None = objective_setting(None, "meanflow: share of training pairs with t_end > t (the rest: "
                                                           "plain flow matching)")
    meanflow_power: float = objective_setting(0.5, "meanflow: adaptive loss weight 1/(err + 1e-3)^p (the paper's p = 1; "
                                                   "0: plain MSE)")
    meanflow_tangent: str = objective_setting("conditional", "meanflow: the JVP's direction in z, conditional (x1 - x0, "
                                                             "the paper's) or model (the network's own velocity u(z, t, 0), "
                                                             "improved MeanFlow)")
    meanflow_fm_time: str = objective_setting("single", "meanflow: the time of the flow-matching pairs (t_end = t), paired "
                                                        "(the earlier of the two draws, the paper's code) or single (one draw "
                                                        "of the time sampler)")
    meanflow_to_data: float = objective_setting(0.0, "meanflow: share of the interval pairs that end at the data (t_end = 1), "
                                                     "the family of intervals the one step z0 + u(z0, 0, 1) belongs to")
    meanflow_distill: float | None = objective_setting(None, "meanflow: extra rows, as a share of the batch, that learn the "
                                                             "average velocity from the network's own trajectories (its EMA's "
                                                             "field u(z, t, 0) integrated by the midpoint rule); 0: none")
    meanflow_distill_whole: float = objective_setting(0.5, "meanflow own trajectories: share of those rows on the whole step "
                                                           "0 -> 1 (the others: two grid points of the trajectory)")
    meanflow_distill_start: float = objective_setting(0.5, "meanflow own trajectories: the share of the steps after which "
                                                           "they start")
    meanflow_distill_every: int = objective_setting(250, "meanflow own trajectories: steps between refreshes")
    meanflow_distill_pairs: int = objective_setting(4096, "meanflow own trajectories: trajectories per refresh")
    meanflow_distill_nfe: int | None = objective_setting(None, "meanflow own trajectories: midpoint evaluations per trajectory "
                                                               "(even)")
    shortcut_share: float = objective_setting(0.25, "shortcut: share of each batch with self-consistency targets (the rest: "
                                                    "flow matching)")
    shortcut_steps: int = objective_setting(128, "shortcut: the finest step is 1/N (a power of 2); steps 1, 1/2, ..., 1/N "
                                                 "are trained")
    path: str = objective_setting("linear", "probability path: linear, vp, cosine")
    sigma_min: float = objective_setting(0.0, "linear path: noise left at t = 1")
    coupling: str | None = objective_setting(None, "independent or ot (minibatch optimal transport over the global batch)")
    ot_method: str = objective_setting("exact", "coupling ot: exact (ot.emd) or sinkhorn (entropic)")
    ot_reg: float = objective_setting(0.05, "ot method sinkhorn: regularisation, relative to the batch's mean cost")
    ot_by_class: bool = objective_setting(False, "coupling ot on labelled data: pair within each class")
    stf: int | None = objective_setting(None, "stable target field (Xu et al. 2023): flow matching's (and MeanFlow's) target "
                                              "averaged over the posterior of the batch's data and N more draws given x_t, a "
                                              "lower-variance target (0: the plain one)")
    time_dist: str | None = objective_setting(None, "uniform, logit-normal or u-shaped (RF++: most weight near t = 0 and 1)")
    time_mean: float | None = objective_setting(None, "logit-normal location (> 0: towards the data)")
    time_std: float = objective_setting(1.0, "logit-normal scale")
    time_uniform: float = objective_setting(0.0, "logit-normal: share of times drawn from U[0, 1] instead")
    time_steps: int = objective_setting(1, "time_dist grid: t drawn from {0, 1/k, ..., (k-1)/k} (k-step distillation)",
                                        cli=False)
    loss: str = objective_setting("mse", "mse, pseudo-huber or lpips-huber (meant for fixed pairs: reflow, distillation)",
                                  cli=False)
    huber_c: float | None = objective_setting(None, "pseudo-Huber's c (None: 0.00054 sqrt(D); lpips-huber: 0.00054 D)",
                                              cli=False)
    perceptual: str | None = objective_setting(None, "lpips-huber: the user's TorchScript perceptual distance d(a, b)",
                                               cli=False)
    label_dropout: float = objective_setting(0.2, "labels or condition vectors: probability of dropping one for the null "
                                                  "(classifier-free guidance)")
    # the network
    model: str = model_setting("auto", "network: auto (mlp for vectors, unet for images), mlp, unet")
    unet: str = model_setting("auto", "UNet preset for images: auto or small (per image size), tiny, cifar (~36 M "
                                      "parameters)")
    width: int = model_setting(512, "MLP: hidden width")
    depth: int = model_setting(5, "MLP: hidden layers")
    fourier: int | None = model_setting(None, "MLP: random Fourier features of x (0: raw coordinates)")
    fourier_scale: float = model_setting(1.0, "MLP: std of the Fourier frequencies (cycles per unit)")
    film: bool = model_setting(False, "MLP: FiLM time conditioning (every block scaled and shifted by t; about 1.4x the "
                                      "time a step)")
    time_scale: float | None = model_setting(None, "the time embedding's sines see time_scale * t [default: MLP 10000, the "
                                                   "notebook's; UNet 1000, diffusers'; meanflow, shortcut: 10, smooth in time]")
    prediction: str | None = model_setting(None, "velocity or data (the network predicts x1); auto: data for vectors "
                                                 "(runs written before the recipes)")
    init_from: str | None = model_setting(None, "safetensors weights to start from (reflow: the teacher's)", cli=False)
    init: str | None = model_setting(None, "start from a trained flow-matching run (its folder) on the same data: its network "
                                           "settings and EMA weights, the interval's layers at zero so that a meanflow or "
                                           "shortcut network begins as the run's field; meanflow's own-trajectory rows then "
                                           "follow the run's field from the first step")
    # bookkeeping
    log_every: int = setting(50, panel="Output and processes")
    log_with: str | None = setting(None, "experiment tracker through accelerate: tensorboard, wandb or mlflow (loss, lr, "
                                         "gradient norm each log step; samples at checkpoints; logs in RUN/tracking)",
                                   panel="Measures during training")
    checkpoint_every: int = setting(1000, "write a checkpoint every N steps", panel="Output and processes")
    eval_every: int = setting(0, "every N steps, measure EMA samples against real data (RUN/eval.jsonl, eval.png, the "
                                 "tracker); 0: never", panel="Measures during training")
    eval_n: int = setting(1000, "eval every: samples per measurement", panel="Measures during training")
    eval_nfe: int = setting(20, "eval every: Euler steps per sample", panel="Measures during training")
    # bf16 autocast: about 1.9x the steps/s on CPUs with AMX; far slower on CPUs without bf16 units
    precision: str = setting("auto", "auto (bf16 autocast on CUDA devices that support it, else fp32), fp32, bf16 "
                                     "or fp16 (CUDA only)")
    compile: bool = setting(False, "torch.compile the network for training steps")
    grad_accum: int = setting(1, "gradient accumulation steps")
    processes: int = setting(1, "local training processes (gloo on the CPU, NCCL on GPUs), via torchrun",
                             panel="Output and processes")
    plots: bool = setting(True, "write pictures at the end", panel="Output and processes")
    lineage: dict = setting(None, cli=False, factory=dict)

    def __post_init__(self):
        if self.grad_clip == 0:  # 0 disables clipping, as None does
            self.grad_clip = None

    def resolve(self, dataset) -> TrainConfig:
        """Fill every setting left unset (None) from the recipe for this data set's kind and the
        objective (:func:`recipe`), and the time embedding's scale from the network; returns self.
        Settings given keep their values."""
        # the recipe's stable target and its steps where it applies and the user has not chosen one
        own_stf = stable_target_possible(self, dataset) and self.stf is None
        values = recipe(data_kind(dataset), self.objective, self.unet, own_stf, init=self.init is not None, data=self.data)
        for name, value in values.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.time_scale is None:
            self.time_scale = default_time_scale(self, dataset.shape)
        return self

    @property
    def unresolved(self) -> list[str]:
        return [name for name in RECIPE_SETTINGS if getattr(self, name) is None]

    def validate(self, where: str | None = None) -> TrainConfig:
        """Check ranges; raise :class:`~flowmatch.errors.SettingError` naming the setting (or, with
        ``where``, :class:`UserError` naming the setting in that file: a config.json read back is
        checked by the same rules). Unset recipe settings (None) are not checked."""

        def bad(name: str, expected: str, value) -> UserError:
            if where is not None:
                return UserError(f"{where}: setting {name!r}: expected {expected}, got {value!r}")
            return SettingError(name, f"expected {expected}, got {value!r}")

        hints = typing.get_type_hints(type(self))
        for name, hint in hints.items():  # every float setting (click's FLOAT accepts nan and inf)
            value = getattr(self, name)
            if float in typing.get_args(hint) + (hint,) and isinstance(value, float) and not math.isfinite(value):
                raise bad(name, "a finite number", value)
        for name, (ok, expected) in RANGES.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise bad(name, expected, value)
        if self.width % 2:  # the network's time embedding has width/2 sines and width/2 cosines
            raise bad("width", "an even number", self.width)
        for name, choices in CHOICES.items():
            if getattr(self, name) is not None and getattr(self, name) not in choices:
                raise bad(name, f"one of {', '.join(choices)}", getattr(self, name))
        if self.log_with is not None:
            import importlib.util

            if self.log_with not in TRACKERS:
                raise bad("log_with", f"one of {', '.join(TRACKERS)}", self.log_with)
            if importlib.util.find_spec(TRACKERS[self.log_with]) is None:
                raise SettingError("log_with", f"{self.log_with}: the {TRACKERS[self.log_with]} package is not installed "
                                               f"(pip install {TRACKERS[self.log_with]})")
        if interval_objective(self.objective):  # the straight path's average velocity, regressed with MSE
            for name, allowed in (("path", ("linear",)), ("loss", ("mse",)), ("sigma_min", (0.0,))):
                if getattr(self, name) not in allowed:
                    raise bad(name, f"{' or '.join(map(str, allowed))} with the {self.objective} objective",
                              getattr(self, name))
        if self.loss == "lpips-huber" and (self.perceptual is None or self.path != "linear"):
            what = "a TorchScript file (perceptual)" if self.perceptual is None else "the linear path"
            raise bad("loss", f"lpips-huber only with {what}", self.loss)
        if self.perceptual is not None and self.loss != "lpips-huber":
            raise bad("perceptual", "no file unless the loss is lpips-huber", self.perceptual)
        return self

    def amp(self, device) -> str:
        """The precision training runs at on ``device``: ``auto`` is bf16 autocast on a CUDA device
        with bfloat16 support (about twice the throughput of fp32 on recent GPUs, with fp32's range,
        so no loss scaling), else fp32 (a CPU without bfloat16 units would only emulate it)."""
        import torch

        if self.precision != "auto":
            return self.precision
        cuda = torch.device(device).type == "cuda"
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"

    def data_spec(self) -> dict:
        """The dataset spec that ``data`` (a name or a path) and the data settings describe."""
        from .data import spec_from_arg

        return spec_from_arg(self.data, self.n_points, self.seed, self.image_size, self.skip_bad, self.holdout,
                             self.cond_columns)

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

    def build_model(self, shape: tuple, num_classes: int = 0, path=None, cond_dim: int = 0):
        """The network for samples of ``shape``, initialised from ``seed`` (global random state
        untouched). Images the UNet cannot halve down to its lowest resolution are refused here,
        naming the data, before anything is written."""
        import torch

        from .models import make_model, network

        if len(shape) == 3 and network(self.model, shape) == "unet":
            from .models.unet import unet_settings

            _, h, w = shape
            factor = 2 ** (len(unet_settings(self.unet, min(h, w))["channels"]) - 1)
            if h % factor or w % factor:
                raise SettingError("data", f"{self.data}: images of {h}x{w} pixels do not fit the UNet, whose height and "
                                           f"width must be multiples of {factor}; crop or resize them (image folders: "
                                           f"`image_size`)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return make_model(self.model_spec(shape), shape, num_classes, path=path if path is not None else self.build_path(),
                              cond_dim=cond_dim)

    def build(self, data_spec: dict | None = None, dataset=None, teacher=None) -> Parts:
        """Everything these settings describe, each built once: the data set (from ``data_spec``,
        by default :meth:`data_spec`, unless ``dataset`` is given), then the settings left unset
        from the recipe for that data (:meth:`resolve`), the path, time sampler, coupling and
        network. With ``init``, ``teacher`` is that run loaded (:func:`flowmatch.runs.init_run`): the
        network takes its settings and starts from its weights. Bad input raises
        :class:`~flowmatch.errors.UserError` naming the setting."""
        from .data import make_dataset

        self.validate()
        if dataset is None:
            data_spec = data_spec if data_spec is not None else self.data_spec()
            dataset = make_dataset(data_spec)
        else:
            data_spec = data_spec if data_spec is not None else {}
        if self.init is not None:
            if teacher is None:
                raise SettingError("init", "build(teacher=...) takes the run to start from, loaded (flowmatch.runs.load_run); "
                                           "train() loads it")
            self._adopt(dataset, teacher)
        else:
            teacher = None
        self.resolve(dataset).validate()
        if self.hflip and len(dataset.shape) != 3:
            raise SettingError("hflip", f"flips training images left-right; {self.data} is not image data")
        if dataset.cond_dim and self.coupling == "ot" and self.ot_by_class:
            raise SettingError("ot_by_class", f"pairs within each class of labelled data; {self.data} has continuous conditions")
        if self.stf:
            self._check_stf(dataset)
        path, time_sampler, coupling = self.build_path(), self.build_time_sampler(), self.build_coupling()
        model = self.build_model(dataset.shape, dataset.num_classes, path, dataset.cond_dim)
        if teacher is not None:
            from .models import start_from

            start_from(model, teacher.model.state_dict(), f"init: {self.init}")
        return Parts(data_spec, dataset, path, time_sampler, coupling, model, None if teacher is None else teacher.model)

    def _adopt(self, dataset, teacher) -> None:
        """``init``: check that ``teacher`` (the run loaded) is a flow-matching run on the same data; its
        network's settings replace these (its weights must then fit)."""
        where = f"{self.init}"
        if teacher.cfg.objective != "cfm" or teacher.distilled:
            raise SettingError("init", f"{where} is a {teacher.cfg.objective} {teacher.lineage.get('kind', 'run')}; start "
                                       "from a flow-matching run (objective cfm), whose field the network begins as")
        if teacher.cfg.data != self.data or tuple(teacher.shape) != tuple(dataset.shape):
            raise SettingError("init", f"{where} was trained on {teacher.cfg.data} (samples {tuple(teacher.shape)}); "
                                       f"this run's data is {self.data} (samples {tuple(dataset.shape)})")
        if (teacher.num_classes, teacher.cond_dim) != (dataset.num_classes, dataset.cond_dim):
            raise SettingError("init", f"{where} has {teacher.num_classes} classes and {teacher.cond_dim} conditions; "
                                       f"the data has {dataset.num_classes} and {dataset.cond_dim}")
        spec = teacher.cfg.model_spec(teacher.shape) | {"model": teacher.cfg.model}
        for name in ("model", "unet", "width", "depth", "fourier", "fourier_scale", "time_scale", "prediction"):
            setattr(self, name, spec[name])
        self.film = teacher.cfg.film

    def _check_stf(self, dataset) -> None:
        """The stable target needs flow matching's conditional target, noise independent of the data
        (the posterior weights are Gaussian likelihoods) and a data set that draws extra points."""
        if self.objective == "shortcut":
            raise SettingError("stf", "averages the conditional velocity of flow matching and MeanFlow; the shortcut "
                                      "objective's targets are its own steps")
        if self.coupling != "independent":
            raise SettingError("stf", f"its posterior weights need noise drawn independently of the data; the {self.coupling} "
                                      "coupling pairs them")
        if not stable_target_possible(self, dataset):
            what = "streams image batches" if hasattr(dataset, "loader") else "has continuous conditions"
            raise SettingError("stf", f"draws its extra points from 2-D toys and tables (labels or none); {self.data} {what}")

    def model_spec(self, shape: tuple | None = None) -> dict:
        """The network's spec (``shape``: one sample's). ``prediction="auto"`` (runs written before
        the recipes) is "data" for vectors and "velocity" for images and few-step objectives."""
        prediction = self.prediction
        interval = interval_objective(self.objective)
        if prediction in ("auto", None):
            image = shape is not None and len(shape) == 3
            prediction = "velocity" if image or interval else "data"
        spec = {"name": self.model, "unet": self.unet, "width": self.width, "depth": self.depth,
                "time_scale": self.time_scale if self.time_scale is not None else default_time_scale(self, shape),
                "fourier": self.fourier or 0, "fourier_scale": self.fourier_scale, "prediction": prediction}
        return spec | ({"interval": True} if interval else {}) | ({"film": True} if self.film else {})

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


def read_settings_file(path) -> dict:
    """The settings of a TOML file (``train --config``): :class:`TrainConfig` field names at the
    top level (config.json's "train" keys), each of its field's type; unknown names and wrong
    types are refused in one line naming the file."""
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except OSError as e:
        raise SettingError("config", f"cannot read {path} ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    hints = typing.get_type_hints(TrainConfig)
    for key, value in d.items():
        if key not in hints:
            close = key.replace("-", "_")
            hint = f" (did you mean {close}?)" if close in hints else ""
            raise UserError(f"{path}: unknown setting {key!r}{hint}; expected names as in config.json's \"train\" "
                            f"(`print_config` lists them)")
        if not _type_ok(value, hints[key]):
            raise UserError(f"{path}: setting {key!r} should be {_type_name(hints[key])}, got {value!r}")
    return d


def settings_toml(cfg: TrainConfig) -> str:
    """``cfg`` as a TOML file that :func:`read_settings_file` reads back to the same settings
    (a setting left to its default that depends on the data or the objective, None, is a comment)."""
    import json

    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, dict) and not value:
            continue
        if value is None:
            lines.append(f"# {f.name}: unset (its default)")
        elif isinstance(value, bool):
            lines.append(f"{f.name} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{f.name} = {value!r}")
        else:  # str (JSON's escapes are TOML's basic-string escapes), dict (an inline table of them)
            lines.append(f"{f.name} = {json.dumps(value) if isinstance(value, str) else _inline_table(value)}")
    return "\n".join(lines) + "\n"


def _inline_table(d: dict) -> str:
    import json

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        return _inline_table(v) if isinstance(v, dict) else json.dumps(v)

    return "{" + ", ".join(f"{json.dumps(str(k))} = {val(v)}" for k, v in d.items() if v is not None) + "}"


#: teacher pairs per shard, by default
SHARD_SIZE = 4096


@dataclass
class StudentOptions:
    """What ``reflow`` and ``distill`` share: the teacher's pairs and the student's training
    (their command-line options are made from these fields)."""

    pairs: int | None = setting(None, "number of (noise, sample) pairs from the teacher. Default: 2000 for images, "
                                      "20000 for vectors")
    teacher_nfe: int | None = setting(None, "teacher NFE (fixed steps: midpoint if even, else Euler; 0: dopri5 at --tol; "
                                            "DDIM steps for diffusers). Default: 16 for images, dopri5 for vectors, "
                                            "50 DDIM steps")
    tol: float = setting(1e-5, "the teacher's dopri5 tolerance")
    steps: int | None = setting(None, "training steps of the student. Default: 500 for images, 4000 for vectors")
    lr: float = setting(5e-4, "peak learning rate of the student")
    batch_size: int | None = setting(None, "Default: 64 for images, 512 for vectors")
    seed: int = setting(0)
    shard_size: int = setting(SHARD_SIZE, "pairs per shard (each shard has its own seed)")
    loss: str = setting("mse", "mse, pseudo-huber (RF++; picks a side where mse averages two cells) or lpips-huber "
                               "(RF++'s t-weighted pseudo-Huber plus --perceptual on the data the prediction implies)")
    perceptual: str | None = setting(None, "loss lpips-huber: a TorchScript file (torch.jit.save) of a perceptual "
                                            "distance d(a, b) -> one value per image pair, e.g. LPIPS exported where its "
                                            "weights are (none ship here)")
    time_dist: str = setting("uniform", "reflow: the student's times, uniform or u-shaped (RF++: more weight near t = 0 and 1)")
    unet: str | None = setting(None, "the student's UNet preset for a diffusers teacher (auto, tiny, small, cifar); "
                                     "a flowmatch teacher's student keeps the teacher's network")
    k: int = setting(1, "distill: steps of the distilled sampler (1: one-step generator)")
    guidance: float | None = setting(None, "a class-conditional teacher: give each pair a class (each class equally often) and "
                                           "map its noise to that class with this classifier-free guidance weight (1: "
                                           "plain conditional); the student learns the classes. Default: 1.5 for a "
                                           "class-conditional teacher of images; otherwise unconditional pairs")
    null_share: float = setting(0.2, "pairs with classes: the share made for no class (the teacher's unconditional map), so "
                                     "that the student also samples without a label; 1: unconditional pairs only")
    teacher_null_class: int | None = setting(None, "a class-conditional diffusers teacher: the class index it was "
                                                   "trained to read as 'no class' (its other indices are the classes)")
    processes: int = setting(1, "local processes: pair shards and training are shared among them")
    plots: bool = setting(True, "write pictures at the end")

    def validate(self) -> StudentOptions:
        """Check the settings given (those left unset come from :meth:`resolve`); returns self."""
        expected = {"pairs": "a positive number of pairs", "k": "a positive number of steps", "lr": "a positive value"}
        for name in ("pairs", "steps", "lr", "batch_size", "shard_size", "k", "processes"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise SettingError(name, f"expected {expected.get(name, 'a positive integer')}, got {getattr(self, name)!r}")
        if self.teacher_nfe is not None and self.teacher_nfe < 0:
            raise SettingError("teacher_nfe", f"expected a positive integer (0: dopri5), got {self.teacher_nfe}")
        if self.time_dist not in ("uniform", "u-shaped"):
            raise SettingError("time_dist", f"expected uniform or u-shaped, got {self.time_dist!r}")
        if self.loss not in LOSSES:
            raise SettingError("loss", f"expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if (self.loss == "lpips-huber") != (self.perceptual is not None):
            raise (SettingError("loss", "lpips-huber needs a perceptual distance file (`perceptual`)") if self.perceptual is None
                   else SettingError("perceptual", f"used only with `loss` lpips-huber, got {self.loss}"))
        if not 0 <= self.null_share <= 1:
            raise SettingError("null_share", f"expected a share in [0, 1], got {self.null_share!r}")
        if self.guidance is not None and not math.isfinite(self.guidance):
            raise SettingError("guidance", f"expected a finite weight, got {self.guidance!r}")
        if self.teacher_null_class is not None and self.teacher_null_class < 0:
            raise SettingError("teacher_null_class", f"expected a class index >= 0, got {self.teacher_null_class}")
        if self.unet is not None and self.unet not in CHOICES["unet"]:
            raise SettingError("unet", f"expected one of {', '.join(CHOICES['unet'])}, got {self.unet!r}")
        return self

    def resolve(self, shape, num_classes: int = 0) -> StudentOptions:
        """A copy with the settings left unset (None) taken from :data:`STUDENT_RECIPES` for the
        teacher's samples of ``shape`` (images (C, H, W) or vectors); its guidance only for a teacher
        with ``num_classes``."""
        values = dict(STUDENT_RECIPES["image" if len(shape) == 3 else "vector"])
        if not num_classes:
            values.pop("guidance")
        return dataclasses.replace(self, **{k: v for k, v in values.items() if getattr(self, k) is None})


@dataclass
class Parts:
    """What a :class:`TrainConfig` builds (:meth:`TrainConfig.build`), and the data spec it read."""

    data_spec: dict
    dataset: typing.Any
    path: typing.Any
    time_sampler: typing.Any
    coupling: typing.Any
    model: typing.Any
    teacher: typing.Any = None  # ``init``: the run's network (frozen), whose field MeanFlow's own rows follow


SCHEDULES = ("constant", "cosine", "linear")
LOSSES = ("mse", "pseudo-huber", "lpips-huber")


def _positive(v) -> bool:
    return v > 0


#: the settings whose default is the recipe's for the data's kind and the objective (None: unset)
RECIPE_SETTINGS = ("steps", "batch_size", "lr", "fourier", "prediction", "stf", "coupling", "time_dist", "time_mean",
                   "meanflow_share", "meanflow_distill", "meanflow_distill_nfe")
#: objectives whose network takes the step's interval and generates in a few steps (their classes say so too:
#: :attr:`flowmatch.objectives.CFM.interval`)
def interval_objective(name: str) -> bool:
    """Whether objective ``name``'s network takes the step's interval and samples in a few steps
    (its class's :attr:`~flowmatch.objectives.CFM.interval`)."""
    from .objectives import objective_class

    return objective_class(name).interval
#: Every default that depends on the data and the objective, measured on that kind of data
#: (docs/results/defaults.md, docs/results/tables.md): "toy" the 2-D toys, "table" a user's table (.npy, .csv, .pt, .npz),
#: "image" image sets. Where the stable target cannot apply (a coupling other than independent,
#: continuous conditions, streamed images) flow matching trains on the plain target: WITHOUT_STF.
_FLOW = {"coupling": "independent", "time_dist": "uniform", "time_mean": 0.0, "meanflow_share": 0.25, "meanflow_distill": 0.0,
         "meanflow_distill_nfe": 16}
_MEANFLOW_VECTORS = {"steps": 5000, "batch_size": 256, "lr": 2e-3, "fourier": 64, "prediction": "data", "stf": 0,
                     "coupling": "ot", "time_dist": "logit-normal", "time_mean": 0.4, "meanflow_share": 0.25,
                     "meanflow_distill": 0.5, "meanflow_distill_nfe": 16}
_SHORTCUT_VECTORS = {**_FLOW, "steps": 4000, "batch_size": 512, "lr": 2e-3, "fourier": 64, "prediction": "velocity", "stf": 0}
_IMAGES = {"steps": 9000, "batch_size": 64, "lr": 2e-3, "fourier": 64, "prediction": "velocity", "stf": 0}
RECIPES = {
    ("toy", "cfm"): {**_FLOW, "steps": 3500, "batch_size": 512, "lr": 2e-3, "fourier": 64, "prediction": "data", "stf": 4096},
    # a smooth table's density has no edges to sharpen: Fourier features with data prediction left holes where
    # held-out rows fall (a 2-D Gaussian: held-out NLL 0.17 nats above its entropy, against 0.03 with these),
    # and the stable target's references are the table's own rows (docs/results/tables.md)
    ("table", "cfm"): {**_FLOW, "steps": 4000, "batch_size": 512, "lr": 2e-3, "fourier": 0, "prediction": "velocity", "stf": 0},
    ("image", "cfm"): {**_FLOW, **_IMAGES},
    ("toy", "meanflow"): _MEANFLOW_VECTORS,
    ("table", "meanflow"): _MEANFLOW_VECTORS,
    ("image", "meanflow"): {**_FLOW, **_IMAGES, "time_dist": "logit-normal", "time_mean": 0.4, "meanflow_share": 0.5},
    ("toy", "shortcut"): _SHORTCUT_VECTORS,
    ("table", "shortcut"): _SHORTCUT_VECTORS,
    ("image", "shortcut"): {**_FLOW, **_IMAGES},
}
WITHOUT_STF = {"stf": 0, "steps": 4000}
#: what a named data set changes in its kind's recipe. 28x28 digits (``mnist``): a step of the default UNet
#: takes about 1.2 s on 2 CPU cores, so the images' 9000 steps (measured on 8x8 digits) would take 3 hours;
#: 1500 steps (32 minutes) gave a teacher whose one-step student is within 1.06x of its 20-step Fréchet
#: distance, with and without a label (docs/results/one-step.md). Longer teachers are not measured here.
DATA_RECIPES = {("mnist", "cfm"): {"steps": 1500}}
#: ``init`` (a MeanFlow network started from a flow-matching run): what replaces the recipe. The run's field
#: gives the average velocity over any step along its trajectories, so every interval row comes from them
#: (no JVP: through the run's time embedding, t * 10000 on the MLP, its derivative is no target), on as many
#: rows as the batch, each trajectory 32 midpoint steps of the field (docs/results/one-step.md)
INIT_RECIPES = {"meanflow": {"steps": 4000, "meanflow_share": 0.0, "meanflow_distill": 1.0, "meanflow_distill_nfe": 64}}
#: ``reflow`` and ``distill`` by the teacher's data (docs/results/one-step.md). On 28x28 digits 2000 pairs of
#: 16 midpoint steps and 500 steps at batch 64 distilled a teacher to one step at 0.90x the Fréchet distance
#: of its own 20 Euler steps, in 16 minutes on 2 CPU cores (the vectors' settings would take hours there);
#: on the checkerboard 20000 dopri5 pairs and 4000 steps at batch 512 (docs/results/rectified.md).
#: ``teacher_nfe`` 0: dopri5 at the tolerance (a diffusers teacher's default stays its 50 DDIM steps).
#: ``guidance`` (a class-conditional teacher): on 28x28 digits pairs at guidance 1.5, a fifth of them without a
#: class, gave one student within 1.06x of the teacher's 20 steps unconditionally and 1.03x asked for a digit
#: (98.2% read as asked); unconditional pairs were better without a label (0.90x) but read 92.1% asked for one.
STUDENT_RECIPES = {"image": {"pairs": 2000, "teacher_nfe": 16, "steps": 500, "batch_size": 64, "guidance": 1.5},
                   "vector": {"pairs": 20000, "teacher_nfe": 0, "steps": 4000, "batch_size": 512, "guidance": None}}
#: the peak learning rate of a UNet preset that trains at its own (the 36 M-parameter preset at 2e-3: its loss
#: jumped from 0.46 to 1.05 in 200 steps on digits and stayed there)
LR_BY_UNET = {"cifar": 2e-4}


def data_kind(dataset) -> str:
    """The recipes' kind of a data set: "image" (samples (C, H, W)), "toy" (a 2-D toy) or "table"."""
    from .data import ToyDataset

    if len(dataset.shape) == 3:
        return "image"
    return "toy" if isinstance(dataset, ToyDataset) else "table"


def stable_target_possible(cfg: TrainConfig, dataset) -> bool:
    """Whether the stable target can apply: flow matching with noise independent of the data, on
    vectors held in memory, without continuous conditions (labels are fine: rows average within
    their class)."""
    return (cfg.objective == "cfm" and cfg.coupling in (None, "independent") and len(dataset.shape) == 1
            and not hasattr(dataset, "loader") and not dataset.cond_dim)


def recipe(kind: str, objective: str, unet: str = "auto", stable_target: bool = True, init: bool = False,
           data: str | None = None) -> dict:
    """The defaults of :data:`RECIPE_SETTINGS` for data of ``kind`` and ``objective`` (``unet``: the
    UNet preset, whose learning rate may be its own; ``stable_target``: whether it can apply; ``init``:
    started from a flow-matching run, :data:`INIT_RECIPES`; ``data``: the data set's name, whose
    :data:`DATA_RECIPES` entry applies)."""
    if (kind, objective) not in RECIPES:
        raise SettingError("objective", f"expected one of {', '.join(sorted({o for _, o in RECIPES}))}, got {objective!r}")
    values = (dict(RECIPES[(kind, objective)]) | DATA_RECIPES.get((data, objective), {})
              | (INIT_RECIPES.get(objective, {}) if init else {}))
    if values["stf"] and not stable_target:
        values.update(WITHOUT_STF)
    if kind == "image" and unet in LR_BY_UNET:
        values["lr"] = LR_BY_UNET[unet]
    return values


def default_time_scale(cfg: TrainConfig, shape) -> float:
    """The time embedding's scale: the notebook's t * 10000 for the MLP, diffusers' t * 1000 for
    the UNet, and t * 10 for few-step objectives in either (MeanFlow's interval is embedded like t;
    at t * 10000 its average velocity came out rough, one-step error 62% of the exact map's size on
    Gaussian data against 10% at t * 10; at the UNet's t * 1000 MeanFlow's d/dt u was 25x the
    velocity on digits and its one step failed)."""
    from .models import network

    if interval_objective(cfg.objective):
        return 10.0
    return 1000.0 if network(cfg.model, shape) == "unet" else 10000.0


#: each setting's range (None: unset, fine), checked in this order
RANGES = {
    **{name: (_positive, "a positive value") for name in ("steps", "batch_size", "lr", "log_every", "checkpoint_every",
                                                          "width", "depth", "grad_accum", "processes", "time_steps",
                                                          "image_size", "meanflow_distill_every",
                                                          "meanflow_distill_pairs")},
    "n_points": (lambda v: v >= 2, "an integer >= 2"),
    "eval_every": (lambda v: v >= 0, "a number of steps >= 0 (0: never)"),
    "eval_n": (lambda v: v >= 10, "an integer >= 10"),
    "eval_nfe": (_positive, "a positive number of steps"),
    "workers": (lambda v: v >= 0, "a count >= 0"),
    "fourier": (lambda v: v >= 0, "a count >= 0"),
    "stf": (lambda v: v >= 0, "a count >= 0"),
    "fourier_scale": (_positive, "a positive value"),
    "time_scale": (_positive, "a positive value"),
    "warmup_steps": (lambda v: v >= 0, "a value >= 0"),
    "weight_decay": (lambda v: v >= 0, "a value >= 0"),
    "grad_clip": (lambda v: v >= 0, "a value >= 0 (0: no clipping)"),
    "adam_beta2": (lambda v: 0 < v < 1, "a value in (0, 1)"),
    "ema_decay": (lambda v: 0 <= v < 1, "a value in [0, 1)"),
    "label_dropout": (lambda v: 0 <= v < 1, "a value in [0, 1)"),
    "holdout": (lambda v: 0 <= v <= 0.5, "a share in [0, 0.5]"),
    "ot_reg": (_positive, "a positive value"),
    "meanflow_share": (lambda v: 0 <= v <= 1, "a share in [0, 1]"),
    "meanflow_power": (lambda v: v >= 0, "a value >= 0"),
    "meanflow_to_data": (lambda v: 0 <= v <= 1, "a share in [0, 1]"),
    "meanflow_distill": (lambda v: 0 <= v <= 1, "a share in [0, 1]"),
    "meanflow_distill_whole": (lambda v: 0 <= v <= 1, "a share in [0, 1]"),
    "meanflow_distill_start": (lambda v: 0 <= v < 1, "a share in [0, 1)"),
    "meanflow_distill_nfe": (lambda v: v >= 2 and v % 2 == 0, "an even number >= 2 (midpoint: two evaluations a step)"),
    "shortcut_share": (lambda v: 0 <= v <= 1, "a share in [0, 1]"),
    "shortcut_steps": (lambda v: v >= 2 and v & (v - 1) == 0, "a power of 2 >= 2"),
    "huber_c": (_positive, "a positive value"),
}
#: the settings that name one of a few choices
CHOICES = {"ot_method": ("exact", "sinkhorn"), "objective": ("cfm", "meanflow", "shortcut"),
           "meanflow_tangent": ("conditional", "model"), "meanflow_fm_time": ("paired", "single"),
           "prediction": ("velocity", "data", "auto"), "coupling": ("independent", "ot", "fixed"),
           "path": ("linear", "vp", "cosine"), "time_dist": ("uniform", "logit-normal", "u-shaped", "grid"),
           "model": ("auto", "mlp", "unet"), "loss": LOSSES, "schedule": SCHEDULES, "unet": ("auto", "tiny", "small", "cifar"),
           "precision": ("auto", "fp32", "bf16", "fp16")}
#: --log-with: accelerate's tracker name -> the package it needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# Settings added after runs were first written, with the value that reproduces those runs.
LEGACY = {"fourier": 0, "fourier_scale": 1.0, "film": False, "stf": 0, "time_scale": 10000.0, "prediction": "velocity", "loss": "mse",
          "huber_c": None, "perceptual": None, "meanflow_tangent": "conditional", "meanflow_fm_time": "paired",
          "meanflow_distill": 0.0, "meanflow_to_data": 0.0}


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


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """EMA decay after optimizer step ``step`` (0-based): ``ema_decay``, warmed up as ``(1 + step)
    / (10 + step)`` so the first steps' weights do not linger in the average."""
    return min(cfg.ema_decay, (1 + step) / (10 + step))


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
