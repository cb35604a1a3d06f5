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
import os
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .config import TrainConfig, lr_at
from .data import Batch, make_dataset
from .errors import UserError
from .models import make_model
from .paths import AffinePath
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


def cfm_loss(model, path: AffinePath, x0, x1, t, label=None, loss: str = "mse", huber_c: float | None = None) -> torch.Tensor:
    """Conditional flow matching: ``E || v(x_t, t) - u_t ||^2`` (mean over all entries).

    ``loss="pseudo-huber"``: ``E [sqrt(||v - u||^2 + c^2) - c]`` per sample (Song & Dhariwal
    2023; RF++, Lee et al. 2024), with ``c = 0.00054 sqrt(D)`` unless given. Its minimiser is a
    (geometric) median, not the mean: meant for fixed pairs (distillation), where the target is
    a function of the noise and a network too smooth to follow it should pick a side rather
    than land between two cells.
    """
    ps = path.sample(x0, x1, t)
    pred = model(ps.x_t, t, label) if label is not None else model(ps.x_t, t)
    if loss == "mse":
        return torch.nn.functional.mse_loss(pred.float(), ps.u_t.float())
    d2 = (pred.float() - ps.u_t.float()).flatten(1).pow(2).sum(1)
    c = huber_c if huber_c is not None else 0.00054 * d2.new_tensor(x0[0].numel()).sqrt()
    return ((d2 + c**2).sqrt() - c).mean()


def default_run_dir(cfg: TrainConfig, root: str = "runs") -> Path:
    name = Path(cfg.data).stem if cfg.data not in ("",) else "run"
    base = Path(root) / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    out, k = base, 1
    while out.exists():
        out, k = Path(f"{base}-{k}"), k + 1
    return out


def build_model(cfg: TrainConfig, shape: tuple, num_classes: int = 0, path=None):
    """The network of ``cfg`` for samples of ``shape``. Images the UNet cannot halve down to its
    lowest resolution are refused here, naming the data, before anything is written."""
    if len(shape) == 3 and cfg.model in ("auto", "unet"):
        from .models.unet import default_channels

        _, h, w = shape
        factor = 2 ** (len(default_channels(min(h, w))) - 1)
        if h % factor or w % factor:
            raise UserError(f"--data {cfg.data}: images of {h}x{w} pixels do not fit the UNet, whose height and width "
                            f"must be multiples of {factor}; crop or resize them (image folders: --image-size)")
    return make_model(cfg.model_spec(shape), shape, num_classes, path=path if path is not None else cfg.build_path())


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
        raise UserError(f"--out: {out} already exists; choose a new directory or pass --resume to continue it")


def train(cfg: TrainConfig | None, out: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
          data_spec: dict | None = None, make_plots: bool | None = None, allow_existing=(),
          on_checkpoint=None, steps: int | None = None) -> Path:
    """Train (or resume) a run; returns its directory. Bad input raises :class:`UserError`
    before anything is written. With ``resume`` the saved settings are used (``cfg`` is
    ignored) and ``steps``, if given, becomes the new total number of steps (recorded in
    config.json). ``allow_existing`` names entries that a new run directory may already hold
    (the pairs of a reflow run). ``on_checkpoint(step, ema_model)`` is called on the main
    process after each checkpoint (evaluation during training); its time is left out of the
    ``time`` logged in metrics.jsonl."""
    from accelerate import Accelerator

    saved = None
    if resume:
        if out is None:
            raise UserError("--resume: needs --out RUN, the run to continue")
        out = Path(out)
        saved = read_config(out)
        cfg = TrainConfig.from_dict(saved["train"])
        state = load_state(out / "trainer_state.pt")
        read_metrics(out / "metrics.jsonl")  # a damaged log is refused before anything is rewritten
        if steps is not None:
            cfg.steps = resumed_steps(steps, int(state["step"]), out)
    else:
        cfg.validate()
        data_spec = data_spec or cfg.data_spec()
        out = Path(out) if out is not None else default_run_dir(cfg)
        check_new_run_dir(out, allow_existing)
        state = None

    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision: fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    # Mixed precision is torch.autocast (+ a GradScaler for fp16) rather than accelerate's
    # process-wide setting, so runs of different precision can follow each other in one process.
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())
    device, main = accelerator.device, accelerator.is_main_process

    # Everything that can fail on bad input is built before the run directory is touched.
    dataset = dataset_from_doc(saved, str(out / "config.json")) if resume else make_dataset(data_spec)
    data_spec = saved["data"] if resume else data_spec
    path, time_sampler = cfg.build_path(), cfg.build_time_sampler()
    coupling = cfg.build_coupling()
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching global state
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, dataset.shape, dataset.num_classes, path=path)
        if cfg.init_from and state is None:
            weights = load_weights(cfg.init_from)
            try:
                model.load_state_dict(weights)
            except RuntimeError as e:
                raise UserError(f"{cfg.init_from}: weights do not fit the student network ({str(e).splitlines()[0][:100]})") from None
    dataset = dataset.to(device)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    # fused AdamW: one kernel for all parameters (about 1.5x the steps/s of foreach on 2 CPU cores)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    # One generator per process draws data, noise and times: no global random state.
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + accelerator.process_index)
    start = 0
    if state is not None and len(state["generator"]) != accelerator.num_processes:
        raise UserError(f"--resume: {out} was trained with {len(state['generator'])} process(es); "
                        f"resume it with --processes {len(state['generator'])}")
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"][accelerator.process_index].to("cpu"))
        start = int(state["step"])
        if "dataset" in state and hasattr(dataset, "load_state_dict"):
            dataset.load_state_dict(state["dataset"])
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum

    config_doc = {
        "format_version": FORMAT_VERSION,
        "flowmatch_version": __version__,
        "train": cfg.to_dict(),
        "data": data_spec | dataset.spec,
        "shape": list(dataset.shape),
        "num_classes": dataset.num_classes,
        "global_batch_size": global_batch,
        "num_processes": accelerator.num_processes,
    }
    fresh = main and not resume and not out.exists()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    lock = RunLock(out) if main else None
    if lock:
        lock.__enter__()
    try:
        if main:
            if not resume:
                write_json(out / "config.json", config_doc)
            elif cfg.steps != saved["train"]["steps"]:
                write_json(out / "config.json", saved | {"train": cfg.to_dict()})
            if resume:
                _remove_stale_temporaries(out)
            _truncate_metrics(out / "metrics.jsonl", start)
        if accelerator.num_processes > 1:  # DDP; one process trains the bare module (no wrapper overhead)
            model, opt = accelerator.prepare(model, opt)
        _loop(cfg, accelerator, model, ema, opt, gen, dataset, path, time_sampler, coupling, out, start, progress,
              on_checkpoint)
    except BaseException:
        if main and not resume and not (out / "trainer_state.pt").exists():
            _remove_unfinished(out, fresh)  # no checkpoint yet: leave nothing behind that blocks --out
        raise
    finally:
        if lock:
            lock.__exit__(None, None, None)
    if main and (cfg.plots if make_plots is None else make_plots):
        from .plots import plot_run

        plot_run(out)
    accelerator.wait_for_everyone()
    return out


def _loop(cfg, accelerator, model, ema, opt, gen, dataset, path, time_sampler, coupling, out, start, progress,
          on_checkpoint=None):
    device, main = accelerator.device, accelerator.is_main_process
    distributed = accelerator.num_processes > 1
    raw = accelerator.unwrap_model(model)
    forward = torch.compile(model) if cfg.compile else model  # the loss only; EMA and checkpoints use the module
    params, ema_params = list(raw.parameters()), list(ema.parameters())
    shape = dataset.shape
    running = torch.zeros((), device=device)
    bad_step = torch.full((), -1, device=device, dtype=torch.long)
    t_start, last_log = time.perf_counter(), start
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    bar = tqdm(total=cfg.steps, initial=start, disable=not (main and progress), desc="train", dynamic_ncols=True)
    for step in range(start, cfg.steps):
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            batch: Batch = dataset.sample(cfg.batch_size, gen)
            x1 = batch.x1
            x0 = batch.x0 if batch.x0 is not None else torch.randn(len(x1), *shape, generator=gen, device=device)
            t = time_sampler.sample(len(x1), gen, device=device)
            x0, x1, label = coupling.pair(x0, x1, gen, batch.label)
            if label is not None and cfg.label_dropout > 0:
                drop = torch.rand(len(label), generator=gen, device=device) < cfg.label_dropout
                label = torch.where(drop, -1, label)
            # gradients are all-reduced on the last micro-batch of an accumulation only
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last or not distributed else accelerator.no_sync(model):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = cfm_loss(forward, path, x0, x1, t, label, cfg.loss, cfg.huber_c)
                scaler.scale(loss / cfg.grad_accum).backward()  # / 1 is exact
            step_loss = step_loss + loss.detach()
        if cfg.grad_clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        loss = step_loss / cfg.grad_accum  # the step's mean loss
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step + 1, bad_step)
        running += loss
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():  # one foreach call over all parameters
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _check_finite(bad_step, out)  # one host sync per log, not per step
            if done % cfg.log_every == 0 or done == cfg.steps:
                mean_loss = (running / max(1, done - last_log)).item()
                running.zero_()
                last_log = done
                if main:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                    _append_metrics(out / "metrics.jsonl", {"step": done, "loss": mean_loss, "lr": lr,
                                                            "time": round(time.perf_counter() - t_start, 3)})
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                _save_checkpoint(accelerator, raw, ema, opt, gen, done, out, dataset)
                if main and len(shape) == 3 and cfg.plots:
                    _progress_grid(ema, dataset, out, done, device)
                if main and on_checkpoint is not None:
                    paused = time.perf_counter()
                    on_checkpoint(done, ema)
                    t_start += time.perf_counter() - paused
    bar.close()


def _check_finite(bad_step, out):
    b = int(bad_step.item())
    if b >= 0:
        kept = (f"the last good checkpoint in {out} is kept" if (out / "trainer_state.pt").exists()
                else "no checkpoint was written, so nothing is kept")
        raise UserError(f"training diverged: the loss was NaN or Inf at step {b}; {kept} "
                        "(lower --lr or --grad-clip)")


def resumed_steps(steps: int, done: int, out: Path) -> int:
    """``train --resume --steps N``: N is the run's new total number of steps. The learning
    rate is a pure function of (step, total) (:func:`~flowmatch.config.lr_at`), so the
    schedule after warm-up is stretched (or shrunk) over the new total from the step resumed
    at: a cosine run resumed with a larger N continues at the higher rate its longer schedule
    has at that step, and still reaches 0 at step N."""
    if steps < done:
        raise UserError(f"--steps: {out} has already trained {done} steps; expected a total of at least {done}, got {steps}")
    return steps


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


def _save_checkpoint(accelerator, raw, ema, opt, gen, step, out, dataset):
    gens = accelerator.gather(gen.get_state().to(accelerator.device)[None]) if accelerator.num_processes > 1 \
        else gen.get_state()[None]
    if not accelerator.is_main_process:
        return
    state = {"step": step, "model": raw.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
             "generator": gens.cpu()}
    if hasattr(dataset, "state_dict"):
        state["dataset"] = dataset.state_dict()
    save_state(out / "trainer_state.pt", state)
    save_weights(out / "model.safetensors", raw.state_dict(), {"step": step})
    save_weights(out / "ema.safetensors", ema.state_dict(), {"step": step})


@torch.inference_mode()
def _progress_grid(ema, dataset, out: Path, step: int, device) -> None:
    """Images over training: 36 EMA samples (20 Euler steps, fixed noise) per checkpoint."""
    from .plots import image_grid
    from .solvers import integrate

    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(36, *dataset.shape, generator=g, device=device)
    x = dataset.decode(integrate(lambda x, t: ema(x, t), x0, "euler", 20).x).clamp(0, 1)
    (out / "progress").mkdir(exist_ok=True)
    image_grid(x, out / "progress" / f"step-{step:07d}.png", nrow=6, title=f"step {step}")


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint being resumed from."""
    if not path.exists():
        return
    keep = [row for row in read_metrics(path) if row["step"] <= step]
    write_text(path, "".join(json.dumps(row) + "\n" for row in keep))
