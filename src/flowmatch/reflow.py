"""Rectified flow: pairs from a teacher, k-rectified flow, and distillation (Liu et al. 2022).

1. :func:`generate_pairs` draws noise ``z0`` and maps it through a teacher to ``z1``; the
   pairs are written as shards ``RUN/pairs/shard-KKKKK.safetensors``. Shard ``k`` draws its
   noise from its own seed ``(seed, k)`` on the CPU and is mapped whole by the teacher, so the
   pairs depend only on ``seed`` and ``shard_size`` — not on batch sizes, devices' memory or
   how many processes share the work. Finished shards are skipped after an interruption.
2. :func:`reflow` trains a student on the fixed pairs with the straight-path loss,
   initialised from the teacher's weights by default. Reflowing a k-rectified flow gives a
   (k+1)-rectified flow.
3. :func:`distill` regresses ``z1`` from ``z0`` in one step (``z1 ≈ z0 + v(z0, 0)``, L2), or
   in ``k`` Euler steps (times drawn from the grid ``{0, 1/k, ...}``). The result is an
   ordinary run: ``flowmatch sample RUN --nfe 1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import SHARD_SIZE, StudentOptions, TrainConfig, interval_objective
from .data.pairs import PairsDataset, check_pairs, read_pairs_meta
from .errors import EnvironmentFault, SettingError, Stopped, UserError, sigterm_stops, stop_requested
from .files import waiting_lock
from .runs import save_weights, write_json
from .seeding import generator


def _pairs_meta(teacher, n, shard_size, seed, guidance, null_share) -> dict:
    return {"n": n, "shard_size": shard_size, "seed": seed, "num_shards": -(-n // shard_size),
            "shape": list(teacher.shape), "teacher": teacher.describe(), "data": teacher.data_spec,
            "num_classes": getattr(teacher, "num_classes", 0), "cond_dim": getattr(teacher, "cond_dim", 0),
            "guidance": guidance, **({"null_share": null_share} if guidance is not None else {})}


def shard_draws(k: int, m: int, shape, seed: int, num_classes: int = 0,
                null_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shard ``k``'s noise (the sampling noise of batch ``k``: :func:`flowmatch.seeding.noise`) and,
    with ``num_classes``, its pairs' classes: every class equally often (up to one), in an order
    drawn from the same generator after the noise; then ``round(null_share * m)`` pairs, drawn
    next, get the null class -1 instead."""
    g = generator(seed, "sample", k)
    z0 = torch.randn(m, *shape, generator=g)
    if not num_classes:
        return z0, None
    label = torch.randperm(m, generator=g) % num_classes
    label[torch.randperm(m, generator=g)[:round(null_share * m)]] = -1
    return z0, label


def check_guidance(teacher, guidance: float | None, null_share: float = 0.0) -> int:
    """Refuse pairs a teacher cannot make (before anything is written); returns its classes."""
    classes = getattr(teacher, "num_classes", 0)
    if guidance is not None and not classes:
        raise SettingError("guidance", "the teacher has no classes; pairs with classes need a class-conditional teacher")
    if getattr(teacher, "embeds", 0) and teacher.null_class is None and (guidance != 1.0 or null_share > 0):
        if guidance is None or null_share >= 1:
            why = "for unconditional pairs"
        elif guidance != 1.0:
            why = f"for `guidance` {guidance:g} (1 needs none)"
        else:
            why = "for the share of pairs without a class (`null_share` 0: none)"
        raise SettingError("teacher_null_class", f"the diffusers UNet in {teacher.directory} is class-conditional; name "
                                                 f"the class index it reads as 'no class' {why}")
    return classes


@dataclass(frozen=True)
class Classes:
    """Pairs with classes (a class-conditional teacher): each pair's noise mapped to its class with
    classifier-free ``guidance``; a ``null_share`` of the pairs gets the null class (-1) and the
    teacher's unconditional map."""

    guidance: float = 1.0
    null_share: float = 0.0


def generate_pairs(teacher, n: int, pairs_dir, shard_size: int = SHARD_SIZE, seed: int = 0, progress: bool = True,
                   shards: list[int] | None = None, classes: Classes | None = None) -> Path:
    """Write ``n`` teacher pairs as shards into ``pairs_dir`` (resumable); returns the folder.

    ``shards`` restricts the work to those shard indices (one process's share). ``classes`` gives
    each pair a class (:func:`shard_draws`, saved as the shard's ``label``) and maps its noise to
    that class with its guidance weight (:class:`Classes`).
    """
    guidance, null_share = (None, 0.0) if classes is None else (classes.guidance, classes.null_share)
    if n < 1:
        raise SettingError("pairs", f"expected a positive number of pairs, got {n}")
    if shard_size < 1:
        raise SettingError("shard_size", f"expected a positive integer, got {shard_size}")
    num_classes = check_guidance(teacher, guidance, null_share)
    pairs_dir = Path(pairs_dir)
    if not 0 <= null_share <= 1:
        raise SettingError("null_share", f"expected a share in [0, 1], got {null_share!r}")
    meta = _pairs_meta(teacher, n, shard_size, seed, guidance, null_share)
    meta_file = pairs_dir / "pairs.json"
    keys = ("n", "shard_size", "seed", "shape", "teacher", "guidance", "null_share")
    # one process at a time writes the metadata: two commands that start the same folder at once share
    # its (identical) shards, or the second is refused when its teacher or settings differ
    if not meta_file.exists():
        with waiting_lock(pairs_dir / ".lock"):
            if not meta_file.exists():
                write_json(meta_file, meta)
    old = read_pairs_meta(meta_file)
    differ = [k for k in keys if old.get(k) != meta.get(k)]
    if differ:  # e.g. unconditional pairs of a class-conditional teacher resumed with the default guidance
        raise SettingError("out", f"{pairs_dir} holds pairs from another teacher or settings ({', '.join(differ)} differ); "
                                  f"choose a new directory or give its settings")
    todo = range(meta["num_shards"]) if shards is None else shards
    shard_file = {k: pairs_dir / f"shard-{k:05d}.safetensors" for k in todo}
    todo = [k for k in todo if not shard_file[k].exists()]  # written atomically, so an existing shard is complete
    sizes = {k: min(shard_size, n - k * shard_size) for k in todo}
    # a teacher that maps each sample alone (DDIM) takes a shard in pieces: the same pairs, a moving bar
    piece = getattr(teacher, "batch_size", None) or shard_size
    with tqdm(total=sum(sizes.values()), disable=not progress, desc="pairs", unit="pair") as bar, sigterm_stops():
        for done, k in enumerate(todo):
            if stop_requested():  # SIGTERM: the finished shards are kept, the rest made on resuming
                raise Stopped(f"stopped by SIGTERM: {done} more pair shard(s) written to {pairs_dir}, {len(todo) - done} "
                              "to go; run the same command with `resume` to finish them and train")
            z0, label = shard_draws(k, sizes[k], teacher.shape, seed, num_classes if guidance is not None else 0, null_share)
            z1 = []
            for i in range(0, sizes[k], piece):
                z, y = z0[i:i + piece], None if label is None else label[i:i + piece]
                z1.append((teacher(z) if y is None else teacher(z, y, guidance)).float().cpu())
                bar.update(len(z))
            try:
                save_weights(shard_file[k],
                             {"z0": z0, "z1": torch.cat(z1), **({} if label is None else {"label": label})},
                             {"index": k, "seed": seed})
            except EnvironmentFault as e:
                raise EnvironmentFault(f"{e}; the {done} shard(s) written before it are kept: make room, then run the "
                                       "same command with `resume`") from None
    return pairs_dir


def student_config(teacher, out: Path, kind: str, opts: StudentOptions) -> tuple[TrainConfig, dict]:
    """The student's settings and data spec: the teacher's network (and weights, for a flowmatch
    teacher) trained on the straight path between fixed pairs; distillation at the ``k`` grid times."""
    from .teachers import FlowTeacher

    if isinstance(teacher, FlowTeacher):
        base = TrainConfig.from_dict(teacher.run.doc["train"])
        if kind == "distill" and interval_objective(base.objective):
            # its student would keep the objective and train only at the grid's times with h = 0:
            # the step it samples by, u(z, 0, 1), would never see the pairs
            raise UserError(f"{teacher.run.dir}: a {base.objective} run samples in one step already (and in K steps at "
                            f"NFE K); distil a flow-matching run (objective cfm), or reflow this one")
        cfg = TrainConfig(**{**base.to_dict(), "lineage": {}, "init": None})
        cfg.init_from = str((teacher.run.dir / "ema.safetensors").resolve())
        if opts.unet is not None and opts.unet != cfg.unet:
            raise SettingError("unet", f"the student of a flowmatch run starts from its weights, so it keeps its network "
                                       f"(the {cfg.unet} preset); leave the preset unset")
    else:
        cfg = TrainConfig()
        cfg.init_from = None
        cfg.unet = opts.unet or "auto"
    k_teacher = teacher.describe().get("k", 0)
    cfg.data, cfg.n_points = "pairs", None
    cfg.hflip = False  # a pair is one noise and the teacher's sample from it: neither side may be flipped alone
    cfg.coupling, cfg.path, cfg.sigma_min = "fixed", "linear", 0.0
    cfg.stf = 0  # a pair's target is its own: the teacher's noise and sample are not independent draws
    if opts.guidance is not None:  # labelled pairs carry their null class (null_share): no label is dropped again
        cfg.label_dropout = 0.0
    cfg.steps, cfg.lr, cfg.batch_size, cfg.seed = opts.steps, opts.lr, opts.batch_size, opts.seed
    cfg.loss, cfg.plots = opts.loss, opts.plots
    if opts.perceptual is not None:
        from .perceptual import Perceptual

        Perceptual(opts.perceptual, teacher.shape)  # a file that cannot compare these images fails here
        cfg.perceptual = str(Path(opts.perceptual).resolve())
    cfg.warmup_steps = min(cfg.warmup_steps, opts.steps // 10)
    if kind == "distill":
        if opts.time_dist != "uniform":
            raise SettingError("time_dist", "distillation trains at the k-step sampler's grid times; it applies to reflow")
        cfg.time_dist, cfg.time_steps = "grid", opts.k
    else:
        cfg.time_dist = opts.time_dist
    cfg.lineage = {"kind": kind, "teacher": teacher.describe(), "pairs": opts.pairs,
                   "k": k_teacher + 1 if kind == "reflow" else k_teacher}
    if kind == "distill":
        cfg.lineage["steps"] = opts.k
    data_spec = {"name": "pairs", "dir": str((out / "pairs").resolve()), "base": teacher.data_spec}
    return cfg.validate(), data_spec


def pairs_job(teacher, pairs_dir: Path, opts: StudentOptions, progress: bool = True) -> None:
    """Generate the teacher's pairs (resumable). Under torchrun each process writes every P-th
    shard, after the main process has written the folder's metadata."""
    n, size = opts.pairs, opts.shard_size
    classes = None if opts.guidance is None else Classes(opts.guidance, opts.null_share)
    kw = {"shard_size": size, "seed": opts.seed, "classes": classes}
    if "WORLD_SIZE" not in os.environ:
        generate_pairs(teacher, n, pairs_dir, progress=progress, **kw)
        return
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    state.wait_for_everyone()  # every process has checked --out before any writes
    if state.is_main_process:  # the metadata first, from one process
        generate_pairs(teacher, n, pairs_dir, progress=False, shards=[], **kw)
    state.wait_for_everyone()
    mine = list(range(state.process_index, -(-n // size), state.num_processes))
    generate_pairs(teacher, n, pairs_dir, progress=progress and state.is_main_process, shards=mine, **kw)
    state.wait_for_everyone()


def student(teacher, out, kind: str, opts: StudentOptions | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Reflow (``kind="reflow"``: a (k+1)-rectified flow) or distillation (``"distill"``: a
    ``k``-step generator) of ``teacher`` into the run ``out``: the pairs job, then an ordinary
    training run on the pairs. ``resume`` finishes an interrupted job or training."""
    from .training import check_new_run_dir, train

    out, opts = Path(out), (opts or StudentOptions()).validate().resolve(teacher.shape, getattr(teacher, "num_classes", 0))
    if resume and (out / "trainer_state.pt").exists():
        return train(None, out=out, resume=True, progress=progress)
    if not resume:
        check_new_run_dir(out, allow_existing=("pairs",))
        if (out / "pairs").exists():
            raise SettingError("out", f"{out} already holds pairs; `resume` to finish them, or choose a new directory")
    cfg, data_spec = student_config(teacher, out, kind, opts)
    with sigterm_stops():  # one SIGTERM request across the pairs and the training: each stops at its next safe point
        pairs_job(teacher, out / "pairs", opts, progress)
        # resumed before the first checkpoint: training starts over beside the finished pairs
        allow = ("pairs", "config.json", "metrics.jsonl", ".lock") if resume else ("pairs",)
        return train(cfg, out=out, progress=progress, parts=cfg.build(data_spec), allow_existing=allow)


def reflow(teacher, out, resume: bool = False, progress: bool = True, **options) -> Path:
    """Train a (k+1)-rectified flow on a teacher's pairs (``options``: :class:`StudentOptions`
    fields, e.g. ``pairs=20000, steps=4000``); returns the run directory."""
    return student(teacher, out, "reflow", StudentOptions(**options), resume, progress)


def distill(teacher, out, resume: bool = False, progress: bool = True, **options) -> Path:
    """Distil the teacher into a ``k``-step generator (``k = 1``, the default: one step); returns the run directory."""
    return student(teacher, out, "distill", StudentOptions(**options), resume, progress)


__all__ = ["Classes", "generate_pairs", "check_pairs", "PairsDataset", "reflow", "distill", "student", "shard_draws", "check_guidance"]
