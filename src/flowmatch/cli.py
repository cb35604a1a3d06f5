"""The ``flowmatch`` command line (a user-facing contract; see README).

Bad input prints one line ``flowmatch: error: ...`` on stderr and exits with status 2;
``--json`` output goes to stdout, human text to stderr. A fault of the environment (a full disk:
:class:`~flowmatch.errors.EnvironmentFault`, or any ``OSError`` or ``MemoryError`` that escapes a
command) prints one line and exits with status 1. SIGTERM stops a command at a safe point (train,
reflow and distill after a checkpoint, sample between batches, writing nothing), or at once
elsewhere, temporary files removed: one line, status 143. Ctrl-C: status 130.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import typing
from pathlib import Path

import typer

from .config import TrainConfig, read_settings_file, settings_toml
from .errors import EnvironmentFault, SettingError, Stopped, UserError, first_sentence, sigterm_stops, stop_requested

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="rich", help="Flow-matching generative models: train, sample, evaluate, plot.")


def _h(text: str | None) -> str | None:
    """Help text as the help screen's markup (rich) shows it literally: its brackets escaped."""
    from rich.markup import escape

    return None if text is None else escape(text)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _finite_float_options(fn):
    """Refuse NaN and Inf in every float option of a command (click's FLOAT accepts both)."""
    hints = typing.get_type_hints(fn)
    floats = [name for name, hint in hints.items() if hint is float or float in typing.get_args(hint)]

    @functools.wraps(fn)
    def checked(**kwargs):
        for name in floats:
            value = kwargs.get(name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{name.replace('_', '-')}: expected a finite number, got {value}")
        try:
            return fn(**kwargs)
        except EOFError as e:  # a reader met the end of a file early: bad input, not an interrupt (click's Abort)
            raise UserError(_eof_message(e)) from None

    return checked


def _eof_message(e: EOFError) -> str:
    """One line for an ``EOFError`` that escaped a reader, naming the file it was reading where a
    frame of flowmatch's holds it (its ``path``)."""
    path, tb = None, e.__traceback__
    while tb is not None:  # the innermost flowmatch frame with a path to an existing file
        frame = tb.tb_frame
        if frame.f_globals.get("__name__", "").startswith("flowmatch"):
            for name in ("path", "file"):
                value = frame.f_locals.get(name)
                if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
                    path = value
                    break
        tb = tb.tb_next
    detail = f"EOFError: {e}" if str(e) else "EOFError"
    where = f"{path}: the file" if path is not None else "a file"
    return f"{where} ended before its contents did ({detail}); expected a complete file"


def command(*args, **kwargs):
    """``app.command`` with the checks every command shares."""
    return lambda fn: app.command(*args, **kwargs)(_finite_float_options(fn))


def _check_tol(tol: float) -> None:
    import torch

    from .solvers import check_tolerance

    check_tolerance(tol, "tol", torch.float32)  # runs sample in float32


def _check_shift(shift: float) -> None:
    if not shift > 0:
        raise UserError(f"--time-shift: expected a positive value, got {shift}")


def _check_noise(noise: float | None, solver: str) -> dict:
    """``--noise``: for the stochastic solver only, a value >= 0 (default 1); the sampler's keywords."""
    from .solvers import SDE_METHODS

    if noise is None:
        return {"noise": 1.0} if solver in SDE_METHODS else {}
    if solver not in SDE_METHODS:
        raise UserError(f"--noise: only with a stochastic solver ({', '.join(SDE_METHODS)}), got --solver {solver}")
    if not noise >= 0:
        raise UserError(f"--noise: expected a value >= 0, got {noise}")
    return {"noise": noise}


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


def _parse_nfes(text: str) -> list[int]:
    try:
        nfes = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--nfe: expected a comma-separated list of positive integers, got {text!r}") from None
    if not nfes or any(k < 1 for k in nfes):
        raise UserError(f"--nfe: expected a comma-separated list of positive integers, got {text!r}")
    return nfes


def _options_from(settings_class, own: dict, skip=()) -> list:
    """A command's options: one per field of the dataclass ``settings_class`` offered on the
    command line (its type, default, help and ``--help`` panel; a recipe setting's default, None,
    is described by the recipes), then ``own``, the command's own options."""
    import dataclasses
    import inspect

    hints, defaults, params = typing.get_type_hints(settings_class), settings_class(), []
    for f in dataclasses.fields(settings_class):
        if not f.metadata.get("cli", True) or f.name in skip:
            continue
        hint, default, help = hints[f.name], getattr(defaults, f.name), f.metadata.get("help") or None
        if settings_class is TrainConfig and default is None and f.name in RECIPE_HELP:
            help = f"{help} [default: {RECIPE_HELP[f.name]}]"
        panel = f.metadata.get("panel") if settings_class is TrainConfig else None
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hint,
                                        default=typer.Option(default, help=_h(help), rich_help_panel=panel)))
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=hint, default=option)
               for name, (hint, option) in own.items()]
    return params


def _recipe_help() -> dict:
    """Each recipe setting's defaults in words, from the recipes themselves: by objective, the
    values on toys, tables and images (``flowmatch train --print-config`` shows the one in use)."""
    from .config import INIT_RECIPES, RECIPE_SETTINGS, RECIPES, WITHOUT_STF

    kinds = ("toy", "table", "image")
    names = {"toy": "2-D toys", "table": "tables", "image": "images"}
    out = {}
    for name in RECIPE_SETTINGS:
        parts = []
        for objective in ("cfm", "meanflow", "shortcut"):
            values = {}
            for kind in kinds:
                values.setdefault(RECIPES[(kind, objective)][name], []).append(names[kind])
            said = ", ".join(f"{v} on {' and '.join(k)}" if len(values) > 1 else f"{v}" for v, k in values.items())
            parts.append(f"{objective} {said}")
        if name in WITHOUT_STF:
            parts.append(f"{WITHOUT_STF[name]} where the stable target cannot apply")
        parts += [f"{objective} with init {v[name]}" for objective, v in INIT_RECIPES.items() if name in v]
        out[name] = "; ".join(parts)
    out["lr"] += "; the cifar UNet preset 0.0002"
    return out


RECIPE_HELP = _recipe_help()


def _with_options(*params):
    """Give a command ``fn(..., **options)`` the signature typer reads: its leading parameters
    (``(name, hint, default)``; ``default`` None: none) and then ``params``."""
    import inspect

    def decorate(fn):
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        lead = [inspect.Parameter(name, kind, annotation=hint, **({} if default is None else {"default": default}))
                for name, hint, default in params[:-1]]
        sig = [*lead, *params[-1]]
        fn.__signature__ = inspect.Signature(sig)
        fn.__annotations__ = {p.name: p.annotation for p in sig}
        return fn

    return decorate


#: ``train``'s options beyond TrainConfig's fields
_OUT = "Output and processes"
TRAIN_OWN = {"out": (Path | None, typer.Option(None, help="run directory (default: runs/DATA-TIMESTAMP)", rich_help_panel=_OUT)),
             "resume": (bool, typer.Option(False, help="continue --out RUN from its last checkpoint with its saved settings "
                                                       "(on any number of processes)", rich_help_panel=_OUT)),
             "progress": (bool, typer.Option(True, help="show a progress bar", rich_help_panel=_OUT)),
             "config": (Path | None, typer.Option(None, help="a TOML file of settings (config.json's \"train\" names); "
                                                          "options given on the command line override it", rich_help_panel=_OUT)),
             "print_config": (bool, typer.Option(False, "--print-config", help="print the effective settings (the recipe's "
                                                                               "for the data and objective, and yours) as "
                                                                               "TOML (a --config file) and exit",
                                                 rich_help_panel=_OUT))}


@command()
@_with_options(("ctx", typer.Context, None), _options_from(TrainConfig, TRAIN_OWN))
def train(ctx: typer.Context, **options):
    """Train a flow-matching model and write a run directory. Settings left unset take the measured
    recipe for the data (2-D toys, tables, images) and the objective (--print-config shows them)."""
    from .training import train as run_training

    out, resume, progress = options.pop("out"), options.pop("resume"), options.pop("progress")
    config_file, print_config = options.pop("config"), options.pop("print_config")
    if resume and (config_file is not None or print_config):
        raise UserError(f"{'--config' if config_file is not None else '--print-config'}: a resumed run keeps the "
                        f"settings in its config.json; give --resume without it")
    if config_file is not None:  # the file's settings, unless given on the command line
        given = {p.name for p in ctx.command.params if getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"}
        options.update({k: v for k, v in read_settings_file(config_file).items() if k not in given})
    new_total = options["steps"] if resume else None
    cfg = TrainConfig(**options)
    parts = None
    if cfg.processes < 1:
        raise UserError(f"--processes: expected a positive integer, got {cfg.processes}")
    if resume:
        _refuse_changed_settings_on_resume(ctx, cfg, out)
    else:
        from .runs import init_run

        parts = cfg.build(teacher=init_run(cfg))  # the recipe's settings for the data; bad input fails before anything is written
        if print_config:
            typer.echo(settings_toml(cfg), nl=False)
            return
    if cfg.processes > 1 and "WORLD_SIZE" not in os.environ:
        from .training import check_run_dir, default_run_dir

        out = out if out is not None else default_run_dir(cfg)
        check_run_dir(out, resume)
        return _launch(cfg.processes, out)
    run_dir = run_training(cfg, out=out, resume=resume, progress=progress, steps=new_total, parts=parts)
    if os.environ.get("RANK", "0") == "0":
        _say(f"run written to {run_dir}")


#: what ``train --resume`` may change: everything else is the run's saved setting
RESUME_OPTIONS = {"out", "resume", "steps", "progress", "plots", "processes"}


def _refuse_changed_settings_on_resume(ctx: typer.Context, cfg: TrainConfig, out) -> None:
    """A resumed run continues with the settings saved in its config.json. The same command line
    with ``--resume`` added is fine; a setting given with another value would be silently
    ignored, so it is refused (``--steps`` is the new total)."""
    from .runs import read_config

    if out is None:
        raise UserError("--resume: expected --out RUN, the run directory to continue")
    saved = TrainConfig.from_dict(read_config(out)["train"])
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name)
        if p.name in RESUME_OPTIONS or source is None or source.name != "COMMANDLINE":
            continue
        if getattr(cfg, p.name) != getattr(saved, p.name):
            raise UserError(f"{p.opts[0]}: this run was trained with {getattr(saved, p.name)!r} (its config.json); "
                            "a resumed run keeps its settings: expected the same value, or a new run")


def _launch(processes: int, out) -> None:
    """Run this same command line in ``processes`` local processes (torchrun; each process's
    ``accelerate`` state picks up its rank), with ``--out`` fixed so that all share one run."""
    argv = _argv_without_processes(sys.argv[1:] if _ARGV is None else _ARGV)
    # torchrun's own parser rejects "--n" (a prefix of several of its options): use the long name
    argv = ["--num-samples" if a == "--n" else ("--num-samples=" + a[4:] if a.startswith("--n=") else a) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "flowmatch", *argv]
    with tempfile.TemporaryDirectory(prefix="flowmatch-errors-") as errors:
        rc, report = _torchrun(cmd, env={**os.environ, ERROR_DIR: errors})
        said = {p.name: p.read_text(encoding="utf-8").strip() for p in sorted(Path(errors).iterdir())}
    if rc == 0:
        return
    first = lambda kind: next((m for name, m in said.items() if name.startswith(kind + "-") and m), None)  # noqa: E731
    if first("fault"):  # a process met a full disk (or the like): its line, and status 1
        raise EnvironmentFault(first("fault"))
    if first("stopped") or rc == Stopped.exit_code:  # SIGTERM: the processes stopped at a safe point
        raise Stopped(first("stopped") or "stopped by SIGTERM")
    if first("rank"):  # a process refused the input: the one line it printed, and status 2
        raise UserError(first("rank"))
    # anything else is an internal failure of a process (a crash, a signal): status 1, with
    # torchrun's own report, which may help
    sys.stderr.write(report)
    _say(f"flowmatch: error: a worker process failed (torchrun exit status {rc}); see the messages above")
    raise typer.Exit(1)


#: torchrun's own log lines (glog style, from torch.distributed), e.g.
#: ``E1129 08:06:38.520000 28786 torch/distributed/elastic/multiprocessing/api.py:1002] failed ...``
_TORCHRUN_LOG = re.compile(rb"^[IWEF]\d{4} [\d:.]+ +\d+ .*torch/distributed/")


def _torchrun(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run torchrun with its processes' stderr passed through as it comes (progress bars,
    warnings, a crashing process's traceback), and torchrun's own log lines and failure report
    held back: bad input then stays one line. Returns (exit status, what was held back)."""
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    terminated = []

    def forward(signum, frame):  # SIGTERM to the launcher: torchrun passes it on to every process
        terminated.append(signum)
        p.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward) if threading.current_thread() is threading.main_thread() else None
    try:
        held = _relay(p, hold=lambda: bool(terminated))  # after SIGTERM: torchrun's own traceback
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    rc = p.wait()
    return (Stopped.exit_code if terminated and rc != 0 else rc), held


def _relay(p, hold=lambda: False) -> str:
    """Pass torchrun's stderr through as it comes, holding back its own log lines and everything
    while ``hold()`` (see :func:`_torchrun`)."""
    held, failing, rest = [], False, b""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None

    def emit(segment: bytes) -> None:
        nonlocal failing
        failing = failing or segment.startswith(b"E") and bool(_TORCHRUN_LOG.match(segment))
        if failing or hold() or _TORCHRUN_LOG.match(segment):
            held.append(segment)
        elif out is not None:
            out.write(segment)
            out.flush()
        else:
            sys.stderr.write(segment.decode(errors="replace"))

    for chunk in iter(lambda: p.stderr.read1(65536), b""):
        *segments, rest = re.split(rb"(?<=[\r\n])", rest + chunk)  # lines, and tqdm's \r updates
        for segment in segments:
            emit(segment)
    if rest:
        emit(rest)
    return b"".join(held).decode(errors="replace")


#: under ``_launch``, each process writes its one line here instead of printing it: ``rank-R`` (bad
#: input, status 2), ``fault-R`` (the environment, status 1), ``stopped-R`` (SIGTERM, status 143), so
#: that the launcher says it once and tells them from a crash (status 1)
ERROR_DIR = "FLOWMATCH_ERROR_DIR"


def _distributed_device():
    """Under torchrun: this process's device (its GPU, or the CPU) from accelerate's state."""
    if "WORLD_SIZE" not in os.environ:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).device


def _argv_without_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--processes":
            skip = True
            continue
        if a.startswith("--processes="):
            continue
        out.append(a)
    return out


@command()
def sample(
    run: Path = typer.Argument(..., help="run directory"),
    out: Path = typer.Option(..., help="FILE.npy (float32, data units) or FILE.png (scatter plot)"),
    n: int | None = typer.Option(None, "--n", "--num-samples", help=_h("number of samples [default: 4000; 64 for an "
                                                                      "image run's FILE.png, an 8x8 grid]")),
    nfe: int | None = typer.Option(None, help="velocity evaluations (fixed-step solvers); default 100, "
                                              "or k for a distilled k-step run"),
    solver: str = typer.Option("euler", help="euler, midpoint, heun, rk4, dopri5, or euler-maruyama (stochastic, "
                                             "the same marginals)"),
    noise: float | None = typer.Option(None, help=_h("euler-maruyama: diffusion w(t) = noise * sigma(t) [default: 1; "
                                                  "0: the ODE]")),
    time_shift: float = typer.Option(1.0, help="fixed-step solvers: grid t/(s - (s-1) t); s < 1 puts more steps "
                                               "near the data (t = 1)"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(65536, help="samples integrated at once (bounds memory)"),
    tol: float = typer.Option(1e-5, help="adaptive solvers: atol = rtol"),
    weights: str = typer.Option("ema", help="ema or model"),
    label: int | None = typer.Option(None, help="class to sample (class-conditional runs)"),
    cond: Path | None = typer.Option(None, help="runs trained with condition vectors: FILE.npy of one condition "
                                                "(K,) for all samples, or one per sample (N, K), in the data's units"),
    guidance: float = typer.Option(1.0, help="classifier-free guidance weight with --label or --cond (1: none)"),
    processes: int = typer.Option(1, help="local processes sharing the batches (the samples do not depend on it)"),
    progress: bool = typer.Option(True),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out file"),
):
    """Draw samples from a trained run."""
    from . import sampling
    from .runs import load_run

    # under torchrun the launcher has checked --out; the processes write it only at the end
    check_output(out, (".npy", ".png"), overwrite=overwrite or "WORLD_SIZE" in os.environ)
    if n is not None and n < 1:
        raise UserError(f"--n: expected a positive integer, got {n}")
    if processes < 1:
        raise UserError(f"--processes: expected a positive integer, got {processes}")
    r = load_run(run, weights=weights, device=_distributed_device())
    if n is None:  # a picture of images shows a grid, not thousands of them
        n = 64 if len(r.shape) == 3 and out.suffix.lower() == ".png" else 4000
    _check_noise(noise, solver)
    options = sampling.SampleOptions(nfe=nfe, solver=solver, tol=tol, time_shift=time_shift, label=label, guidance=guidance,
                                     noise=1.0 if noise is None else noise, batch_size=batch_size,
                                     cond=None if cond is None else _load_cond(cond))
    sampling.check(r, options, n)
    if processes > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(processes, out)
    # SIGTERM: stop after the current batch, writing nothing. --out is never replaced without --overwrite,
    # even a file another process wrote meanwhile (under torchrun too: the launcher found none)
    replace = overwrite
    with sigterm_stops():
        if "WORLD_SIZE" in os.environ:  # under torchrun: every process draws its share of the batches
            x = sampling.sample_distributed(r, n, options, seed, progress)
            if x is None:  # not process 0, which writes --out
                return
        elif out.suffix.lower() == ".npy":  # streamed to disk batch by batch: memory does not grow with --n
            _stream_npy(sampling.sample_batches(r, n, options, seed, progress), out, (n, *r.shape),
                        images=len(r.shape) == 3, overwrite=replace)
            _say(f"wrote {n} samples to {out}")
            return
        else:
            x = sampling.sample(r, n, options, seed, progress)
        _stop_if_asked(out, n, n)
        _write_samples(x, out, images=len(r.shape) == 3, overwrite=replace,
                       title=f"{solver}, NFE {nfe or r.default_nfe}" + (f", label {label}" if label is not None else ""))
    _say(f"wrote {n} samples to {out}")


def _stop_if_asked(out: Path, done: int, n: int) -> None:
    """SIGTERM asked ``sample`` to stop: nothing is written (``--out`` stays as it was)."""
    if stop_requested():
        raise Stopped(f"stopped by SIGTERM after {done} of {n} samples; nothing was written to {out} "
                      "(run the command again to sample)")


def _load_cond(path: Path):
    """``sample --cond FILE.npy``: one condition vector (K,) or one per sample (N, K)."""
    import numpy as np

    from .data.arrays import check_finite, check_npy

    if path.suffix.lower() != ".npy" or not path.is_file():
        raise UserError(f"--cond: {path}: expected an existing .npy file of condition vectors")
    try:
        check_npy(path)  # its header against its size, before anything is allocated
        c = np.load(path, allow_pickle=False)
    except UserError as e:
        raise UserError(f"--cond: {e}") from None
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"--cond: {path}: not a readable numeric .npy file ({e})") from None
    if c.dtype.kind not in "fiub" or c.ndim not in (1, 2) or c.size == 0:
        raise UserError(f"--cond: {path}: expected real numbers of shape (K,) or (N, K), got {c.dtype} {c.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        c = c.astype(np.float32)
    check_finite(c if c.ndim == 2 else c[None], f"--cond: {path}")
    return c


def _stream_npy(batches, out: Path, shape: tuple, images: bool, overwrite: bool = True) -> None:
    """The .npy header, then the ``(start, x)`` batches in order (appended: no mapped pages stay
    resident), written atomically; pixels clamped to [0, 1]. SIGTERM stops it between batches,
    writing nothing."""
    import numpy as np

    from .files import atomic_file

    with atomic_file(out, overwrite) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                                 "fortran_order": False, "shape": shape})
        done = 0
        for _, xb in batches:
            f.write((xb.clamp(0, 1) if images else xb).numpy().astype("<f4").tobytes())
            done += len(xb)
            if done < shape[0]:
                _stop_if_asked(out, done, shape[0])


def _write_samples(x, out: Path, images: bool, title: str, overwrite: bool = True) -> None:
    """Samples into ``out``: a float32 .npy, or a picture (an image grid, or a scatter plot)."""
    import numpy as np

    from .files import atomic_file, atomic_path

    if images:
        x = x.clamp(0, 1)  # pixels in [0, 1] at the border
    if out.suffix.lower() == ".npy":
        with atomic_file(out, overwrite) as f:
            np.save(f, x.numpy().astype(np.float32))
        return
    with atomic_path(out, overwrite) as tmp:  # the picture is drawn into the temporary file
        if images:
            from .plots import image_grid

            image_grid(x, Path(tmp), title=title)
        else:
            from .plots import scatter

            scatter(x, Path(tmp), title=title)


@command("eval")
def evaluate(
    runs: list[Path] = typer.Argument(..., help="one or more run directories"),
    nfe: str | None = typer.Option(None, help=_h("comma-separated NFEs [default: 1,2,4,8,16,100; image runs: one NFE, 100]")),
    n: int | None = typer.Option(None, help=_h("samples per measurement (and reference samples) [default: 4000; images 1000]")),
    solver: str = typer.Option("euler", help="fixed-step solver for the NFE sweep: euler, midpoint, heun, rk4, "
                                             "euler-maruyama"),
    noise: float | None = typer.Option(None, help=_h("euler-maruyama: diffusion w(t) = noise * sigma(t) [default: 1]")),
    time_shift: float = typer.Option(1.0, help="the sweep's grid t/(s - (s-1) t); s < 1: more steps near the data"),
    seed: int = typer.Option(0),
    tol: float | None = typer.Option(None, help=_h("tolerance of the adaptive solver (dopri5) [default: 1e-5; not for images]")),
    repeats: int | None = typer.Option(None, help=_h("average each W2 over this many fresh reference draws "
                                                  "[default: 3; not for images]")),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
    plot: Path | None = typer.Option(None, help="also draw W2/floor against NFE for all runs into FILE.png (not for images)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --plot file"),
    fid_weights: Path | None = typer.Option(None, help=_h("image runs: also FID, precision and recall in the features of "
                                                       "this TorchScript network (torch.jit.save; e.g. the FID Inception "
                                                       "file inception-2015-12-05.pt), fed float32 RGB (B, 3, 299, 299) in "
                                                       "[0, 255]; reference features cached (needs the fid extra)")),
):
    """W2 against fresh data (and its floor), the share off the support (2-D toys), precision, recall, density,
    coverage and a classifier two-sample test, at several NFEs; dopri5's NFE; straightness; Fréchet
    distances, precision and recall in a classifier's features for digits and mnist runs; FID with
    --fid-weights for any image run."""
    from .metrics import evaluate as run_eval
    from .metrics import format_table
    from .runs import load_run
    from .solvers import ADAPTIVE_METHODS, check_method

    if solver in ADAPTIVE_METHODS:
        raise UserError(f"--solver: eval sweeps --nfe with a fixed-step solver (euler, midpoint, heun, rk4), got {solver!r}; "
                        "dopri5 is measured on its own, at --tol")
    nfes = _parse_nfes(nfe if nfe is not None else "1,2,4,8,16,100")
    for k in nfes:
        check_method(solver, k)
    kw_noise = _check_noise(noise, solver)
    if n is not None and n < 2:
        raise UserError(f"--n: expected an integer >= 2, got {n}")
    if repeats is not None and repeats < 1:
        raise UserError(f"--repeats: expected a positive integer, got {repeats}")
    if tol is not None:
        _check_tol(tol)
    _check_shift(time_shift)
    if plot is not None:
        check_output(plot, (".png",), "--plot", overwrite)
    loaded = [load_run(r) for r in runs]
    images = [len(r.shape) == 3 for r in loaded]
    if any(images):
        _check_image_eval(images, nfe, nfes, {"--tol": tol, "--repeats": repeats, "--plot": plot,
                                              "--time-shift": None if time_shift == 1.0 else time_shift})
        return _eval_images(loaded, n or 1000, nfes[0] if nfe is not None else 100, solver, seed, json_out, fid_weights)
    if fid_weights is not None:
        raise UserError(f"--fid-weights: FID is measured on image runs; {loaded[0].dir} models vectors of shape "
                        f"{tuple(loaded[0].shape)}")
    results = {}
    for r in loaded:
        res = run_eval(r, nfes, n=n or 4000, seed=seed, solver=solver, tol=tol or 1e-5, repeats=repeats or 3,
                       progress=not json_out, time_shift=time_shift, **kw_noise)
        res["run"] = str(r.dir)
        results[str(r.dir)] = res
        if not json_out:
            _say(f"{r.dir}:\n{format_table(res)}")
    if plot is not None:
        from .plots import quality_vs_nfe

        quality_vs_nfe({Path(k).name: v for k, v in results.items()}, plot)
        _say(f"wrote {plot}")
    if json_out:
        print(json.dumps(next(iter(results.values())) if len(results) == 1 else {"runs": list(results.values())}))


def _student_command(kind: str, run: Path | None, teacher: str | None, out: Path, resume: bool, progress: bool, options: dict):
    import importlib

    # the module, not the package's `reflow` function of the same name (`from . import reflow` may give either)
    rf = importlib.import_module(f"{__package__}.reflow")
    from .config import StudentOptions
    from .teachers import make_teacher

    opts = StudentOptions(**options).validate()
    _check_tol(opts.tol)
    if (run is None) == (teacher is None):
        raise UserError("give either RUN (a flowmatch run as teacher) or --teacher diffusers:DIR, not both or neither")
    if teacher is None and not Path(run).is_dir():
        raise UserError(f"RUN: {run} is not a run directory")
    t = make_teacher(teacher or run, nfe=opts.teacher_nfe, tol=opts.tol, device=_distributed_device(),
                     null_class=opts.teacher_null_class)
    opts = opts.resolve(t.shape, getattr(t, "num_classes", 0))
    rf.check_guidance(t, opts.guidance, opts.null_share if opts.guidance is not None else 0.0)
    if opts.processes > 1 and "WORLD_SIZE" not in os.environ:
        if not resume:
            from .training import check_new_run_dir

            check_new_run_dir(Path(out))
        return _launch(opts.processes, out)
    result = rf.student(t, out, kind, opts, resume=resume, progress=progress)
    if os.environ.get("RANK", "0") == "0":
        _say(f"run written to {result}")


def _student_options(kind: str) -> list:
    from .config import StudentOptions

    what = "the student's" if kind == "reflow" else "the distilled run's"
    own = {"out": (Path, typer.Option(..., help=f"{what} run directory")),
           "teacher": (str | None, typer.Option(None, help="diffusers:DIR, a saved diffusers DDPM/DDIM pipeline, instead of RUN")),
           "resume": (bool, typer.Option(False, help="finish an interrupted pair generation or training")),
           "progress": (bool, typer.Option(True, help="show progress bars"))}
    run = ("run", Path | None, typer.Argument(None, help="teacher: a flowmatch run directory"))
    return [run, _options_from(StudentOptions, own, skip=("k",) if kind == "reflow" else ("time_dist",))]


@command()
@_with_options(*_student_options("reflow"))
def reflow(run: Path | None, **options):
    """k-rectified flow: train a student on a teacher's (noise, sample) pairs."""
    own = [options.pop(key) for key in ("teacher", "out", "resume", "progress")]
    _student_command("reflow", run, *own, options)


@command()
@_with_options(*_student_options("distill"))
def distill(run: Path | None, **options):
    """Distil a teacher into a one-step (or k-step) generator: z1 ≈ z0 + v(z0, 0)."""
    own = [options.pop(key) for key in ("teacher", "out", "resume", "progress")]
    _student_command("distill", run, *own, options)


@command()
def nll(
    run: Path = typer.Argument(..., help="run directory"),
    n: int = typer.Option(1000, help="fresh data samples to score"),
    tol: float = typer.Option(1e-5, help="dopri5 tolerance (atol = rtol)"),
    divergence: str = typer.Option("auto", help="auto (exact up to 16 dimensions), exact or hutchinson"),
    seed: int = typer.Option(0),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Negative log-likelihood of fresh data, nats per sample (bits per dim for images)."""
    import math

    from .likelihood import nll_summary
    from .runs import load_run

    if n < 2:
        raise UserError(f"--n: expected an integer >= 2, got {n}")
    _check_tol(tol)
    if divergence not in ("auto", "exact", "hutchinson"):
        raise UserError(f"--divergence: expected auto, exact or hutchinson, got {divergence!r}")
    r = load_run(run)
    from .seeding import generator

    x = r.dataset.reference(n, generator(seed, "reference", 0, device=r.device)).cpu()  # eval's first reference draw
    lp = r.log_prob(x, tol=tol, divergence=divergence, seed=seed, progress=not json_out)
    res = nll_summary(lp, math.prod(r.shape), images=len(r.shape) == 3)
    res.update({"divergence": divergence if divergence != "auto" else ("exact" if math.prod(r.shape) <= 16 else "hutchinson"),
                "tol": tol})
    if json_out:
        print(json.dumps(res))
    else:
        _say(f"NLL {res['nll']:.4f} ± {res['se']:.4f} nats per sample (n = {n})"
             + (f", {res['bits_per_dim']:.4f} bits/dim" if "bits_per_dim" in res else ""))


def _check_image_eval(images: list[bool], nfe: str | None, nfes: list[int], vector_only: dict) -> None:
    """Image runs are measured alone, at one NFE, without the options of the 2-D measures."""
    if not all(images):
        raise UserError("RUNS: give image runs and vector runs to separate eval commands (they are measured differently)")
    for option, value in vector_only.items():
        if value is not None:
            raise UserError(f"{option}: does not apply to image runs (Fréchet distances at one fixed-step NFE)")
    if nfe is not None and len(nfes) != 1:
        raise UserError(f"--nfe: image runs are measured at one NFE, got {nfe!r}")


def _eval_images(loaded, n, nfe, solver, seed, json_out, fid_weights=None):
    from .image_metrics import evaluate_digits, run_data_name

    net = None
    if fid_weights is not None:  # a bad file fails before anything is sampled
        from .fid import FeatureNet

        if n < 6:
            raise UserError(f"--n: FID's precision and recall use 5 nearest neighbours: expected at least 6 samples, got {n}")
        net = FeatureNet(fid_weights, device=loaded[0].device)
    for r in loaded:
        if run_data_name(r) is None and net is None:
            raise UserError(f"{r.dir}: image quality is measured in a classifier's features for digits and mnist runs; "
                            "for other images give --fid-weights FILE, a TorchScript Inception network (see README)")
    out = []
    for r in loaded:
        x = r.sample(n, nfe=nfe, solver=solver, seed=seed)
        data = run_data_name(r)
        res = evaluate_digits(r, n=n, nfe=nfe, solver=solver, seed=seed, x=x) if data else \
            {"n": n, "data": r.dataset.spec.get("path") or r.dataset.spec.get("name"), "nfe": nfe, "solver": solver}
        if net is not None:
            from .fid import fid_scores

            res["fid"] = fid_scores(x, r.dataset, net, seed=seed, name=data or Path(str(res["data"])).name)
        res["run"] = str(r.dir)
        out.append(res)
        if not json_out:
            _say(f"{r.dir}: " + "; ".join(_image_summary(res)))
    if json_out:
        print(json.dumps(out[0] if len(out) == 1 else {"runs": out}))


def _image_summary(res: dict) -> list[str]:
    """The human lines' parts: the classifier's measures (digits, mnist) and FID (--fid-weights)."""
    parts = []
    if "classifier" in res:
        parts.append(f"Fréchet/floor {res['classifier']['ratio']:.3f} (classifier features), {res['pca']['ratio']:.3f} (PCA)")
        if "conditional" in res:
            parts.append(f"class-conditional accuracy {res['conditional']['accuracy']:.3f}")
        parts.append("in classifier features " + ", ".join(f"{k} {v['value']:.3f} (data {v['data']:.3f})"
                                                          for k, v in res["prdc"].items()))
    if "fid" in res:
        f = res["fid"]
        parts.append(f"FID {f['fid']:.3f} (floor {f['floor']:.3f}) in {f['features']} features of {Path(f['weights']).name}, "
                     + ", ".join(f"{k} {f['prdc'][k]['value']:.3f} (data {f['prdc'][k]['data']:.3f})"
                                 for k in ("precision", "recall")))
    return parts


@command()
def plot(run: Path = typer.Argument(..., help="run directory")):
    """(Re)draw a run's pictures into its directory."""
    from .plots import plot_run
    from .runs import read_config

    read_config(run)
    for p in plot_run(run):
        _say(f"wrote {p}")


@command("save-pretrained")
def save_pretrained(
    run: Path = typer.Argument(..., help="run directory"),
    out: Path = typer.Option(..., help="the Hub folder to write (config.json, model.safetensors, README.md)"),
    weights: str = typer.Option("ema", help="which weights sample: ema or model"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing folder's files"),
):
    """Write a run as a Hub-style folder (huggingface_hub's layout, with a model card): load it
    with flowmatch.load(DIR) or sample it with `flowmatch sample DIR`."""
    from .hub import save_pretrained as save
    from .runs import load_run

    r = load_run(run, device="cpu", weights=weights)
    _say(f"wrote {save(r, out, weights=weights, overwrite=overwrite)}")


@command()
def export(
    run: Path = typer.Argument(..., help="run directory (or Hub folder)"),
    out: Path = typer.Option(..., help="the ONNX file to write (.onnx)"),
    nfe: int | None = typer.Option(None, help="velocity evaluations of the exported sampler (default: the run's own)"),
    solver: str = typer.Option("euler", help="euler or midpoint"),
    label: int | None = typer.Option(None, help="class to generate (class-conditional runs)"),
    guidance: float = typer.Option(1.0, help="classifier-free guidance weight (with --label)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing file"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
):
    """Export the whole K-step sampler (noise in, sample out, data units) as ONNX, checked in
    onnxruntime against PyTorch."""
    from .export import export_onnx
    from .runs import load_run

    check_output(out, (".onnx",), overwrite=overwrite)
    r = load_run(run, device="cpu")
    res = export_onnx(r, out, nfe or r.default_nfe, solver, label, guidance)
    if json_out:
        print(json.dumps(res))
    else:
        _say(f"wrote {out}: {res['bytes'] / 1e6:.2f} MB, {res['nfe']} evaluation(s) ({solver}); onnxruntime matches "
             f"PyTorch to {res['max_abs_diff']:.1e}; {res['samples_per_s']:.0f} samples/s in onnxruntime (CPU)")


_ARGV: list[str] | None = None
#: settings whose option has another name in a command
OPTION_ALIASES = {("reflow", "nfe"): "--teacher-nfe", ("distill", "nfe"): "--teacher-nfe", ("distill", "time_steps"): "--k"}


def _command(argv) -> str:
    """The subcommand of a command line (train, sample, ...)."""
    return next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), "")


def option_name(command: str, setting: str) -> str:
    """The option that sets ``setting`` in ``command`` (``sigma_min`` -> ``--sigma-min``)."""
    return OPTION_ALIASES.get((command, setting), "--" + setting.replace("_", "-"))


def run(argv: list[str] | None = None) -> int:
    """Run the app and return its exit status; bad input becomes one line and status 2, a fault of
    the environment one line and status 1, a stop asked for by SIGTERM one line and status 143."""
    global _ARGV
    _ARGV = list(argv) if argv is not None else None
    try:
        with _sigterm_raises():
            try:
                rc = app(args=argv, prog_name="flowmatch", standalone_mode=False)
            except SettingError as e:  # the library names its setting; the command line, the option
                raise UserError(f"{option_name(_command(argv), e.setting)}: {e.detail}") from None
    except EnvironmentFault as e:  # a full disk, a read-only folder: not the input's fault
        return _report("fault", _options_named(str(e), argv), 1)
    except UserError as e:
        return _report("rank", _options_named(str(e), argv), 2)
    except Stopped as e:
        return _report("stopped", _options_named(str(e), argv), Stopped.exit_code, prefix="flowmatch: ")
    except typer.Abort as e:
        if isinstance(e.__cause__ or e.__context__, EOFError):  # click's name for an EOFError: bad input
            return _report("rank", _eof_message(e.__cause__ or e.__context__), 2)
        _say("flowmatch: aborted")
        return 130
    except typer.TyperException as e:  # usage errors: unknown option, value of the wrong type
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        _say(f"flowmatch: error: {' '.join(message.split())}")
        return int(getattr(e, "exit_code", 2) or 2)
    except KeyboardInterrupt:
        _say("flowmatch: interrupted")
        return 130
    except OSError as e:  # a fault of the environment that no writer reported by name
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _report("fault", f"{where}{e.strerror or e} ({type(e).__name__})", 1)
    except MemoryError as e:
        return _report("fault", f"out of memory ({str(e)[:160] or 'MemoryError'})", 1)
    except RuntimeError as e:  # torch reports a failed allocation so
        if not re.search(r"can't allocate memory|out of memory", str(e), re.IGNORECASE):
            raise
        return _report("fault", f"out of memory ({first_sentence(e)[:160]})", 1)
    finally:
        _close_process_group()
    return rc if isinstance(rc, int) else 0


def _options_named(message: str, argv) -> str:
    """The library writes settings `name`: the command line names their options."""
    return re.sub(r"`([a-z_]+)`", lambda m: option_name(_command(argv), m.group(1)), message)


def _report(kind: str, message: str, status: int, prefix: str = "flowmatch: error: ") -> int:
    """Print the one line (under ``_launch``, a process leaves it to the launcher, which says it
    once: in ERROR_DIR, as KIND-RANK) and return ``status``."""
    if os.environ.get(ERROR_DIR):
        Path(os.environ[ERROR_DIR], f"{kind}-{os.environ.get('RANK', '0')}").write_text(message, encoding="utf-8")
    else:
        _say(f"{prefix}{message}")
    return status


@contextlib.contextmanager
def _sigterm_raises():
    """While a command runs, SIGTERM raises :class:`Stopped` where no safe point is waiting for it
    (:func:`~flowmatch.errors.sigterm_stops` takes over there): ``finally`` blocks run, so no
    temporary file is left behind, and the command exits with status 143 after one line."""
    def stop(signum, frame):
        raise Stopped("stopped by SIGTERM; what the command was writing was not written")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _close_process_group() -> None:
    """Under torchrun: take the process group down before the interpreter exits. Left to the
    interpreter's exit, its communication threads are torn down in no set order, and a worker
    could abort ("terminate called without an active exception") after its work was done."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    sys.exit(run())
