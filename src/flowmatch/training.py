"""The training loop: conditional flow matching on accelerate.

Reads top to bottom: build data, path, time sampler, coupling and network from a
:class:`~flowmatch.config.TrainConfig`; each step draws data ``x1``, noise ``x0`` and times
``t``, pairs them, and regresses the path's velocity ``u_t`` at ``x_t`` with MSE; AdamW,
warm-up and schedule, optional clipping, EMA; a checkpoint every ``checkpoint_every``
steps that resumes bit-exactly on the CPU. :class:`Trainer` optimises; what watches the run (its
directory's files, evaluation, trackers) is :class:`~flowmatch.monitoring.RunMonitor`'s.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .config import Parts, TrainConfig, ema_decay_at, lr_at
from .errors import EnvironmentFault, SettingError, Stopped, UserError, sigterm_stops, stop_requested
from .monitoring import RunMonitor, TrainingEval, _ema_samples  # noqa: F401 (TrainingEval, _ema_samples: imported from here too)
from .objectives import cfm_loss, make_objective  # noqa: F401 (cfm_loss: public here too)
from .runs import FORMAT_VERSION, RunLock, dataset_from_doc, init_run, load_state, load_weights, read_config, read_metrics, write_json


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
        parts = parts or cfg.build(teacher=init_run(cfg))  # what can fail on bad input, before the run directory is touched
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
    monitor = RunMonitor(cfg, out, accelerator, on_checkpoint)
    trainer = Trainer(cfg, parts, accelerator, monitor, progress)
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
            monitor.open(trainer.step)
            trainer.run()
            monitor.close()
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
    parts = cfg.build(saved["data"], dataset=dataset_from_doc(saved, str(out / "config.json")), teacher=init_run(cfg))
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
    """The optimisation: the network, its EMA, AdamW (and the fp16 scaler), the step's draws and
    loss, and the loop of steps. Its named steps are :meth:`optimisation_step`, :meth:`log_line`,
    :meth:`checkpoint`; :meth:`run` strings them together. On one process it is plain PyTorch
    (AdamW, autocast, clipping, an EMA); on several, accelerate wraps the model in DDP.

    What watches the run is ``monitor``'s (a :class:`~flowmatch.monitoring.RunMonitor`: the run
    directory's files, evaluation, trackers); the loop calls it at each log step, checkpoint,
    evaluation step and a SIGTERM stop. Without one a trainer only prepares and takes steps
    (:meth:`prepare`, :meth:`optimisation_step`: benchmarks that time them)."""

    def __init__(self, cfg: TrainConfig, parts: Parts, accelerator, monitor: RunMonitor | None = None, progress: bool = True):
        self.cfg, self.accelerator, self.monitor = cfg, accelerator, monitor
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

    def state_dict(self) -> dict:
        """The checkpoint of the current step: weights, EMA, optimizer, the objective's and the data
        set's state, the losses summed since the last log line (no generator: a step's draws are a
        function of the seed and the step). Every process calls it alike: the summed loss is reduced
        over them."""
        log = {"last_log": self.last_log, "running": self.reduced(self.running, "mean").item(),
               "running_norm": self.running_norm.item()}
        state = {"step": self.step, "model": self.raw.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.opt.state_dict(), "objective": self.objective.state_dict(), "log": log}
        if hasattr(self.dataset, "state_dict"):
            state["dataset"] = self.dataset.state_dict()
        return state

    def load(self, state: dict) -> None:
        """Continue from a checkpoint (:meth:`state_dict`) exactly, on any number of processes: a
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
        cfg, monitor = self.cfg, self.monitor
        self.prepare()
        monitor.start()
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
                    _check_finite(self.reduced(self.bad_step, "max"), monitor.out)  # one host sync per log, not per step
                    if done % cfg.log_every == 0 or done == cfg.steps:
                        self.log_line(lr, bar)
                    if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                        self.checkpoint()
                if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    monitor.evaluate(self.step, self.ema, self.dataset)
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
            _check_finite(self.reduced(self.bad_step, "max"), self.monitor.out)
            self.save()
        raise Stopped(f"stopped by SIGTERM at step {self.step} of {self.cfg.steps}; {self.monitor.out} holds its checkpoint: "
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
        loss) and gradient norm, to the monitor (metrics.jsonl, trackers) and the bar."""
        steps = max(1, self.step - self.last_log)
        running = self.reduced(self.running, "mean")
        mean_loss, mean_norm = (running / steps).item(), (self.running_norm / steps).item()
        self.running.zero_(), self.running_norm.zero_()
        self.last_log = self.step
        if self.main and bar is not None:
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        self.monitor.log(self.step, mean_loss, lr, mean_norm)

    def save(self) -> None:
        """A checkpoint of the current step: :meth:`state_dict` (every process), written by the monitor."""
        self.monitor.save(self.state_dict())
        self.checkpointed = self.step

    def checkpoint(self) -> None:
        """:meth:`save`, then what the monitor does after a checkpoint (the progress grid, the
        trackers' picture, the ``on_checkpoint`` callback)."""
        self.save()
        self.monitor.after_checkpoint(self.step, self.ema, self.dataset)


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
