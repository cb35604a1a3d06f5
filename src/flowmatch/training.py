"""The training loop: conditional flow matching on accelerate.

Reads top to bottom: build data, path, time sampler, coupling and network from a
:class:`~flowmatch.config.TrainConfig`; each step draws data ``x1``, noise ``x0`` and times
``t``, pairs them, and regresses the path's velocity ``u_t`` at ``x_t`` with MSE; AdamW,
warm-up and schedule, optional clipping, EMA; a checkpoint every ``checkpoint_every``
steps that resumes bit-exactly on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .config import Parts, TrainConfig, ema_decay_at, lr_at
from .errors import EnvironmentFault, SettingError, Stopped, UserError, sigterm_stops, stop_requested
from .files import append_line
from .objectives import cfm_loss, make_objective  # noqa: F401 (cfm_loss: public here too)
from .runs import (
    FORMAT_VERSION,
    RunLock,
    dataset_from_doc,
    load_state,
    load_weights,
    read_config,
    read_metrics,
    save_state,
    save_weights,
    write_json,
    write_text,
)


def default_run_dir(cfg: TrainConfig, root: str = "runs") -> Path:
    name = Path(cfg.data).stem if cfg.data not in ("",) else "run"
    base = Path(root) / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    out, k = base, 1
    while out.exists():
        out, k = Path(f"{base}-{k}"), k + 1
    return out


def check_run_dir(out, resume: bool) -> None:
    """What ``train`` checks of its run directory before starting (also in a launcher)."""
    out = Path(out)
    if resume:
        read_config(out)
        load_state(out / "trainer_state.pt")
    else:
        check_new_run_dir(out)


def check_new_run_dir(out: Path, allow_existing=()) -> None:
    """A new run goes into a missing or empty folder (``allow_existing`` names entries it may hold)."""
    if out.exists() and (not out.is_dir() or any(p.name not in allow_existing for p in out.iterdir())):
        raise SettingError("out", f"{out} already exists; choose a new directory, or `resume` to continue it")


def train(cfg: TrainConfig | None, out: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
          parts: Parts | None = None, allow_existing=(), on_checkpoint=None, steps: int | None = None) -> Path:
    """Train (or resume) a run; returns its directory. Bad input raises :class:`UserError`
    before anything is written. With ``resume`` the saved settings are used (``cfg`` is
    ignored) and ``steps``, if given, becomes the new total number of steps (recorded in
    config.json). ``parts``: what ``cfg.build(...)`` returned, when the caller has built it
    already (the command line, to check its input; reflow, on its pairs). ``allow_existing``
    names entries that a new run directory may already hold (the pairs of a reflow run).
    ``on_checkpoint(step, ema_model)`` is called on the main process after each checkpoint
    (evaluation during training); its time is left out of the ``time`` logged in metrics.jsonl."""
    from accelerate import Accelerator

    if resume:
        cfg, parts, out, saved, state = _resumed(out, steps)
    else:
        parts = parts or cfg.build()  # everything that can fail on bad input, before the run directory is touched
        out, saved, state = Path(out) if out is not None else default_run_dir(cfg), None, None
        check_new_run_dir(out, allow_existing)
        if cfg.init_from:
            _init_from(parts.model, cfg.init_from)
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise SettingError("precision", "fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    if cfg.precision == "bf16" and not torch.cuda.is_available() and not cpu_has_bf16():
        warnings.warn("precision bf16: this CPU has no bfloat16 units (AMX or AVX512-BF16), so autocast emulates them; "
                      "expect training many times slower than fp32 (measured: 20x on an AVX2 CPU)", stacklevel=2)
    # Mixed precision is torch.autocast (+ a GradScaler for fp16) rather than accelerate's
    # process-wide setting, so runs of different precision can follow each other in one process.
    tracking = {"log_with": cfg.log_with, "project_dir": str(out)} if cfg.log_with else {}
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available(), **tracking)
    if resume:  # the run's global batch, shared among however many processes resume it
        saved = _share_global_batch(cfg, saved, accelerator.num_processes)
    trainer = Trainer(cfg, parts, accelerator, out, progress, on_checkpoint)
    if state is not None:
        trainer.load(state)
    main = accelerator.is_main_process
    fresh = main and not resume and not out.exists()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    with RunLock(out, new_run=None if resume else allow_existing) if main else contextlib.nullcontext():
        try:
            if main:
                if not resume:
                    write_json(out / "config.json", _config_doc(cfg, parts, accelerator))
                elif saved["train"] != cfg.to_dict():  # a new total of steps, another process count
                    write_json(out / "config.json", saved | {"train": cfg.to_dict()})
                if resume:
                    _remove_stale_temporaries(out)
                _truncate_metrics(out / "metrics.jsonl", trainer.step)
                _truncate_metrics(out / "eval.jsonl", trainer.step, value=None)
            if cfg.log_with:  # accelerate's trackers log from the main process only
                accelerator.init_trackers("tracking", config=_hparams(cfg))
            trainer.run()
            if cfg.log_with:
                accelerator.end_training()
        except BaseException as e:
            if main and not resume and not (out / "trainer_state.pt").exists():
                _remove_unfinished(out, fresh)  # no checkpoint yet: leave nothing behind that blocks --out
            if isinstance(e, EnvironmentFault):  # a full disk: what is kept, and how to go on
                kept = (f"the checkpoint {out} held is intact: make room, then run the same command with `resume`"
                        if (out / "trainer_state.pt").exists() else "no checkpoint was written, so nothing is kept")
                raise EnvironmentFault(f"{e}; {kept}") from None
            raise
    if main and cfg.plots:
        from .plots import plot_run

        plot_run(out)
    accelerator.wait_for_everyone()
    return out


def _resumed(out, steps: int | None):
    """A run to continue: its settings (``steps``: the new total), parts, directory, saved
    config.json and trainer state; a damaged log is refused before anything is rewritten."""
    if out is None:
        raise SettingError("resume", "needs `out`, the run directory to continue")
    out = Path(out)
    saved = read_config(out)
    cfg = TrainConfig.from_dict(saved["train"])
    state = load_state(out / "trainer_state.pt")
    read_metrics(out / "metrics.jsonl")
    if steps is not None:
        check_new_total(steps, int(state["step"]), out)
        cfg.steps = steps
    parts = cfg.build(saved["data"], dataset=dataset_from_doc(saved, str(out / "config.json")))
    return cfg, parts, out, saved, state


def _share_global_batch(cfg: TrainConfig, saved: dict, processes: int) -> dict:
    """A run resumed on ``processes`` processes keeps its global batch (a step's draws depend on it,
    not on how it is shared): each process takes its share. Returns config.json's new contents."""
    total = saved.get("global_batch_size", cfg.batch_size * saved.get("num_processes", 1) * cfg.grad_accum)
    if total % (processes * cfg.grad_accum):
        raise SettingError("processes", f"the run's global batch of {total} does not split into {processes} processes "
                                        f"x {cfg.grad_accum} micro-batches; resume it on a process count that divides it")
    cfg.batch_size, cfg.processes = total // (processes * cfg.grad_accum), processes
    return saved | {"num_processes": processes, "global_batch_size": total}


def _config_doc(cfg: TrainConfig, parts: Parts, accelerator) -> dict:
    """config.json of a new run: its settings, data, sample shape and processes."""
    return {
        "format_version": FORMAT_VERSION,
        "flowmatch_version": __version__,
        # the time scale the network was built with, as a number: its default has changed
        "train": cfg.to_dict() | {"time_scale": cfg.model_spec(parts.dataset.shape)["time_scale"]},
        "data": parts.data_spec | parts.dataset.spec,
        "shape": list(parts.dataset.shape),
        "num_classes": parts.dataset.num_classes,
        **({"cond_dim": parts.dataset.cond_dim} if parts.dataset.cond_dim else {}),
        "global_batch_size": cfg.batch_size * accelerator.num_processes * cfg.grad_accum,
        "num_processes": accelerator.num_processes,
    }


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AMX or AVX512-BF16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown: no warning


def _init_from(model, weights_file: str) -> None:
    weights = load_weights(weights_file)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{weights_file}: weights do not fit the student network ({str(e).splitlines()[0][:100]})") from None


class Trainer:
    """The training loop's state and its named steps: :meth:`optimisation_step`, :meth:`log_line`,
    :meth:`checkpoint`; :meth:`run` strings them together. On one process it is plain PyTorch
    (AdamW, autocast, clipping, an EMA); on several, accelerate wraps the model in DDP."""

    def __init__(self, cfg: TrainConfig, parts: Parts, accelerator, out: Path, progress: bool = True, on_checkpoint=None):
        self.cfg, self.accelerator, self.out, self.on_checkpoint = cfg, accelerator, Path(out), on_checkpoint
        self.device, self.main = accelerator.device, accelerator.is_main_process
        self.dataset = parts.dataset.to(self.device)
        self.objective = make_objective(cfg, parts)
        self.model = parts.model.to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        # fused AdamW: one kernel for all parameters (about 1.5x the steps/s of foreach on 2 CPU cores)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                                     weight_decay=cfg.weight_decay, fused=True)
        # A step's draws (data rows, noise, times, pairing) are those of the whole global batch, from the
        # step's own generator (seed, step): every process draws them alike and keeps its parts, so the
        # same seed and global batch train the same run on any number of processes and micro-batches.
        self.parts = accelerator.num_processes * cfg.grad_accum
        self.global_batch = cfg.batch_size * self.parts
        self.precision = cfg.amp(self.device)  # --precision auto: bf16 on CUDA devices that support it, else fp32
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0
        self.running = torch.zeros((), device=self.device)  # summed step losses since the last log line
        self.running_norm = torch.zeros((), device=self.device)  # summed gradient norms (before clipping), the same
        self.bad_step = torch.full((), -1, device=self.device, dtype=torch.long)  # first non-finite step, or -1
        self.last_log, self.progress = 0, progress
        self.checkpointed = None  # the step of the last checkpoint written or resumed from
        self.stop_group = None  # several processes: where they agree on a SIGTERM (prepare)

    def load(self, state: dict) -> None:
        """Continue from a checkpoint (:meth:`checkpoint`) exactly, on any number of processes: a
        step's draws depend on the seed, the step and the global batch only."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = self.last_log = self.checkpointed = int(state["step"])
        if "log" in state:  # the losses summed since the last log line (a checkpoint between two lines)
            self.last_log = int(state["log"]["last_log"])
            self.running.fill_(float(state["log"]["running"]))
            self.running_norm.fill_(float(state["log"]["running_norm"]))
        if "dataset" in state and hasattr(self.dataset, "load_state_dict"):
            self.dataset.load_state_dict(state["dataset"])
        self.objective.load_state_dict(state.get("objective", {}))

    def prepare(self) -> None:
        """What the loop needs before its first :meth:`optimisation_step` (``run`` calls it;
        benchmarks that time single steps call it too)."""
        if self.accelerator.num_processes > 1:  # DDP; one process trains the bare module (no wrapper overhead)
            self.model, self.opt = self.accelerator.prepare(self.model, self.opt)
        self.raw = self.accelerator.unwrap_model(self.model)
        self.forward = torch.compile(self.model) if self.cfg.compile else self.model  # the loss only
        self.params, self.ema_params = list(self.raw.parameters()), list(self.ema.parameters())
        if self.accelerator.num_processes > 1 and self.stop_group is None:
            import torch.distributed as dist

            # the per-step SIGTERM agreement is a CPU all-reduce (gloo): no wait on the device's queue
            self.stop_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.next_batch = self.batch_source()

    def run(self) -> None:
        """The loop. SIGTERM (a scheduler's preemption) is honoured between two steps: a checkpoint
        at the current step, then :class:`~flowmatch.errors.Stopped` (``resume`` continues exactly)."""
        with sigterm_stops():  # before prepare: DataLoader workers forked later inherit the handler
            self._run()

    def _run(self) -> None:
        cfg = self.cfg
        self.prepare()
        self.t_start = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.main and self.progress), desc="train",
                   dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                if self.stop_agreed():
                    bar.close()
                    self.stop()
                loss, lr = self.optimisation_step()
                bar.update(1)
                done = self.step
                if done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    _check_finite(self.reduced(self.bad_step, "max"), self.out)  # one host sync per log, not per step
                    if done % cfg.log_every == 0 or done == cfg.steps:
                        self.log_line(lr, bar)
                    if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                        self.checkpoint()
                if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps) and self.main:
                    self.evaluate()
        finally:
            self.next_batch = None  # stops the DataLoader's workers
        bar.close()

    def stop_agreed(self) -> bool:
        """Whether SIGTERM asked the run to stop, agreed by every process: one asked, all stop at this
        step (and checkpoint it together)."""
        asked = stop_requested()
        if self.accelerator.num_processes == 1:
            return asked
        import torch.distributed as dist

        flag = torch.tensor([int(asked)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.stop_group)
        return bool(flag.item())

    def stop(self) -> None:
        """SIGTERM: a checkpoint at the current step (unless one was just written), then :class:`Stopped`."""
        if self.checkpointed != self.step:
            _check_finite(self.reduced(self.bad_step, "max"), self.out)
            _save_checkpoint(self, self.step)
        raise Stopped(f"stopped by SIGTERM at step {self.step} of {self.cfg.steps}; {self.out} holds its checkpoint: "
                      "run the same command with `resume` to continue")

    def batch_source(self):
        """Where a step's global batch comes from (``next_batch(generator)``). Images: the dataset's
        DataLoader, whose draw ``s`` (step ``s``'s batch) is a pure function of (seed, s)
        (data/loader.py), so a resumed run restarts the stream at its checkpoint's step and workers
        prefetch ahead. Other data: drawn from the step's generator, first of its draws."""
        if not hasattr(self.dataset, "loader"):
            return lambda gen: self.dataset.sample(self.global_batch, gen)
        stream = self.dataset.loader(self.global_batch, seed=self.cfg.seed, start=self.step, hflip=self.cfg.hflip,
                                     workers=self.cfg.workers)
        return lambda gen: next(stream)

    def optimisation_step(self) -> tuple[torch.Tensor, float]:
        """One step: the learning rate, the global batch's draws, this process's ``grad_accum``
        parts of it (gradients all-reduced on the last only), clipping, AdamW, the EMA. Returns
        the step's mean loss over this process's parts (on the device: no host sync) and its
        learning rate."""
        from .seeding import generator

        cfg, processes = self.cfg, self.accelerator.num_processes
        lr = lr_at(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        self.objective.refresh(self.ema, self.step, cfg.steps, self.dataset, cfg.seed, self.device)  # MeanFlow's own rows
        gen = generator(cfg.seed, "train", self.step, device=self.device)
        drawn = self.objective.draw(self.next_batch(gen), gen, self.parts)
        for micro in range(cfg.grad_accum):
            part = drawn.part(micro * processes + self.accelerator.process_index, self.parts)
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last or processes == 1 else self.accelerator.no_sync(self.model):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.objective.loss(self.forward, part)
                self.scaler.scale(loss / cfg.grad_accum).backward()  # / 1 is exact
            step_loss = step_loss + loss.detach()
        if cfg.grad_clip is not None or cfg.log_with:
            self.scaler.unscale_(self.opt)
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip or float("inf"))
            self.running_norm += norm.detach()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        loss = step_loss / cfg.grad_accum  # the step's mean loss
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss), self.step + 1, self.bad_step)
        self.running += loss
        decay = ema_decay_at(cfg, self.step)
        with torch.no_grad():  # one foreach call over all parameters
            torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
        self.step += 1
        return loss, lr

    def reduced(self, x: torch.Tensor, how: str) -> torch.Tensor:
        """``x`` reduced over the processes (``how``: mean or max), or ``x`` on one process."""
        if self.accelerator.num_processes == 1:
            return x
        return self.accelerator.reduce(x, how) if how != "max" else self.accelerator.gather(x[None]).amax(0)

    def log_line(self, lr: float, bar=None) -> None:
        """The mean loss since the last line over every process's parts (the whole global batch's
        loss), into metrics.jsonl (main process) and the bar."""
        steps = max(1, self.step - self.last_log)
        running = self.reduced(self.running, "mean")
        mean_loss, mean_norm = (running / steps).item(), (self.running_norm / steps).item()
        self.running.zero_(), self.running_norm.zero_()
        self.last_log = self.step
        if self.cfg.log_with:
            self.accelerator.log({"loss": mean_loss, "lr": lr, "grad_norm": mean_norm}, step=self.step)
        if self.main:
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            _append_metrics(self.out / "metrics.jsonl", {"step": self.step, "loss": mean_loss, "lr": lr,
                                                         "time": round(time.perf_counter() - self.t_start, 3)})

    def evaluate(self) -> None:
        """``--eval-every``: the EMA network's measures (:class:`~flowmatch.metrics.TrainingEval`)
        into RUN/eval.jsonl and the trackers; their time is left out of the logged training time."""
        from .data import EMBEDDED_IMAGES

        paused = time.perf_counter()
        if not hasattr(self, "measure"):
            name = self.cfg.data if self.cfg.data in EMBEDDED_IMAGES else None
            self.measure = TrainingEval(self.dataset, name, self.cfg.eval_n, self.cfg.eval_nfe, self.cfg.seed)
        sample = lambda x0: _ema_samples(self.ema, self.cfg, self.dataset, x0, self.cfg.eval_nfe)  # noqa: E731
        measures = {k: (x if math.isfinite(x) else None) for k, x in self.measure(sample, self.device).items()}  # strict JSON
        row = {"step": self.step, "n": self.cfg.eval_n, "nfe": self.cfg.eval_nfe, **measures}
        _append_metrics(self.out / "eval.jsonl", row | {"seconds": round(time.perf_counter() - paused, 2)})
        if self.cfg.log_with:
            self.accelerator.log({f"eval/{k}": x for k, x in measures.items() if x is not None}, step=self.step)
        self.t_start += time.perf_counter() - paused  # not training time

    def checkpoint(self) -> None:
        """Trainer state and weights (atomically), the image progress grid, the callback (whose
        time is left out of the logged training time)."""
        _save_checkpoint(self, self.step)
        if self.main and len(self.dataset.shape) == 3 and self.cfg.plots:
            _progress_grid(self.ema, self.cfg, self.dataset, self.out, self.step, self.device)
        if self.main and self.cfg.log_with:
            paused = time.perf_counter()
            _track_samples(self.accelerator, self.ema, self.cfg, self.dataset, self.step, self.device)
            self.t_start += time.perf_counter() - paused  # not training time
        if self.main and self.on_checkpoint is not None:
            paused = time.perf_counter()
            self.on_checkpoint(self.step, self.ema)
            self.t_start += time.perf_counter() - paused


def _check_finite(bad_step, out):
    b = int(bad_step.item())
    if b >= 0:
        kept = (f"the last good checkpoint in {out} is kept" if (out / "trainer_state.pt").exists()
                else "no checkpoint was written, so nothing is kept")
        raise UserError(f"training diverged: the loss was NaN or Inf at step {b}; {kept} "
                        "(lower `lr` or `grad_clip`)")


def check_new_total(steps: int, done: int, out: Path) -> None:
    """``train --resume --steps N``: N is the run's new total number of steps. The learning
    rate is a pure function of (step, total) (:func:`~flowmatch.config.lr_at`), so the
    schedule after warm-up is stretched (or shrunk) over the new total from the step resumed
    at: a cosine run resumed with a larger N continues at the higher rate its longer schedule
    has at that step, and still reaches 0 at step N."""
    if steps < done:
        raise SettingError("steps", f"{out} has already trained {done} steps; expected a total of at least {done}, got {steps}")


def _remove_unfinished(out: Path, fresh: bool) -> None:
    """What a new run writes before its first checkpoint, removed after a failure."""
    import shutil

    for name in ("config.json", "metrics.jsonl", ".lock"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "progress", ignore_errors=True)
    if fresh and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _remove_stale_temporaries(out: Path) -> None:
    """The temporary copies (:func:`~flowmatch.runs.atomic_path`) of the trainer's own files that a
    process killed while writing them left behind; the run is locked, so none is being written."""
    for name in ("config.json", "metrics.jsonl", "trainer_state.pt", "model.safetensors", "ema.safetensors"):
        for tmp in out.glob(f".{name}.tmp.*"):
            tmp.unlink(missing_ok=True)


def _save_checkpoint(trainer: Trainer, step: int) -> None:
    """The trainer state (weights, optimizer, the data set's and the objective's state, the losses
    summed since the last log line: no generator, a step's draws are a function of the seed and the
    step), then the weights files. Every process calls it (the summed loss is reduced over them);
    the main process writes."""
    log = {"last_log": trainer.last_log, "running": trainer.reduced(trainer.running, "mean").item(),
           "running_norm": trainer.running_norm.item()}
    if not trainer.main:
        trainer.checkpointed = step
        return
    state = {"step": step, "model": trainer.raw.state_dict(), "ema": trainer.ema.state_dict(),
             "optimizer": trainer.opt.state_dict(), "objective": trainer.objective.state_dict(), "log": log}
    if hasattr(trainer.dataset, "state_dict"):
        state["dataset"] = trainer.dataset.state_dict()
    save_state(trainer.out / "trainer_state.pt", state)
    save_weights(trainer.out / "model.safetensors", trainer.raw.state_dict(), {"step": step})
    save_weights(trainer.out / "ema.safetensors", trainer.ema.state_dict(), {"step": step})
    trainer.checkpointed = step


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
