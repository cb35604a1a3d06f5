"""What watches a training run: its directory, its measures and its trackers.

:class:`~flowmatch.training.Trainer` optimises; it calls a :class:`RunMonitor` at fixed points of
its loop (a log step, a checkpoint, an evaluation step, a SIGTERM stop) and the monitor does
the rest: metrics.jsonl, the checkpoint files, eval.jsonl (:class:`TrainingEval`), the progress
grids, accelerate's trackers and the user's ``on_checkpoint`` callback. The time spent in the
evaluations, the trackers' pictures and the callback is left out of the ``time`` logged in
metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .config import TrainConfig
from .files import append_line
from .runs import read_metrics, save_state, save_weights, write_text


class RunMonitor:
    """The run directory's and the trackers' side of a training run. Every process calls each
    method alike (:meth:`log` and :meth:`open` reach accelerate, which logs from the main process
    only); only the main process writes files, measures or calls ``on_checkpoint``.

    The order of the calls: :meth:`open` (before training, or resuming, at ``step``), :meth:`start`
    (the clock of the logged training time), then any of :meth:`log`, :meth:`save`,
    :meth:`after_checkpoint`, :meth:`evaluate`, and :meth:`close` once the loop is done."""

    def __init__(self, cfg: TrainConfig, out, accelerator, on_checkpoint=None):
        """``on_checkpoint(step, ema_model)``: called on the main process after each checkpoint."""
        self.cfg, self.out, self.accelerator, self.on_checkpoint = cfg, Path(out), accelerator, on_checkpoint
        self.main, self.device = accelerator.is_main_process, accelerator.device
        self.measure = None  # the TrainingEval of eval_every, made at the first evaluation
        self.t_start = time.perf_counter()

    def open(self, step: int) -> None:
        """Before the loop: the log lines written after ``step`` (the checkpoint resumed from) dropped,
        the trackers started with the settings as their run configuration."""
        if self.main:
            _truncate_metrics(self.out / "metrics.jsonl", step)
            _truncate_metrics(self.out / "eval.jsonl", step, value=None)
        if self.cfg.log_with:  # accelerate's trackers log from the main process only
            self.accelerator.init_trackers("tracking", config=_hparams(self.cfg))

    def start(self) -> None:
        """The logged training time starts now (the trainer calls it once it is prepared)."""
        self.t_start = time.perf_counter()

    def log(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        """A log step: the mean loss (over every process's parts) and gradient norm since the last
        line, and the learning rate, to the trackers; a line of metrics.jsonl with the training time."""
        if self.cfg.log_with:
            self.accelerator.log({"loss": loss, "lr": lr, "grad_norm": grad_norm}, step=step)
        if self.main:
            _append_metrics(self.out / "metrics.jsonl", {"step": step, "loss": loss, "lr": lr,
                                                         "time": round(time.perf_counter() - self.t_start, 3)})

    def save(self, state: dict) -> None:
        """A checkpoint: the trainer's :meth:`~flowmatch.training.Trainer.state_dict` into
        trainer_state.pt, then its weights into model.safetensors and ema.safetensors (each file
        atomically; main process)."""
        if not self.main:
            return
        save_state(self.out / "trainer_state.pt", state)
        save_weights(self.out / "model.safetensors", state["model"], {"step": state["step"]})
        save_weights(self.out / "ema.safetensors", state["ema"], {"step": state["step"]})

    def after_checkpoint(self, step: int, ema, dataset) -> None:
        """What follows a checkpoint on the main process: the image progress grid (``plots``), the
        trackers' picture of EMA samples and the ``on_checkpoint`` callback (the last two left out of
        the logged training time)."""
        if not self.main:
            return
        if len(dataset.shape) == 3 and self.cfg.plots:
            _progress_grid(ema, self.cfg, dataset, self.out, step, self.device)
        if self.cfg.log_with:
            paused = time.perf_counter()
            _track_samples(self.accelerator, ema, self.cfg, dataset, step, self.device)
            self.t_start += time.perf_counter() - paused  # not training time
        if self.on_checkpoint is not None:
            paused = time.perf_counter()
            self.on_checkpoint(step, ema)
            self.t_start += time.perf_counter() - paused

    def evaluate(self, step: int, ema, dataset) -> None:
        """An ``eval_every`` step: the EMA network's measures (:class:`TrainingEval`) into eval.jsonl
        and the trackers (main process); their time is left out of the logged training time."""
        if not self.main:
            return
        paused = time.perf_counter()
        from .data import EMBEDDED_IMAGES

        cfg = self.cfg
        if self.measure is None:
            name = cfg.data if cfg.data in EMBEDDED_IMAGES else None
            self.measure = TrainingEval(dataset, name, cfg.eval_n, cfg.eval_nfe, cfg.seed)
        sample = lambda x0: _ema_samples(ema, cfg, dataset, x0, cfg.eval_nfe)  # noqa: E731
        measures = {k: (x if math.isfinite(x) else None) for k, x in self.measure(sample, self.device).items()}  # strict JSON
        row = {"step": step, "n": cfg.eval_n, "nfe": cfg.eval_nfe, **measures}
        _append_metrics(self.out / "eval.jsonl", row | {"seconds": round(time.perf_counter() - paused, 2)})
        if cfg.log_with:
            self.accelerator.log({f"eval/{k}": x for k, x in measures.items() if x is not None}, step=step)
        self.t_start += time.perf_counter() - paused  # not training time

    def close(self) -> None:
        """After the loop: the trackers finish."""
        if self.cfg.log_with:
            self.accelerator.end_training()


@torch.inference_mode()
def _progress_grid(ema, cfg, dataset, out: Path, step: int, device) -> None:
    """Images over training: 36 EMA samples (20 Euler steps, fixed noise) per checkpoint."""
    from .plots import image_grid

    x = _ema_samples(ema, cfg, dataset, _fixed_noise(36, dataset, device), 20).clamp(0, 1)
    (out / "progress").mkdir(exist_ok=True)
    image_grid(x, out / "progress" / f"step-{step:07d}.png", nrow=6, title=f"step {step}")


class TrainingEval:
    """What ``train --eval-every N`` measures of the EMA network every N steps: ``n`` samples from
    fixed noise (``nfe`` Euler steps) against a fixed draw of real data. Digits and mnist: the
    Fréchet distances and their floors (:func:`~flowmatch.image_metrics.image_scores`); other data:
    W2 against the real draw, its floor (a second real draw) and the ratio, and the sharpness
    measures (:func:`~flowmatch.metrics.sharpness`, vectors only). The real draws are made once, at the first call."""

    def __init__(self, dataset, data_name: str | None, n: int = 1000, nfe: int = 20, seed: int = 0):
        self.dataset, self.data_name, self.n, self.nfe, self.seed = dataset, data_name, n, nfe, seed
        self.refs = None

    @torch.inference_mode()
    def __call__(self, sample, device) -> dict:
        """The measures of ``sample(x0)`` (noise in model space -> samples in data units, ``nfe``
        Euler steps), flat: ``{"w2": .., "ratio": ..}``."""
        from .metrics import sharpness, toy_name, w2
        from .seeding import generator

        x = sample(_fixed_noise(self.n, self.dataset, device, self.seed)).float().cpu()
        if self.data_name is not None:  # the embedded digit sets: the measures their evaluation uses
            from .image_metrics import image_scores

            s = image_scores(x.clamp(0, 1), self.data_name, self.seed, floor_draws=2)
            return {"fd_ratio": s["classifier"]["ratio"], "pca_fd_ratio": s["pca"]["ratio"],
                    "precision": s["prdc"]["precision"]["value"], "recall": s["prdc"]["recall"]["value"]}
        if self.refs is None:
            g = generator(self.seed, "reference", 0, device=device)
            self.refs = [self.dataset.reference(self.n, g).float().cpu() for _ in range(2)]
            self.floor = w2(*self.refs)
        images = len(self.dataset.shape) == 3
        if images:
            x = x.clamp(0, 1)
        d = w2(x, self.refs[0])
        out = {"w2": d, "floor": self.floor, "ratio": d / self.floor}
        return out if images else out | sharpness(x, self.refs[0], toy_name(self.dataset))


@torch.inference_mode()
def _ema_samples(ema, cfg: TrainConfig, dataset, x0: torch.Tensor, nfe: int) -> torch.Tensor:
    """The EMA network's samples (data units) from noise ``x0`` by ``nfe`` Euler steps of its field,
    or, for a one-step objective, of its average velocity over each step (as :class:`~flowmatch.runs.Run`
    samples them): the progress grids, the trackers' pictures and ``--eval-every`` all draw here."""
    from .objectives import objective_class
    from .solvers import flow_map, integrate

    if objective_class(cfg.objective).interval:  # a few-step network: its own sampler
        return dataset.decode(flow_map(lambda x, t, h: ema(x, t, h=h), x0, nfe).x).float()
    return dataset.decode(integrate(lambda x, t: ema(x, t), x0, "euler", nfe).x).float()


def _fixed_noise(n: int, dataset, device, seed: int = 0) -> torch.Tensor:
    """The same noise at every checkpoint (the sampling noise of ``seed``'s first batch), so pictures
    and measures over training show one set of samples change."""
    from .seeding import noise

    return noise(seed, 0, n, dataset.shape, device)


def _hparams(cfg: TrainConfig) -> dict:
    """The settings as a tracker's run configuration (scalars and strings; None as "none")."""
    return {k: ("none" if v is None else v) for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}


@torch.inference_mode()
def _track_samples(accelerator, ema, cfg, dataset, step: int, device) -> None:
    """EMA samples at a checkpoint (32 Euler steps, fixed noise) as a picture for the trackers that
    take images: a 6x6 grid of images, or a scatter of the first two coordinates of 2000 vectors."""
    import numpy as np

    from .plots import figure_array

    images = len(dataset.shape) == 3
    x = _ema_samples(ema, cfg, dataset, _fixed_noise(36 if images else 2000, dataset, device), 32).cpu()
    if images:
        c, h, w = dataset.shape
        grid = x.clamp(0, 1).reshape(6, 6, c, h, w).permute(0, 3, 1, 4, 2).reshape(6 * h, 6 * w, c).numpy()
        picture = (grid.repeat(3, axis=2) if c == 1 else grid) * 255
    else:
        picture = figure_array(x, f"step {step}")
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_images"):
            tracker.log_images({"samples": picture.astype(np.uint8)}, step=step, dataformats="HWC")


def _append_metrics(path: Path, row: dict) -> None:
    append_line(path, json.dumps(row) + "\n")  # a line that does not fit (a full disk) is taken back whole


def _truncate_metrics(path: Path, step: int, value: str | None = "loss") -> None:
    """On resume, drop log lines written after the checkpoint being resumed from."""
    if not path.exists():
        return
    keep = [row for row in read_metrics(path, value) if row["step"] <= step]
    write_text(path, "".join(json.dumps(row) + "\n" for row in keep))
