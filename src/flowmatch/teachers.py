"""Teachers for reflow and distillation: deterministic maps from noise ``z0`` to a sample ``z1``.

A teacher has ``shape`` (one sample), ``data_spec`` (how its samples decode to data units,
or ``None``), ``num_classes``, ``describe()`` (recorded in the student's lineage) and
``__call__(z0, label=None, guidance=1.0) -> z1``, the same ``z1`` for the same ``z0`` (and
labels) and the same batch. ``label`` (class indices ``0 .. num_classes - 1``) asks a
class-conditional teacher for those classes, with classifier-free guidance ``guidance``;
without it a class-conditional teacher samples its null class.

- :class:`FlowTeacher`: a flowmatch run integrated from t = 0 to 1 (default: the recipe's budget
  for its data, 16 midpoint steps for images, dopri5 for vectors).
- :class:`DiffusersTeacher`: a saved diffusers pipeline directory (``UNet2DModel`` with a
  DDPM or DDIM scheduler), sampled with DDIM at eta = 0 — deterministic, so ``z0`` (the
  initial ``x_T``) fixes ``z1``. Each step heads on with the noise implied by the clipped
  clean-image estimate (``use_clipped_model_output``). Diffusers runs time from ``T`` (noise) down to 0 (data);
  that direction is converted here, at the border: to flowmatch ``z0`` is noise at t = 0.
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path

import torch

from .errors import SettingError
from .solvers import ADAPTIVE_METHODS, check_method, integrate


def teacher_solver(nfe: int | None) -> str:
    """A fixed NFE budget uses midpoint (even NFE) or Euler; without one (None or 0), dopri5 at the tolerance."""
    return "dopri5" if not nfe else ("midpoint" if nfe % 2 == 0 else "euler")


class FlowTeacher:
    """A flowmatch run integrated by ``solver`` in ``nfe`` evaluations, or by dopri5 at ``tol``.
    ``solver`` unset: :func:`teacher_solver`; ``solver`` and ``nfe`` unset: the budget of
    :data:`~flowmatch.config.STUDENT_RECIPES` for the run's data (16 midpoint steps for images,
    dopri5 for vectors)."""

    def __init__(self, run_dir, solver: str | None = None, nfe: int | None = None, tol: float = 1e-5, device=None):
        from .config import STUDENT_RECIPES
        from .runs import load_run

        if solver is not None:
            check_method(solver, nfe if solver not in ADAPTIVE_METHODS else None)
            if solver not in ADAPTIVE_METHODS and nfe is None:
                raise SettingError("teacher_nfe", f"{solver} needs a number of evaluations")
        self.run = load_run(run_dir, device=device)
        if solver is None:
            if nfe is None:
                nfe = STUDENT_RECIPES["image" if len(self.run.shape) == 3 else "vector"]["teacher_nfe"]
            solver, nfe = teacher_solver(nfe), nfe or None
        self.solver, self.nfe, self.tol = solver, nfe, tol
        self.shape, self.device = self.run.shape, self.run.device
        self.data_spec = self.run.doc["data"]
        self.num_classes = self.run.num_classes
        self.cond_dim = self.run.cond_dim  # sampled unconditionally too: the student keeps the embedding

    def describe(self) -> dict:
        return {"kind": "flowmatch", "run": str(self.run.dir.resolve()), "solver": self.solver, "nfe": self.nfe,
                "tol": self.tol, "k": int(self.run.lineage.get("k", 1))}

    @torch.inference_mode()
    def __call__(self, z0: torch.Tensor, label: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
        v = self.run.field(None if label is None else label.to(self.device), guidance)
        res = integrate(v, z0.to(self.device), self.solver, self.nfe, tol=self.tol)
        return res.x.to(z0.device)


class DiffusersTeacher:
    """A saved diffusers pipeline (``DDPMPipeline``/``DDIMPipeline.save_pretrained`` layout, or
    a folder with the UNet's ``config.json`` and a ``scheduler_config.json``), sampled by DDIM
    with eta = 0 in ``steps`` steps. Samples live in the pipeline's space ([-1, 1] pixels).

    A class-conditional UNet (``num_class_embeds``) needs ``null_class``, the index it was trained
    to read as "no class" (label dropout), for unconditional pairs and for guidance; its other
    indices are the classes, numbered ``0 .. num_classes - 1`` in order. Guidance is
    classifier-free, on the predicted noise.

    ``clipped_eps`` (default True): where the scheduler clips its clean-image estimate to
    [-1, 1] (``clip_sample``, the DDPM default), step on with the noise recomputed from the
    clipped estimate (diffusers' ``use_clipped_model_output=True``). Diffusers' own DDIM
    pipeline steps with the raw prediction (``clipped_eps=False``); over many steps the clipped
    estimate and the raw noise pull apart, and a class-conditional MNIST DDPM's 100-step
    samples fall from 100% to 28% read as their digit (README, ``benchmarks/ddim_clipping.py``).
    Without ``clip_sample`` the two are the same."""

    batch_size = 256  # DDIM maps each sample alone, so pairs are made this many at a time

    def __init__(self, directory, steps: int = 50, device=None, null_class: int | None = None,
                 clipped_eps: bool = True):
        try:
            from diffusers import DDIMScheduler, UNet2DModel
        except ImportError:
            raise SettingError("teacher", "diffusers teachers need the diffusers package (pip install diffusers)") from None
        d = Path(directory)
        if not d.is_dir():
            raise SettingError("teacher", f"{d} is not a directory holding a diffusers pipeline")
        unet_dir = d / "unet" if (d / "unet" / "config.json").is_file() else d
        sched_dir = d / "scheduler" if (d / "scheduler" / "scheduler_config.json").is_file() else d
        if not (unet_dir / "config.json").is_file() or not (sched_dir / "scheduler_config.json").is_file():
            raise SettingError("teacher", f"{d} holds no diffusers UNet (unet/config.json) and scheduler "
                                          "(scheduler/scheduler_config.json)")
        if steps < 1:
            raise SettingError("teacher_nfe", f"expected a positive number of DDIM steps, got {steps}")
        try:
            config = json.loads((unet_dir / "config.json").read_text())
            if config.get("_class_name") not in (None, "UNet2DModel"):
                raise SettingError("teacher", f"{unet_dir} holds a {config.get('_class_name')}, expected a UNet2DModel")
            self.unet = UNet2DModel.from_pretrained(str(unet_dir))
            self.scheduler = DDIMScheduler.from_pretrained(str(sched_dir), timestep_spacing="trailing")
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise SettingError("teacher", f"could not load the diffusers pipeline in {d} ({str(e).splitlines()[0][:100]})") from None
        self.directory, self.steps, self.clipped_eps = d, int(steps), bool(clipped_eps)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.unet.to(self.device).eval().requires_grad_(False)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.shape = (self.unet.config.in_channels, *size)
        # [-1, 1] pixels in the pipeline; data units are [0, 1] pixels
        self.data_spec = {"name": "diffusers", "shape": list(self.shape), "mean": 0.5, "std": 0.5}
        embeds = int(self.unet.config.num_class_embeds or 0)
        if null_class is not None and not 0 <= null_class < embeds:
            what = f"has class indices 0 .. {embeds - 1}" if embeds else "takes no class labels"
            raise SettingError("teacher_null_class", f"the UNet in {d} {what}, got {null_class}")
        self.embeds, self.null_class = embeds, null_class
        self.num_classes = embeds - (null_class is not None)

    def describe(self) -> dict:
        return {"kind": "diffusers", "dir": str(self.directory.resolve()), "sampler": "ddim", "eta": 0.0,
                "steps": self.steps, "spacing": "trailing", "clipped_eps": self.clipped_eps, "k": 0,
                **({"null_class": self.null_class} if self.embeds else {})}

    def _class_index(self, label: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """The UNet's class indices for labels ``0 .. num_classes - 1`` (None: the null class)."""
        if not self.embeds:
            return None
        if label is None:
            if self.null_class is None:
                raise SettingError("teacher_null_class", f"the UNet in {self.directory} is class-conditional; name its null "
                                                         "class for unconditional pairs, or give `guidance` for pairs with classes")
            return torch.full((n,), self.null_class, dtype=torch.long, device=self.device)
        label = label.to(self.device, torch.long)
        if self.null_class is None:
            if (label < 0).any():
                raise SettingError("teacher_null_class", f"the UNet in {self.directory} is class-conditional; name its "
                                                         "null class for pairs without a class (`null_share`)")
            return label
        return torch.where(label < 0, self.null_class, label + (label >= self.null_class).long())

    def eps(self, x: torch.Tensor, t, label: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
        """The UNet's noise prediction at diffusers time ``t`` for classes ``label`` (None: the
        null class, or no class), with classifier-free guidance ``guidance``."""
        cond = self._class_index(label, len(x))
        if label is None or guidance == 1.0:
            return self.unet(x, t, class_labels=cond).sample
        null = self._class_index(None, len(x))  # both halves in one call
        eps_c, eps_u = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([cond, null])).sample.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    @torch.inference_mode()
    def walk(self, z0: torch.Tensor, label: torch.Tensor | None = None, guidance: float = 1.0):
        """DDIM's states from ``z0`` (on the teacher's device): yields ``(t, x_t)`` before each
        step at diffusers time ``t``, then ``(None, sample)``."""
        self.scheduler.set_timesteps(self.steps)
        x = z0.to(self.device) * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:  # diffusers time runs from T (noise) down to 0 (data)
            yield int(t), x
            eps = self.eps(x, t, label, guidance)
            x = self.scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=self.clipped_eps).prev_sample
        yield None, x

    def __call__(self, z0: torch.Tensor, label: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
        _, x = deque(self.walk(z0, label, guidance), maxlen=1)[0]  # the last state only
        return x.to(z0.device)


def make_teacher(spec: str | os.PathLike, nfe: int | None = None, solver: str | None = None, tol: float = 1e-5, device=None,
                 null_class: int | None = None):
    """``RUN`` (a flowmatch run directory: a :class:`FlowTeacher`; ``nfe`` 0: dopri5 at ``tol``) or
    ``diffusers:DIR`` (``nfe``: DDIM steps, default 50; ``null_class``: its UNet's null class index,
    when it is class-conditional)."""
    spec = str(spec)
    if spec.startswith("diffusers:"):
        if nfe == 0:
            raise SettingError("teacher_nfe", "a diffusers teacher takes a number of DDIM steps >= 1, got 0")
        return DiffusersTeacher(spec.split(":", 1)[1], steps=nfe or 50, device=device, null_class=null_class)
    if null_class is not None:
        raise SettingError("teacher_null_class", "applies to diffusers teachers; a flowmatch run knows its null class")
    if not Path(spec).is_dir():
        raise SettingError("teacher", f"{spec} is not a run directory (or diffusers:DIR)")
    if nfe == 0:
        solver, nfe = "dopri5", None
    return FlowTeacher(spec, solver=solver, nfe=nfe, tol=tol, device=device)
